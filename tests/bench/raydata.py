"""Benchmark 2: the engine against the best Ray Data pipeline we could write, on the same tiny model, the same
prompts in S3 (moto, 127.0.0.1) and the same kind of output in S3 (webdataset tars of JPEGs at quality 95).

    python tests/bench/raydata.py [--prompts 8192] [--size 64] [--workers 2] [--repeats 2] [--no-resume] [--out DIR]
    python tests/bench/raydata.py --device simulated --workers 1 --prompts 4096 --no-resume   # a GPU-like device
    python tests/bench/raydata.py --quick      # 128 prompts, no resume: the test runs this

Each run is its own process with its own local Ray (a logical CPU per worker and 2 spare, at least 4; one logical
GPU per worker; Ray Data's checkpoint filter needs the spare CPUs, FACTS.md), so that a run can be killed like a
real job:
- ours: `jobs.generate`, one worker per logical GPU with 1 CPU each;
- Ray Data: `read_parquet`, `repartition` (one block per 64 prompts, our shard size: without it one actor did
  all the work, FACTS.md), `map_batches` with an actor pool (`compute=ActorPoolStrategy`, 1 GPU and 1 CPU per actor, as
  ours) running the same `instaflow.models.Student`, then `write_webdataset`, with `DataContext.checkpoint_config`
  on (id column `id`, in S3) so that it resumes. Two variants: JPEG encoding inside the actor, or in a
  separate CPU stage after it; both are measured and the faster one is the baseline.

With `--device simulated`, both run tests/bench/simulated.py's stand-in at 512x512 instead of the tiny model: a
device that takes a fixed time per image and frees the CPU, as a GPU does, so the pipelines' host work can
overlap it; on the tiny model the "device" is this machine's CPU, which the host work shares.

Throughput is prompts over the job's time after Ray started (worker start and model load included, for both;
Ray Data writes its files in bursts, so output timestamps do not give it a steady-state rate). The systems run
in turn, `--repeats` rounds, and medians are compared.
Resume: a run is SIGKILLed (with its Ray) once half its output is written, then run again on the same output;
the cost is the killed run's time plus the re-run's, minus an uninterrupted run's. Every output is checked for
each prompt exactly once.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import (  # noqa: E402
    CpuMeter,
    Figures,
    build_tiny_models,
    default_out,
    local_ray,
    pyarrow_s3,
    s3_server,
    s3_storage_options,
    start_child,
    write_prompt_files,
    write_result,
)

SCRIPT = Path(__file__).resolve()
SPARE_LOGICAL_CPUS = 2  # beside one per worker, at least 4 in all: Ray Data's read, write and checkpoint tasks
JOB_SEED = 0
SYSTEMS = ("ours", "raydata-in-actor", "raydata-encode-stage")


# ------------------------------------------------------------------------------------------- inside a child


class Generator:
    """Ray Data's map_batches actor: the engine's own student (or the stand-in of tests/bench/simulated.py when
    `device_ms` is set) and seeds, so that both systems do the same sampling work."""

    def __init__(self, model_dir: str, size: int, encode: bool, device_ms: float):
        from instaflow.loading import ComponentCache, Runtime
        from instaflow.models import Settings, Student

        if device_ms:
            from tests.bench.simulated import stand_in_student

            self.student = stand_in_student(Path(model_dir), size, device_ms / 1000)
        else:
            runtime = Runtime.default("float32", False, device="cpu")
            self.student = Student(ComponentCache(runtime).load(model_dir), Settings(1, 0.0, size, size))
        self.encode = encode

    def __call__(self, batch: dict) -> dict:
        from instaflow.models import PromptBatch
        from pipeline.reader import derive_seed

        keys, prompts = [str(k) for k in batch["id"]], [str(p) for p in batch["prompt"]]
        seeds = [derive_seed(JOB_SEED, key) for key in keys]
        batch = PromptBatch(prompts, seeds, [None] * len(keys))
        self.student.prepare(batch)
        pixels = self.student.generate(batch).pixels.numpy()
        out = {"id": keys, "__key__": keys, "txt": prompts,
               "json": [json.dumps({"key": k, "prompt": p, "seed": s}) for k, p, s in zip(keys, prompts, seeds)]}
        return out | ({"jpg": encode_jpegs({"pixels": pixels})["jpg"]} if self.encode else {"pixels": pixels})


def encode_jpegs(batch: dict) -> dict:
    """JPEG at quality 95, as the engine writes (pipeline.writers.encode_image)."""
    from pipeline.writers import encode_image

    out = {k: v for k, v in batch.items() if k != "pixels"}
    out["jpg"] = [encode_image(pixels, "jpeg") for pixels in batch["pixels"]]
    return out


def child_raydata(args) -> dict:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    pafs = pyarrow_s3(args.endpoint)
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=args.checkpoint,
                                                 override_filesystem=pafs, delete_checkpoint_on_success=False)
    context.enable_progress_bars = False
    in_actor = args.system == "raydata-in-actor"
    started = time.perf_counter()
    ds = ray.data.read_parquet(args.prompts, filesystem=pafs)
    ds = ds.repartition(args.blocks)
    ds = ds.map_batches(Generator, fn_constructor_args=(args.model, args.size, in_actor, args.device_ms),
                        batch_size=args.batch, compute=ray.data.ActorPoolStrategy(size=args.workers), num_gpus=1,
                        num_cpus=1)
    if not in_actor:
        ds = ds.map_batches(encode_jpegs, batch_size=args.batch, num_cpus=0.5)
    ds.write_webdataset(args.output, filesystem=pafs, encoder=None)  # the JPEGs are already bytes
    return {"job_s": time.perf_counter() - started}


def child_ours(args) -> dict:
    """The command line; with a simulated device, the same job through `run_job` with stand-in workers."""
    from jobs import generate

    started = time.perf_counter()
    if args.device_ms:
        from tests.bench.common import timed_pools
        from tests.bench.simulated import SimulatedDevice, SimulatedWorker
        from pipeline.job import run_job
        from pipeline.spec import JobSpec

        spec = JobSpec(prompts=f"s3://{args.prompts}", output=f"s3://{args.output}", model=args.model,
                       height=args.size, width=args.size, dtype="float32", device="gpu", batch_size=args.batch,
                       rows_per_shard=args.rows_per_block, num_workers=args.workers, cpus_per_worker=1,
                       seed=JOB_SEED, storage_options=s3_storage_options(args.endpoint))
        device = SimulatedDevice(image_s=args.device_ms / 1000)
        if not run_job(spec, make_pool=timed_pools([], SimulatedWorker, device), show_progress=False).complete:
            raise SystemExit("the simulated job did not complete")
        return {"job_s": time.perf_counter() - started}
    status = generate.main([
        "--prompts", f"s3://{args.prompts}", "--output", f"s3://{args.output}", "--model", args.model,
        "--height", str(args.size), "--width", str(args.size), "--dtype", "float32", "--device", "gpu",
        "--batch-size", str(args.batch), "--rows-per-shard", str(args.rows_per_block), "--num-workers",
        str(args.workers), "--cpus-per-worker", "1", "--seed", str(JOB_SEED), "--storage-options",
        json.dumps(s3_storage_options(args.endpoint)), "--no-progress",
    ])
    if status != 0:
        raise SystemExit(f"jobs.generate exited {status}")
    return {"job_s": time.perf_counter() - started}


def child_main(args) -> int:
    logical_cpus = max(4, args.workers + SPARE_LOGICAL_CPUS)
    with local_ray(logical_cpus, args.workers, workdir=None, address=args.ray_address):
        result = child_ours(args) if args.system == "ours" else child_raydata(args)
    write_result(args.result, result)
    return 0


# ---------------------------------------------------------------------------------------------- the driver


class Comparison:
    def __init__(self, s3, model_dir: Path, args, workdir: Path, figures: Figures):
        self.s3, self.fs, self.model_dir, self.args, self.workdir = s3, s3.fs(), model_dir, args, workdir
        self.figures = figures
        self.prompts = f"{s3.bucket}/prompts"
        write_prompt_files(self.fs, self.prompts, num_files=8, rows_per_file=args.prompts // 8,
                           row_group_rows=args.rows_per_block)
        self.blocks = args.prompts // args.rows_per_block

    def start(self, system: str, name: str):
        a = self.args
        return start_child(SCRIPT, [
            "child", system, "--endpoint", self.s3.endpoint_url, "--prompts", self.prompts,
            "--output", f"{self.s3.bucket}/{name}/out", "--checkpoint", f"{self.s3.bucket}/{name}/checkpoint",
            "--model", str(self.model_dir), "--size", str(a.size), "--batch", str(a.batch), "--device-ms",
            str(a.device_ms if a.device == "simulated" else 0), "--workers",
            str(a.workers), "--blocks", str(self.blocks), "--rows-per-block", str(a.rows_per_block),
            *(["--ray-address", a.ray_address] if a.ray_address else [])], self.workdir, name)

    def written(self, system: str, name: str) -> int:
        """Output files that count as done: our committed markers, Ray Data's tars."""
        pattern = "*.stats.json" if system == "ours" else "*.tar"
        self.fs.invalidate_cache()
        return len(self.fs.glob(f"{self.s3.bucket}/{name}/out/{pattern}"))

    def keys(self, system: str, name: str) -> list[str]:
        """Every sample key in the output, once per time it was written."""
        root = f"{self.s3.bucket}/{name}/out"
        self.fs.invalidate_cache()
        if system == "ours":
            import pyarrow.parquet as pq

            from pipeline.commit import committed_shards

            keys = []
            for marker in committed_shards(self.fs, root).values():
                for file in marker["files"]:
                    if file.endswith(".parquet"):
                        keys += pq.read_table(f"{root}/{file}", filesystem=self.fs, columns=["key"])["key"].to_pylist()
            return keys
        keys = []
        for path in self.fs.glob(f"{root}/*.tar"):
            with tarfile.open(fileobj=io.BytesIO(self.fs.cat_file(path))) as tar:
                keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
        return keys

    def check_output(self, system: str, name: str) -> dict:
        keys = self.keys(system, name)
        return {"rows_written": len(keys), "distinct_keys": len(set(keys)), "duplicates": len(keys) - len(set(keys)),
                "missing": self.args.prompts - len(set(keys))}

    def full_run(self, system: str, repeat: int) -> dict:
        name = f"{system}-full-{repeat}"
        with CpuMeter() as meter:
            child = self.start(system, name)
            outputs = OutputTimes(lambda: self.written(system, name), self.blocks, child.started)
            result = child.wait(self.args.timeout_s)
            outputs.stop()
        figures = {**result, "samples_per_s": self.args.prompts / result["job_s"], **self.check_output(system, name),
                   **outputs.phases(result["wall_s"], self.args.rows_per_block),
                   **cpu_ms_per_prompt(meter, self.args.prompts)}
        a = self.args
        if a.device == "simulated":
            limit = a.workers * 1000 / a.device_ms
            figures |= {"device_ms": a.device_ms, "limit_per_s": limit,
                        "fraction_of_limit": figures["samples_per_s"] / limit}
        self.figures.add(f"throughput: {system}", repeat=repeat, device=a.device, prompts=a.prompts, size=a.size,
                         workers=a.workers, batch=a.batch, **figures)
        return figures

    def killed_and_resumed(self, system: str, full: dict) -> None:
        name = f"{system}-resume"
        target = self.blocks // 2
        with CpuMeter() as meter:
            child = self.start(system, name)
            while self.written(system, name) < target:
                if child.process.poll() is not None:
                    raise RuntimeError(f"{system} finished before it could be killed; see {child.log_path}")
                time.sleep(0.2)
            killed_at = child.kill()
            done_at_kill = self.written(system, name)
            rerun_child = self.start(system, name)
            rerun = rerun_child.wait(self.args.timeout_s)
        self.figures.add(
            f"resume after a kill at 50%: {system}", prompts=self.args.prompts, killed_at_s=killed_at,
            done_at_kill=done_at_kill / self.blocks, rerun_wall_s=rerun["wall_s"], rerun_job_s=rerun["job_s"],
            full_wall_s=full["wall_s"], resume_cost_s=killed_at + rerun["wall_s"] - full["wall_s"],
            lock_wait_s=lock_wait_s(rerun_child.log_path) if system == "ours" else None,
            **cpu_ms_per_prompt(meter, self.args.prompts), **self.check_output(system, name))


