"""Benchmark 3: the engine against a plain single-process loop, on the tiny model and local files.

    python tests/bench/plainloop.py [--prompts 4096] [--size 64] [--batch 32] [--out DIR]
    python tests/bench/plainloop.py --quick      # a few hundred prompts: the test runs this

The plain loop is what a diffusers user writes (tests/bench/gpu.py's `plain_loop_end_to_end`): read the Parquet
prompts, run the one-step loop through a `StableDiffusionPipeline` built from the model folder, save each image
as a JPEG file (quality 95). It runs with torch's default threads (2, this machine's cores) and with 1.

Ours: `run_job` on a local Ray, `--device cpu` (what a machine without GPUs resolves to), the engine's own
ShardWorker (`ray_worker_factory`) with its defaults, the same Parquet file to webdataset shards on local disk: one worker with 2 CPUs, one with 1 CPU, and two with 1 CPU
each. Rates are steady-state (start-up excluded, as the plain loop's model load is); the wall time of each whole
run is given beside them. The settings run in turn, `--repeats` rounds, and medians are compared: on a shared
2-core machine, torch's threads slow down by an order of magnitude while other jobs hold a core.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fsspec  # noqa: E402
import torch  # noqa: E402

from tests.bench.common import CpuMeter, Figures, build_tiny_models, default_out, local_ray, timed_pools, \
    write_prompt_files  # noqa: E402
from tests.bench.gpu import plain_loop_end_to_end  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.spec import JobSpec  # noqa: E402

OURS = ((1, 2), (1, 1), (2, 1))  # (workers, cpus per worker)


def plain_pipeline_from(folder: Path):
    """A StableDiffusionPipeline from a model folder's components, as a diffusers user loads InstaFlow (its
    model index names a custom pipeline class, so the parts are loaded one by one)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_loop(model_dir: Path, prompts_file: Path, size: int, batch: int, threads: int, out: Path) -> dict:
    """The plain loop with `threads` torch threads; its rate leaves out the model load, as gpu.py's does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with CpuMeter() as meter:
            started = time.perf_counter()
            pipe = plain_pipeline_from(model_dir)
            load_s = time.perf_counter() - started
            context = SimpleNamespace(prompts_file=prompts_file, worker_batch=batch, size=size,
                                      device=torch.device("cpu"))
            rate = plain_loop_end_to_end(context, pipe, out)
            wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {"samples_per_s": rate, "load_s": load_s, "wall_s": wall,
            "other_jobs_cores": meter.result["other_jobs_cores"]}


def ours(model_dir: Path, prompts_file: Path, output: Path, *, size: int, batch: int, rows_per_shard: int,
         workers: int, cpus: int) -> dict:
    """One job through the engine's driver, pool and ShardWorker actors; steady-state rate and whole wall."""
    spec = JobSpec(prompts=str(prompts_file), output=str(output), model=str(model_dir), height=size, width=size,
                   batch_size=batch, rows_per_shard=rows_per_shard, dtype="float32", num_workers=workers,
                   cpus_per_worker=cpus, device="cpu")  # what a machine without GPUs resolves "auto" to
    pools: list = []
    with CpuMeter() as meter:
        started = time.perf_counter()
        progress = run_job(spec, make_pool=timed_pools(pools), show_progress=False)
        wall = time.perf_counter() - started
    if not progress.complete:
        raise RuntimeError(f"our job did not complete: {progress.summary()}")
    return {**pools[0].steady_rate(), "wall_s": wall,
            "other_jobs_cores": meter.result["other_jobs_cores"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all settings; medians are compared")
    parser.add_argument("--quick", action="store_true",
                        help="128 prompts in units of 16, one plain setting and one of ours, once: the test's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.plain_threads, args.ours = (2, 1), OURS
    if args.quick:
        args.prompts, args.rows_per_shard, args.batch, args.repeats = 128, 16, 8, 1
        args.plain_threads, args.ours = (1,), ((2, 1),)
    figures = Figures("plainloop", args.out or default_out())
    figures.machine(sys.argv[1:] if argv is None else argv)
    common = {"prompts": args.prompts, "size": args.size, "batch": args.batch}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-plainloop-") as tmp:
        workdir = Path(tmp)
        model_dir = build_tiny_models(workdir)["instaflow"]
        [prompts_file] = write_prompt_files(fsspec.filesystem("file"), str(workdir / "prompts"), 1, args.prompts,
                                            row_group_rows=args.rows_per_shard // 4)
        runs = {f"plain loop, {threads} torch threads": functools.partial(
                    plain_loop, model_dir, Path(prompts_file), args.size, args.batch, threads)
                for threads in args.plain_threads}
        runs |= {f"ours, {workers} worker(s) with {cpus} cpus each": functools.partial(
                     ours, model_dir, Path(prompts_file), size=args.size, batch=args.batch,
                     rows_per_shard=args.rows_per_shard, workers=workers, cpus=cpus)
                 for workers, cpus in args.ours}
        with local_ray(num_cpus=2, num_gpus=2, workdir=workdir):
            for repeat in range(args.repeats):  # interleaved, so that other jobs' load falls on every setting
                for index, (name, run) in enumerate(runs.items()):
                    result = run(workdir / f"out-{repeat}-{index}")
                    rates.setdefault(name, []).append(result["samples_per_s"])
                    figures.add(name, repeat=repeat, **common, **result)
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in median.items():
        figures.add(f"median: {name}", samples_per_s=value, repeats=args.repeats)
    figures.add("ours over the plain loop (medians)", **ratios(median))
    return 0


def ratios(median: dict[str, float]) -> dict[str, float]:
    """Ours against the plain loop, and two workers against one, among the settings that ran."""
    plain = {threads: median.get(f"plain loop, {threads} torch threads") for threads in (2, 1)}
    ours = {setting: median.get(f"ours, {setting[0]} worker(s) with {setting[1]} cpus each") for setting in OURS}
    best_plain = max(filter(None, plain.values()), default=None)
    best_one_worker = max(filter(None, (ours[1, 2], ours[1, 1])), default=None)
    candidates = {
        "one_worker_2_cpus_over_plain_2_threads": (ours[1, 2], plain[2]),
        "one_worker_1_cpu_over_plain_1_thread": (ours[1, 1], plain[1]),
        "best_one_worker_over_best_plain": (best_one_worker, best_plain),
        "two_workers_over_best_one_worker": (ours[2, 1], best_one_worker),
        "two_workers_over_best_plain": (ours[2, 1], best_plain),
    }
    return {name: a / b for name, (a, b) in candidates.items() if a and b}


if __name__ == "__main__":
    sys.exit(main())
