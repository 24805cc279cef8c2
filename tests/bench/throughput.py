"""Throughput figures: the model layer alone (images/s, pairs/s at a batch size) and whole jobs (samples/s).

    python tests/bench/throughput.py models [--model-dir DIR] [--batch-size 8] [--size 64]
    python tests/bench/throughput.py job [--prompts N] [--workers 2]

Without --model-dir the tiny offline models are built in a temporary folder. Figures are printed, never asserted.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch, Settings, Student, Teacher
from jobs.tiny import build_tiny_models


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up, synchronising CUDA so the time is the device's."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_models(args, models: dict) -> None:
    runtime = Runtime.default(args.dtype, args.compile)
    cache = ComponentCache(runtime)
    size = args.size
    batch = PromptBatch([f"a photo of a red fox number {i}" for i in range(args.batch_size)],
                        list(range(args.batch_size)), [None] * args.batch_size)
    student = Student(cache.load(str(models["instaflow"])), Settings(1, 0.0, size, size))
    teacher = Teacher(cache.load(str(models["sd15"])), "sd", Settings(25, 5.0, size, size))
    print(f"device {runtime.device}, dtype {runtime.dtype}, batch {args.batch_size}, {size}x{size}, "
          f"torch threads {torch.get_num_threads()}")
    for name, fn in (("instaflow images (1 step, decode)", lambda: student.generate(batch).pixels.cpu()),
                     ("sd teacher pairs (25 DPM steps, cfg 5)", lambda: teacher.pairs(batch).latents.cpu())):
        seconds = _timed(fn, args.repeats)
        print(f"{name}: {args.batch_size / seconds:.1f} samples/s ({seconds * 1000:.1f} ms per batch)")


def bench_job(args, models: dict, workdir: Path) -> None:
    from jobs import generate, reflow_pairs

    prompts = workdir / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"a photo of a red fox number {i}" for i in range(args.prompts)]}),
                   prompts, row_group_size=64)
    shared = ["--prompts", str(prompts), "--height", str(args.size), "--width", str(args.size),
              "--rows-per-shard", "64", "--batch-size", str(args.batch_size), "--num-workers", str(args.workers),
              "--no-progress"]
    for name, main, extra in (
        ("images", generate.main, ["--model", str(models["instaflow"])]),
        ("pairs", reflow_pairs.main, ["--teacher", str(models["sd15"])]),
    ):
        started = time.perf_counter()
        status = main([*shared, "--output", str(workdir / name), *extra])
        print(f"job {name}: exit {status}, {args.prompts} samples in {time.perf_counter() - started:.1f}s wall "
              f"(worker start-up included; samples_per_s in the table above counts from the job's start)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("models", "job"))
    parser.add_argument("--model-dir", help="folder with sd15/ and instaflow/ (default: tiny models)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models_root = Path(args.model_dir) if args.model_dir else workdir / "models"
        models = {name: models_root / name for name in ("sd15", "instaflow")}
        if not args.model_dir:
            build_tiny_models(models_root)
        if args.what == "models":
            bench_models(args, models)
        else:
            bench_job(args, models, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