class OutputTimes:
    """When a run's first and last output files appeared (polled every `poll_s`, seconds from its process start):
    the whole job split into start-up (imports, Ray, model load, the first unit), the steady middle, and the tail
    (the last file to the process's exit: Ray Data's checkpoint and both systems' shutdown)."""

    def __init__(self, count: Callable[[], int], total: int, started: float, poll_s: float = 0.5):
        self.count, self.total, self.started, self.poll_s = count, total, started, poll_s
        self.first = self.last = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s) and not self._poll():
            pass

    def _poll(self) -> bool:
        written, now = self.count(), time.perf_counter() - self.started
        if written and self.first is None:
            self.first = now
        if written >= self.total and self.last is None:
            self.last = now
        return self.last is not None

    def stop(self) -> None:
        """After the run's exit: a last look, for a run that ended between two polls."""
        self._stop.set()
        self._thread.join()
        self._poll()

    def phases(self, wall_s: float, rows_per_file: int) -> dict:
        if self.first is None or self.last is None:
            return {}
        first, last = min(self.first, wall_s), min(self.last, wall_s)  # seen only by the look after the exit
        steady = (self.total - 1) * rows_per_file / (last - first) if last > first else None
        return {"first_output_s": round(first, 1), "last_output_s": round(last, 1),
                "after_last_output_s": round(wall_s - last, 1),
                "steady_samples_per_s": round(steady, 1) if steady else None}


