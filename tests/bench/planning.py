"""Benchmark 5: planning and resume at scale.

    python tests/bench/planning.py [--parts plan,rerun,digest] [--files 1000] [--rows-per-file 10000] [--out DIR]
    python tests/bench/planning.py --quick      # 20 files, 8 shards: the test runs this

Parts:
- plan: 10 million prompts in 1,000 Parquet files on local disk (row groups of 1,000; written once into
  --data and kept). In a fresh process, as the driver runs them: listing and footers (`list_input_files`),
  units (`plan_units`, 1,000 rows per shard: 10,000 units) and the input fingerprint, then the whole of
  `run_job` up to the moment it asks for workers. Targets: planning under 30 s, the driver's peak under 1 GiB.
- rerun: a finished 1,000-shard job (4 rows per shard, made here by simulated workers, tests/bench/simulated.py) is
  run again with the real command line (`jobs.generate`) in a fresh process, on local disk and on S3 (moto).
  Target: under 10 s, with no model loaded and no worker started. It reports where the time goes (profile).
- digest: what pinning a local model folder costs the driver on every run (`resolve_model_source` reads every
  file to digest it), for a folder the size of SD-1.5's fp32 safetensors. Its files are sparse, so the read
  costs no disk I/O: the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fsspec  # noqa: E402
import psutil  # noqa: E402

from tests.bench.common import CpuMeter, Figures, build_tiny_models, default_out, local_ray, s3_server, start_child, \
    write_prompt_files, write_result  # noqa: E402

SCRIPT = Path(__file__).resolve()
MIB = 2**20
# SD-1.5's fp32 safetensors: UNet, VAE, CLIP text encoder
SD15_WEIGHT_BYTES = {"unet": 3_438_167_536, "vae": 334_643_268, "text_encoder": 492_265_168}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BeforeWorkers(Exception):
    """Raised by the pool factory: the driver got as far as asking for workers."""


def _stop_before_workers(spec, sources, fence, num_units):
    raise BeforeWorkers(num_units)


# ------------------------------------------------------------------------------------------- inside a child


def _since_process_start_s() -> float:
    """The interpreter's start and every import so far (torch, Ray, pipeline: what the CLI imports too)."""
    return time.time() - psutil.Process().create_time()


