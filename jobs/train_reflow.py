"""Train on reflow pairs with Ray Train: reflow to a 2-rectified flow, or distil to one step (InstaFlow's recipe).

Re-running the same command on the same output resumes from its last checkpoint. Exit status: 0 trained (the final
model is written), 1 training failed, 2 bad input or settings (nothing ran), 3 no worker could start, 4 the output
was taken by another job, 130 interrupted.
"""

import _thread
import argparse
import importlib.util
import logging
import os
import posixpath
import sys
from dataclasses import asdict

import torch

from instaflow.training import LOSSES
from jobs.errors import entry_point, error_line, process_exit, report
from jobs.main import Parser
from jobs.options import check_output_folder, json_object
from pipeline.job import connect_ray, handle_sigterm_as_interrupt, sigterm_as_interrupt
from pipeline.lock import LeaseKeeper, OutputLock
from pipeline.manifest import ManifestWriter, check_compatible, job_manifest, read_manifest
from pipeline.model_source import resolve_model_source
from pipeline.training.pairs_data import check_pairs_fit, find_pairs
from pipeline.storage import OutputError, filesystem, protect_secrets, redact, redact_text, storage_env, \
    with_retries
from pipeline.training.spec import DEVICES, TrainSpec
from pipeline.training.worker import CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, train_identity, train_worker

logger = logging.getLogger(__name__)

OUTPUT_ENTRIES = (CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE)  # what --overwrite deletes (and _job.json is rewritten)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="a pairs job's output root or its pairs/ folder (any fsspec URL)")
    parser.add_argument("--init", required=True, help="model to start from: diffusers folder, hub id or fsspec URL")
    parser.add_argument("--output", required=True, help="output folder: checkpoints/, final/, metrics.jsonl")
    parser.add_argument("--loss", choices=LOSSES, default="reflow")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (a resumed run goes on to it)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch: samples per step over all workers")
    parser.add_argument("--micro-batch-size", type=int,
                        help="samples per forward pass on a worker; less than its share accumulates gradients")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--warmup-steps", type=int, default=500, help="linear learning-rate warmup")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW's")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="the EMA weights are the ones saved")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    parser.add_argument("--keep-checkpoints", type=int, help="keep only the latest N (default: all)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per metrics row")
    parser.add_argument("--seed", type=int, default=0, help="orders the data and draws the flow times")
    parser.add_argument("--num-workers", type=int, help="default: one per GPU in the cluster (1 without GPUs)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: GPUs if the cluster has them or is a remote cluster (which may add them)")
    parser.add_argument("--loader-workers", type=int, default=2, help="data-loader processes per worker")
    parser.add_argument("--cache-text-embeddings", action="store_true",
                        help="encode each prompt once, into _text-embeddings/ beside the pairs, and train from that")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="CPUs each worker reserves, and so its torch threads (default: Ray Train's 1)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--lock-lease", dest="lock_lease_s", type=float, default=120.0,
                        help="seconds after which a lock its job stopped renewing is taken over")
    parser.add_argument("--storage-options", type=json_object, default={}, help="JSON passed to fsspec")
    parser.add_argument("--overwrite", action="store_true", help="delete this tool's outputs there and start over")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    return parser


