"""One Ray Train worker of a reflow or distillation run: the training loop, its checkpoints and the final model.

Every worker holds the whole UNet (DDP); the VAE and the text encoder are frozen. A step takes the global batch's
share of this worker from its data readers (`pipeline.training.pairs_data`), draws the flow times t of the whole global
batch from (seed, step) and keeps its slice, and averages gradients over all workers, so the trained weights depend
on the seed, the data and the global batch, not on how the batch is split. AdamW with warmup, gradient clipping at
1, bf16 autocast on GPU (fp32 on the CPU), gradient accumulation, and the EMA of diffusers' EMAModel on rank 0.

A checkpoint `OUTPUT/checkpoints/step-NNNNNNN/` holds the raw weights, the EMA weights, the optimizer and the
step (which is all the data-order state, see pairs_data) with the metrics so far; `metrics.jsonl` is rewritten
whole after each. Ray Train hands the latest one back on a re-run (or a worker-group restart), and the run goes on
from there, bit for bit on the CPU. The final model is a complete diffusers folder with the EMA weights and a record
of what it is (`instaflow.models.MODEL_RECORD`), written last.
"""

import copy
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instaflow.loading import ComponentCache, Runtime, component_digest
from instaflow.models import MODEL_RECORD, ONE_STEP_DEFAULTS, TWO_RF_DEFAULTS
from instaflow.text import encode_tokens, tokenize_prompts
from instaflow.training import Trainer, learning_rate_at
from pipeline.model_source import ModelSource
from pipeline.training.pairs_data import PairStream, build_embedding_cache, find_pairs
from pipeline.storage import filesystem, get_bytes, protect_secrets, put_atomic, raises_redacted, with_retries
from pipeline.training.spec import TrainSpec

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # Ray Train's run name: checkpoints land in OUTPUT/checkpoints/step-NNNNNNN
CHECKPOINT_PREFIX = "step-"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "train_state.json"
WEIGHTS_FILE, EMA_FILE, OPTIMIZER_FILE = "unet.pt", "ema.pt", "optimizer.pt"
FROZEN_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def train_identity(spec: TrainSpec, init: ModelSource) -> dict:
    """The spec's identity with the init model replaced by what it is (its files' digest or hub revision), so a
    moved copy of the same model is the same run and a changed one is not."""
    return spec.identity() | {"init": init.identity()}