def child_plan(args) -> dict:
    from pipeline.job import run_job
    from pipeline.plan import input_fingerprint, list_input_files, plan_units
    from pipeline.spec import JobSpec
    from pipeline.storage import filesystem

    result = {"startup_and_imports_s": _since_process_start_s(), "rss_after_imports_mib": _peak_rss_mib()}
    fs, path = filesystem(args.prompts)
    clock = time.perf_counter()
    files = list_input_files(fs, path)
    result["list_and_footers_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    units = plan_units(files, args.rows_per_shard)
    result["plan_units_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    input_fingerprint(files)
    result["fingerprint_s"] = time.perf_counter() - clock
    result |= {"planning_s": result["list_and_footers_s"] + result["plan_units_s"] + result["fingerprint_s"],
               "files": len(files), "rows": sum(f.num_rows for f in files), "units": len(units),
               "peak_rss_after_planning_mib": _peak_rss_mib()}
    del files, units
    spec = JobSpec(prompts=args.prompts, output=args.output, model=args.model, rows_per_shard=args.rows_per_shard,
                   device="gpu", dtype="float32")
    clock = time.perf_counter()
    try:
        run_job(spec, make_pool=_stop_before_workers, show_progress=False)
        raise RuntimeError("run_job never asked for workers")
    except BeforeWorkers as stop:
        result["units_asked_for"] = stop.args[0]
    result["run_job_until_workers_s"] = time.perf_counter() - clock
    result["driver_peak_rss_mib"] = _peak_rss_mib()
    return result


def child_rerun(args) -> dict:
    """The command line a user re-runs, profiled; counts model loads and whether Ray was started."""
    import ray

    from instaflow.loading import ComponentCache
    from jobs import generate

    startup_s = _since_process_start_s()
    loads = []
    load = ComponentCache.load
    ComponentCache.load = lambda self, *a, **k: loads.append(a) or load(self, *a, **k)
    profile = cProfile.Profile()
    clock = time.perf_counter()
    status = profile.runcall(generate.main, args.argv.split())
    run_s = time.perf_counter() - clock
    ours = [(entry, numbers[3]) for entry, numbers in pstats.Stats(profile).stats.items()
            if any(f"/{package}/" in entry[0] for package in ("pipeline", "instaflow", "jobs"))]
    top = [f"{seconds:.3f}s {Path(file).parent.name}/{Path(file).name}:{line}({function})"
           for (file, line, function), seconds in sorted(ours, key=lambda item: -item[1])[:10]]
    return {"exit_status": status, "startup_and_imports_s": startup_s, "run_s": run_s, "models_loaded": len(loads),
            "ray_started": ray.is_initialized(), "peak_rss_mib": _peak_rss_mib(), "profile_cumulative": top}


CHILDREN = {"child-plan": child_plan, "child-rerun": child_rerun}


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result")
    parser.add_argument("--prompts")
    parser.add_argument("--output")
    parser.add_argument("--model")
    parser.add_argument("--rows-per-shard", type=int)
    parser.add_argument("--argv", help="the command line of jobs.generate, for child-rerun")
    args = parser.parse_args(argv[1:])
    write_result(args.result, CHILDREN[argv[0]](args))
    return 0


# ---------------------------------------------------------------------------------------------- the driver


def ensure_prompts(folder: Path, num_files: int, rows_per_file: int) -> float:
    """Writes the prompt files once; a `_complete` file (which planning ignores) says they are all there."""
    done = folder / "_complete"
    expected = f"{num_files} {rows_per_file}"
    if done.exists() and done.read_text() == expected:
        return 0.0
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    write_prompt_files(fsspec.filesystem("file"), str(folder), num_files, rows_per_file, row_group_rows=1000)
    done.write_text(expected)
    return time.perf_counter() - started


def part_plan(args, workdir: Path, models: dict, figures: Figures) -> None:
    folder = Path(args.data) / f"prompts-{args.files}x{args.rows_per_file}"
    write_s = ensure_prompts(folder, args.files, args.rows_per_file)
    with CpuMeter() as meter:
        result = start_child(SCRIPT, ["child-plan", "--prompts", str(folder), "--output", str(workdir / "plan-out"),
                                      "--model", str(models["instaflow"]), "--rows-per-shard", "1000"],
                             workdir, "plan").wait(args.timeout_s)
    figures.add("plan: list, footers, units, fingerprint", prompts_written_s=write_s, **result,
                other_jobs_cores=meter.result["other_jobs_cores"], target_planning_s=30, target_peak_mib=1024)


def finished_job(root: str, storage_options: dict, models: dict, workdir: Path, shards: int) -> tuple:
    """A job of `shards` shards of 4 rows, run to the end by simulated workers; returns its spec and time."""
    from tests.bench.simulated import SimulatedDevice, simulated_job
    from pipeline.spec import JobSpec
    from pipeline.storage import filesystem

    fs, base = filesystem(root, storage_options)
    [prompts] = write_prompt_files(fs, f"{base}/rerun-prompts", 1, 4 * shards, row_group_rows=4)
    spec = JobSpec(prompts=fs.unstrip_protocol(prompts), output=f"{root}/rerun-out", model=str(models["instaflow"]),
                   height=64, width=64, batch_size=4, rows_per_shard=4, dtype="float32", device="gpu",
                   num_workers=2, cpus_per_worker=1, storage_options=storage_options)
    with local_ray(num_cpus=2, num_gpus=2, workdir=workdir):
        result = simulated_job(spec, SimulatedDevice(image_s=0.0))
    return spec, result["job_wall_s"]


def rerun_command(spec) -> str:
    import json

    args = ["--prompts", spec.prompts, "--output", spec.output, "--model", spec.model, "--height", "64",
            "--width", "64", "--batch-size", "4", "--rows-per-shard", "4", "--dtype", "float32", "--device", "gpu",
            "--num-workers", "2", "--cpus-per-worker", "1", "--no-progress"]
    if spec.storage_options:
        args += ["--storage-options", json.dumps(spec.storage_options, separators=(",", ":"))]
    return " ".join(args)


def part_rerun(args, workdir: Path, models: dict, figures: Figures) -> None:
    for storage in args.storage.split(","):
        with (s3_server() if storage == "s3" else contextlib.nullcontext()) as s3:
            root = s3.url("jobs") if s3 else str(workdir / "local-jobs")
            options = s3.storage_options if s3 else {}
            spec, make_s = finished_job(root, options, models, workdir, args.shards)
            with CpuMeter() as meter:
                result = start_child(SCRIPT, ["child-rerun", "--argv", rerun_command(spec)], workdir,
                                     f"rerun-{storage}").wait(args.timeout_s)
            figures.add(f"rerun of a finished {args.shards}-shard job, {storage}", shards=args.shards,
                        finished_job_made_s=make_s, **result, target_s=10,
                        other_jobs_cores=meter.result["other_jobs_cores"])


def part_digest(args, workdir: Path, models: dict, figures: Figures) -> None:
    from pipeline import model_source
    from pipeline.model_source import resolve_model_source

    folder = workdir / "sd15-sized"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{}")
    scale = args.digest_scale
    for name, size in SD15_WEIGHT_BYTES.items():
        with open(folder / name / "model.safetensors", "wb") as f:
            f.truncate(int(size * scale))  # sparse: no disk space, no disk reads
    total = sum(SD15_WEIGHT_BYTES.values()) * scale
    saved_cache = os.environ.get(model_source.CACHE_ENV)
    os.environ[model_source.CACHE_ENV] = str(workdir / "model-cache")  # where the file digests are kept
    try:
        clock = time.perf_counter()
        first = resolve_model_source(str(folder), "float32")
        seconds = time.perf_counter() - clock
        figures.add("digest of a local model folder, SD-1.5 fp32 size (sparse files)", bytes=int(total),
                    seconds=seconds, mib_per_s=total / MIB / seconds)
        model_source._digests.clear()  # as the next run's driver starts: only the digests kept on disk
        clock = time.perf_counter()
        again = resolve_model_source(str(folder), "float32")
        figures.add("the same folder pinned again by the next run (digests kept in the model cache)",
                    seconds=time.perf_counter() - clock, same_revision=again.revision == first.revision)
    finally:  # run in-process by the tests: later jobs in that process use the usual model cache
        if saved_cache is None:
            os.environ.pop(model_source.CACHE_ENV, None)
        else:
            os.environ[model_source.CACHE_ENV] = saved_cache


PARTS = {"plan": part_plan, "rerun": part_rerun, "digest": part_digest}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        return child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=1000, help="shards of the finished job that is re-run")
    parser.add_argument("--storage", default="local,s3", help="where the re-run job lives: local, s3 or both")
    parser.add_argument("--digest-scale", type=float, default=1.0, help="fraction of SD-1.5's size to digest")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "instaflow-bench-data"),
                        help="where the prompt files are written once and kept")
    parser.add_argument("--quick", action="store_true", help="20 files, 8 shards, 1%% of the digest: the test's")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.rows_per_file, args.shards, args.digest_scale, args.storage = 20, 2000, 8, 0.01, "local"
    parts = [p for p in args.parts.split(",") if p]
    figures = Figures("planning", args.out or default_out())
    figures.machine(argv)
    with tempfile.TemporaryDirectory(prefix="bench-planning-") as tmp:
        workdir = Path(tmp)
        if args.quick:
            args.data = str(workdir / "data")
        models = build_tiny_models(workdir)
        for part in parts:
            PARTS[part](args, workdir, models, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