def lock_wait_s(log: Path) -> float:
    """How long our re-run watched the killed run's output lock before taking it over, from its log (the lock is
    stale once unchanged for its lease, `--lock-lease`, 120 s by default); 0 if it did not wait."""
    stamps = {}
    for line in log.read_text(errors="replace").splitlines():
        for event, text in (("watch", "watching it for up to"), ("take", "taking over")):
            if text in line and event not in stamps:
                stamps[event] = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamps["take"] - stamps["watch"] if len(stamps) == 2 else 0.0


def cpu_ms_per_prompt(meter: CpuMeter, prompts: int) -> dict:
    """Where the CPU went, per prompt, by role (run drivers, workers, Ray's other tasks and daemons, the S3
    server), and what other jobs on the machine used meanwhile."""
    per_prompt = {f"cpu_ms_per_prompt_{key.removeprefix('cpu_s_')}": 1000 * value / prompts
                  for key, value in meter.result.items() if key.startswith("cpu_s_")}
    return per_prompt | {"other_jobs_cores": meter.result["other_jobs_cores"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return child_main(child_parser().parse_args(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8192, help="a multiple of 8 times --rows-per-block")
    parser.add_argument("--rows-per-block", type=int, default=64,
                        help="our rows per shard and Ray Data's rows per block: the same unit of work and output file")
    parser.add_argument("--device", choices=("tiny", "simulated"), default="tiny",
                        help="the tiny model on the CPU, or tests/bench/simulated.py's stand-in device")
    parser.add_argument("--device-ms", type=float, default=1000 / 109.1,
                        help="the stand-in's time per image (default: the H200's, compiled)")
    parser.add_argument("--size", type=int, help="default 64 for the tiny model, 512 for the stand-in")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the systems; medians are compared")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="ours first, then Ray Data variants (none: ours alone)")
    parser.add_argument("--ray-address", help="run every step on this Ray instead of a fresh one each")
    parser.add_argument("--no-resume", action="store_true", help="throughput only")
    parser.add_argument("--quick", action="store_true", help="128 prompts once, no resume: the test's setting")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.device == "tiny" else 512)
    if args.quick:
        args.prompts, args.rows_per_block, args.batch, args.no_resume, args.repeats = 128, 16, 8, True, 1
    if args.systems.split(",")[0] != "ours" or not set(args.systems.split(",")[1:]) <= set(SYSTEMS[1:]):
        parser.error(f"--systems: ours, then any of {SYSTEMS[1:]}")
    if args.prompts % (8 * args.rows_per_block):
        parser.error("--prompts must be a multiple of 8 times --rows-per-block (8 files of whole blocks)")
    figures = Figures("raydata", args.out or default_out())
    figures.machine(argv)
    with tempfile.TemporaryDirectory(prefix="bench-raydata-") as tmp, s3_server() as s3:
        comparison = Comparison(s3, build_tiny_models(Path(tmp))["instaflow"], args, Path(tmp), figures)
        systems = args.systems.split(",")
        runs = {system: [] for system in systems}
        for repeat in range(args.repeats):  # in turn, so that other jobs' load falls on every system
            for system in systems:
                runs[system].append(comparison.full_run(system, repeat))
        median = {system: {key: statistics.median(run[key] for run in runs[system])
                           for key in ("samples_per_s", "wall_s", "job_s")}
                  for system in systems}
        for system in systems:
            figures.add(f"median: {system}", repeats=args.repeats, **median[system])
        best = max(systems[1:], key=lambda system: median[system]["samples_per_s"], default=None)
        if best:
            figures.add("ours over the best Ray Data pipeline (medians)", best=best, target=1.5,
                        ratio=median["ours"]["samples_per_s"] / median[best]["samples_per_s"])
        if not args.no_resume:
            for system in filter(None, ("ours", best)):
                comparison.killed_and_resumed(system, median[system])
    return 0


def child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="one run, in its own process and Ray")
    parser.add_argument("system", choices=SYSTEMS)
    for name in ("--endpoint", "--prompts", "--output", "--checkpoint", "--model", "--result"):
        parser.add_argument(name, required=True)
    for name in ("--size", "--batch", "--workers", "--blocks", "--rows-per-block"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--device-ms", type=float, default=0.0, help="the stand-in's time per image; 0: tiny model")
    parser.add_argument("--ray-address")
    return parser


if __name__ == "__main__":
    from tests.bench import raydata  # by module name, so that Ray ships its classes by reference

    sys.exit(raydata.main())