@raises_redacted  # Ray shows why a training worker failed
def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.update(config["storage_env"])  # storage settings, as the driver had them
    context = ray.train.get_context()
    spec, init = TrainSpec(**config["spec"]), ModelSource(**config["init"])
    protect_secrets(spec.storage_options)
    run = TrainRun(spec, init, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    run.resume(ray.train.get_checkpoint())
    run.train(ray.train.report)


class TrainRun:
    """A worker's part of the run: its models, its data readers, its steps; rank 0 also checkpoints and writes."""

    def __init__(self, spec: TrainSpec, init: ModelSource, rank: int, world_size: int, device: torch.device):
        self.spec, self.rank, self.world_size, self.device = spec, rank, world_size, device
        self.layout = spec.layout(world_size)
        self.identity = train_identity(spec, init)
        self.model_folder = Path(init.local_dir(spec.storage_options))
        self.components = ComponentCache(Runtime(device, torch.float32)).load(str(self.model_folder))
        self.trainer = Trainer(
            self.components.unet, spec.loss, spec.learning_rate, spec.warmup_steps, spec.weight_decay,
            ema_decay=spec.ema_decay if rank == 0 else None,  # the weights are the same on every rank: one EMA
            vae=self.components.vae,
            perceptual=perceptual_distance(device) if spec.loss == "distill-lpips" else None,
        )
        self.pairs = find_pairs(spec.pairs, spec.storage_options)
        self.step = 0
        self.history: list[dict] = []
        self.output_fs, self.output_root = filesystem(spec.output, spec.storage_options)

    # ------------------------------------------------------------------------------------------- checkpoints

    def resume(self, checkpoint) -> None:
        """Loads the state of a checkpoint Ray Train handed back (the latest), if any."""
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            if state["spec"] != json.loads(json.dumps(self.identity)):
                raise ValueError(f"checkpoint {checkpoint.path} was made with other settings: {state['spec']}")
            def load(name: str):
                return torch.load(Path(folder) / name, map_location=self.device, weights_only=True)

            self.trainer.unet.load_state_dict(load(WEIGHTS_FILE))
            self.trainer.optimizer.load_state_dict(load(OPTIMIZER_FILE))
            if self.trainer.ema is not None:
                self.trainer.ema.load_state_dict(load(EMA_FILE))
        self.step, self.history = state["step"], state["metrics"]
        if state["num_readers"] != self.layout.num_readers:
            logger.warning("resuming with %d data readers instead of %d: the data order from here on differs",
                           self.layout.num_readers, state["num_readers"])
        logger.info("resumed from %s at step %d", checkpoint.path, self.step)

    def save_checkpoint(self, report, metrics: dict) -> None:
        """All ranks report; rank 0 hands Ray Train the files, then rewrites metrics.jsonl whole."""
        from ray.train import Checkpoint

        folder = tempfile.mkdtemp(prefix="instaflow-checkpoint-")
        try:
            checkpoint = None
            if self.rank == 0:
                torch.save(self.trainer.unet.state_dict(), os.path.join(folder, WEIGHTS_FILE))
                torch.save(self.trainer.ema.state_dict(), os.path.join(folder, EMA_FILE))
                torch.save(self.trainer.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
                state = {"step": self.step, "spec": self.identity, "num_readers": self.layout.num_readers,
                         "metrics": self.history}
                Path(folder, STATE_FILE).write_text(json.dumps(state, indent=1))
                checkpoint = Checkpoint.from_directory(folder)
            report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(self.step))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if self.rank == 0:
            lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.history)
            put_atomic(self.output_fs, posixpath.join(self.output_root, METRICS_FILE), lines.encode())

    # ---------------------------------------------------------------------------------------------- training

    def train(self, report) -> None:
        spec = self.spec
        if self.world_size > 1:
            import ray.train.torch

            self.trainer.model = ray.train.torch.prepare_model(self.trainer.unet, move_to_device=False)
        encoder_id = self.cache_embeddings() if spec.cache_text_embeddings else None
        batches = self.batches(encoder_id)
        start, interval = self.step, Interval()
        while self.step < spec.steps:
            interval.add(*self.train_step(next(batches)))
            self.step += 1
            checkpoint_now = self.step % spec.checkpoint_every == 0 or self.step == spec.steps
            if self.step % spec.log_every == 0 or checkpoint_now:
                metrics = self.log(interval.totals())
                if checkpoint_now:
                    self.save_checkpoint(report, metrics)
                else:
                    report(metrics)
                interval.reset()  # samples/s counts training, not reporting and checkpointing
        logger.info("trained from step %d to step %d", start, self.step)
        if self.rank == 0:
            self.write_final()

    def batches(self, encoder_id: str | None):
        """This worker's batch of every step, from its readers in order: concatenated, they are its slice of the
        global batch (ranks in order, each rank's readers in order)."""
        layout = self.layout
        stream = PairStream(self.pairs, self.spec.seed, self.rank, self.world_size,
                            start_sample=self.step * layout.reader_batch, encoder_id=encoder_id)
        loader = torch.utils.data.DataLoader(stream, batch_size=layout.reader_batch,
                                             num_workers=self.spec.loader_workers)
        parts = iter(loader)
        while True:
            chunks = [next(parts) for _ in range(layout.readers_per_worker)]
            yield {name: _concat([chunk[name] for chunk in chunks]) for name in chunks[0]}

    def flow_times(self) -> torch.Tensor:
        """t ~ U(0, 1) for the whole global batch from (seed, step); this worker's slice."""
        t = np.random.default_rng([self.spec.seed, self.step]).random(self.spec.batch_size)
        local = self.layout.local
        return torch.from_numpy(t[self.rank * local : (self.rank + 1) * local]).float().to(self.device)

    def prompt_embeds(self, batch: dict) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(self.device)
        c = self.components
        return encode_tokens(c.text_encoder, tokenize_prompts(c.tokenizer, batch["prompt"])).clone()

    def train_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimizer step number `self.step` on this worker's share of the global batch."""
        noise, latent = batch["noise"].to(self.device), batch["latent"].to(self.device)
        layout = self.layout
        return self.trainer.step(self.step, noise, latent, self.prompt_embeds(batch), self.flow_times(),
                                 micro_batch=layout.micro, mean_over=layout.local)

    def log(self, interval: dict) -> dict:
        """The interval's row: the global mean loss (summed over workers), lr, samples/s, mean grad norm."""
        loss_sum = interval["loss_sum"]
        if self.world_size > 1:
            torch.distributed.all_reduce(loss_sum)
        row = {
            "step": self.step,
            "loss": float(loss_sum) / (interval["steps"] * self.spec.batch_size),
            "learning_rate": learning_rate_at(self.step - 1, self.spec.learning_rate, self.spec.warmup_steps),
            "grad_norm": float(interval["grad_norm_sum"]) / interval["steps"],
            "samples_per_s": interval["steps"] * self.spec.batch_size / interval["seconds"],
        }
        self.history.append(row)
        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
        return row

    # ----------------------------------------------------------------------------------------- embeddings

    def cache_embeddings(self) -> str:
        """Builds this rank's share of the missing cached embeddings (one shard in world_size), then waits for the
        others; returns the encoder's id that names the cache."""
        c = self.components
        digests = "".join(component_digest(self.model_folder / name) for name in ("tokenizer", "text_encoder"))
        encoder_id = hashlib.sha256(digests.encode()).hexdigest()[:16]

        def encode(prompts: list[str]) -> np.ndarray:
            return encode_tokens(c.text_encoder, tokenize_prompts(c.tokenizer, prompts)).float().cpu().numpy()

        shards = list(self.pairs.shards[self.rank :: self.world_size])
        written = build_embedding_cache(self.pairs, shards, encoder_id, encode)
        logger.info("text embeddings: %d of this worker's %d shards encoded and cached", written, len(shards))
        if self.world_size > 1:
            torch.distributed.barrier()
        return encoder_id

    # ------------------------------------------------------------------------------------------ final model

    def write_final(self) -> None:
        """OUTPUT/final: the init model's frozen parts, the EMA UNet, a RectifiedFlowPipeline index, then the
        record. The old record goes first, so a final folder being rewritten never looks complete."""
        fs, final = self.output_fs, posixpath.join(self.output_root, FINAL_DIR)
        record_path = posixpath.join(final, MODEL_RECORD)
        if with_retries(fs.exists, record_path, what=f"look up {record_path}"):
            with_retries(fs.rm, record_path, what=f"delete {record_path}")
        source = self.model_folder
        with tempfile.TemporaryDirectory(prefix="instaflow-final-") as tmp:
            unet = copy.deepcopy(self.trainer.unet).to("cpu")
            unet.load_state_dict({k: v.to("cpu") for k, v in self.trainer.ema.weights().items()}, strict=False)
            unet.save_pretrained(Path(tmp, "unet"))
            files = _files_under(Path(tmp), "unet")
            for name in FROZEN_COMPONENTS:
                files |= _files_under(source, name)
            for relative, path in sorted(files.items()):
                put_atomic(fs, posixpath.join(final, relative), path.read_bytes())
        index = json.loads((source / "model_index.json").read_text())
        index["_class_name"] = "RectifiedFlowPipeline"
        put_atomic(fs, posixpath.join(final, "model_index.json"), (json.dumps(index, indent=2) + "\n").encode())
        put_atomic(fs, record_path, (json.dumps(self.model_record(), indent=2) + "\n").encode())
        logger.info("final model written to %s", final)

    def model_record(self) -> dict:
        one_step = self.spec.loss.startswith("distill")
        steps, guidance = ONE_STEP_DEFAULTS if one_step else TWO_RF_DEFAULTS
        return {
            "kind": "one-step" if one_step else "2-rectified-flow",
            "default_steps": steps,
            "default_guidance_scale": guidance,
            "trained": {"step": self.step, **self.identity},
        }