@entry_point
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(build_parser(prog).parse_args(argv))
    with sigterm_as_interrupt():
        spec = TrainSpec(**args)
        protect_secrets(spec.storage_options)  # in what this driver logs
        if spec.loss == "distill-lpips" and importlib.util.find_spec("lpips") is None:
            raise ValueError("--loss distill-lpips needs the lpips package: pip install 'instaflow-batch[lpips]'")
        pairs = find_pairs(spec.pairs, spec.storage_options)
        init = resolve_model_source(spec.init, "float32", spec.storage_options)
        check_pairs_fit(pairs, init.latent_geometry("--init", spec.storage_options),
                        f"--init {redact_text(spec.init)!r}")
        fs, root = filesystem(spec.output, spec.storage_options)
        check_output_folder(spec.output, spec.storage_options)
        lock = OutputLock(fs, root, lease_s=spec.lock_lease_s)
        lock.acquire()
        keeper = LeaseKeeper(lock, on_lost=_thread.interrupt_main).start()  # Ray Train runs in the main thread
        try:
            use_gpu = wants_gpus(spec)
            connect_ray(spec.ray_address)
            handle_sigterm_as_interrupt()  # ray.init puts its own SIGTERM handler in place of ours
            trainer = build_trainer(spec, init, fs, root, use_gpu)
            prepare_output(spec, fs, root, train_identity(spec, init), [{"path": s.path} for s in pairs.shards],
                           lock)
            result = trainer.fit()
        except (OutputError, ValueError):
            raise  # exit 2, reported by entry_point
        except KeyboardInterrupt:
            if keeper.error is not None:
                return report(keeper.error)  # exit 4
            logger.warning("interrupted: the last checkpoint stays; re-run the command to resume from it")
            return 130
        except Exception as exc:
            return training_failure(exc)
        finally:
            keeper.stop()
            if keeper.error is None:
                lock.release()
    print(f"trained: {result.metrics}\nfinal model: {posixpath.join(spec.output, FINAL_DIR)}")
    return 0


def prepare_output(spec: TrainSpec, fs, root: str, identity: dict, inputs: list[dict], lock: OutputLock) -> None:
    """Starts over on --overwrite; refuses an output trained with other settings or pairs; records ours."""
    existing = None if spec.overwrite else read_manifest(fs, root)
    if existing is not None:
        check_compatible(existing, identity, inputs)
    if spec.overwrite:
        for name in OUTPUT_ENTRIES:
            path = posixpath.join(root, name)
            if with_retries(fs.exists, path, what=f"look up {path}"):
                with_retries(fs.rm, path, recursive=True, what=f"delete {path}")
    lineage = [*(existing or {}).get("lineage", []), lock.token]
    manifest = job_manifest(identity, inputs, lineage) | {
        "init": spec.init, "pairs": spec.pairs, "storage_options": redact(spec.storage_options),
    }
    ManifestWriter(fs, root, confirm_held=lock.refresh).write(manifest)


def wants_gpus(spec: TrainSpec) -> bool:
    """As for generation jobs (pipeline.job.resolve_device), decided before Ray starts: `auto` is GPUs on any
    cluster the job joins (even before a GPU is up: the autoscaler adds them) or on a machine with one; a Ray this
    process already holds has GPUs or has not."""
    import ray

    if spec.device != "auto":
        return spec.device == "gpu"
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(spec.ray_address or os.environ.get("RAY_ADDRESS")) or torch.cuda.is_available()


def build_trainer(spec: TrainSpec, init, fs, root: str, use_gpu: bool):
    """A TorchTrainer whose run is named `checkpoints` under the output: Ray Train's checkpoints land in
    OUTPUT/checkpoints/step-NNNNNNN, on the output's own filesystem, and a re-run finds them."""
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_workers = spec.num_workers or (max(1, gpus) if use_gpu else 1)
    spec.layout(num_workers)  # a batch that does not split fails here, not on the workers
    logger.info("training on %d %s workers", num_workers, "GPU" if use_gpu else "CPU")
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": vars(spec), "init": asdict(init), "storage_env": storage_env()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(spec, use_gpu)),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=root,
            storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        ),
    )


def worker_resources(spec: TrainSpec, use_gpu: bool) -> dict | None:
    """Each worker's reservation: Ray Train's default, or --cpus-per-worker CPUs (Ray sets a worker's torch threads
    from them) beside its GPU."""
    if spec.cpus_per_worker is None:
        return None
    return {"CPU": spec.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def training_failure(exc: Exception) -> int:
    """3 when no worker group could start (resources, timeout), else 1; the error is printed either way."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import (
        InsufficientClusterResourcesError,
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )

    startup = (InsufficientClusterResourcesError, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)
    print(f"error: {error_line(f'training failed: {exc}')}", file=sys.stderr)
    if isinstance(exc, ControllerError) and isinstance(exc.controller_failure, startup):
        return 3
    return 1


if __name__ == "__main__":
    process_exit(main())