class Interval:
    """What a logging interval accumulates: on-device sums, read once at the end of the interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss_sum, self.grad_norm_sum, self.started = 0, 0.0, 0.0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.steps += 1
        self.loss_sum = self.loss_sum + loss_sum
        self.grad_norm_sum = self.grad_norm_sum + grad_norm

    def totals(self) -> dict:
        return {"steps": self.steps, "loss_sum": torch.as_tensor(self.loss_sum, dtype=torch.float32),
                "grad_norm_sum": self.grad_norm_sum, "seconds": time.perf_counter() - self.started}


def _files_under(folder: Path, component: str) -> dict[str, Path]:
    """A component's files by their path in a model folder (hub snapshots hold symlinks to blobs: followed)."""
    return {p.relative_to(folder).as_posix(): p for p in (folder / component).rglob("*") if p.is_file()}


def _concat(values: list):
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]


def perceptual_distance(device: torch.device):
    """LPIPS with VGG features, as InstaFlow's distillation; an optional dependency whose weights come from the
    network on first use."""
    try:
        import lpips
    except ImportError:
        raise ValueError("--loss distill-lpips needs the lpips package: pip install 'instaflow-batch[lpips]'") from None
    return lpips.LPIPS(net="vgg").to(device).eval().requires_grad_(False)


def read_ema_weights(fs, folder: str) -> dict[str, torch.Tensor]:
    """The EMA UNet weights (the ones saved) of a checkpoint folder on any store."""
    state = torch.load(io.BytesIO(get_bytes(fs, posixpath.join(folder, EMA_FILE))), map_location="cpu",
                       weights_only=True)
    return state["shadow"]


def list_checkpoints(fs, output_root: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint under OUTPUT/checkpoints that has its state file, in step order."""
    folder = posixpath.join(output_root, CHECKPOINTS_DIR)
    fs.invalidate_cache(folder)
    try:
        entries = with_retries(fs.ls, folder, detail=False, what=f"list {folder}")
    except FileNotFoundError:
        return []
    found = []
    for path in entries:
        name = posixpath.basename(path.rstrip("/"))
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            state = posixpath.join(path, STATE_FILE)
            if with_retries(fs.exists, state, what=f"look up {state}"):
                found.append((int(name[len(CHECKPOINT_PREFIX):]), path.rstrip("/")))
    return sorted(found)
