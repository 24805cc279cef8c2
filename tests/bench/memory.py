"""Benchmark 6: a worker's memory over a run 10 times longer.

    python tests/bench/memory.py [--units 6] [--factor 10] [--size 512] [--out DIR]
    python tests/bench/memory.py --quick      # 64x64, 1 and 2 units: the test runs this

One simulated worker (tests/bench/simulated.py; 2 CPUs) writes images (JPEG) and reflow pairs in the same pass, from
Parquet in S3 (moto) to shards in S3, with a short device time so that the host works flat out. The same job
runs with `units` and with `factor` times as many units. Reported: the worker's peak resident memory in each
run (`ru_maxrss`), its resident memory as each unit completes, at every tenth of the run, and at the end
glibc's heap: bytes in use and bytes held free (a leak grows the first, fragmentation the second).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import Figures, build_tiny_models, default_out, local_ray, s3_server, write_prompt_files  # noqa: E402
from tests.bench.simulated import SimulatedDevice, simulated_job  # noqa: E402
from pipeline.spec import JobSpec  # noqa: E402


GROWTH_KEYS = ("malloc_in_use_mib", "malloc_held_free_mib", "python_objects")  # live heap, held free, objects


def deciles(values: list[float]) -> list[float]:
    """The values at 10%, 20%, ... 100% of the run."""
    return [values[max(0, round(len(values) * k / 10) - 1)] for k in range(1, 11)]


def run(s3, model_dir: Path, units: int, args, name: str) -> dict:
    fs = s3.fs()
    rows = units * args.rows_per_shard
    write_prompt_files(fs, f"{s3.bucket}/prompts-{name}", 2, rows // 2,
                       row_group_rows=max(1, args.rows_per_shard // 4))
    spec = JobSpec(prompts=s3.url(f"prompts-{name}"), output=s3.url(f"out-{name}"), tasks=("images", "pairs"),
                   model=str(model_dir), teacher=str(model_dir), height=args.size, width=args.size,
                   batch_size=args.batch, rows_per_shard=args.rows_per_shard, dtype="float32", num_workers=1,
                   cpus_per_worker=2, storage_options=s3.storage_options)
    device = SimulatedDevice(image_s=args.device_ms / 1000, pair_s=args.device_ms / 1000)
    result = simulated_job(spec, device)
    after_units = result["rss_after_each_unit_mib"]
    return {"units": units, "samples": result["samples"], "job_wall_s": result["job_wall_s"],
            "worker_peak_rss_mib": result["max_rss_mib"], "rss_after_units_by_decile_mib": deciles(after_units),
            **{key: result[key] for key in GROWTH_KEYS if key in result},
            "rss_growth_second_half_mib": after_units[-1] - after_units[len(after_units) // 2],
            "samples_per_s": result["samples_per_s"], "other_jobs_cores": result["other_jobs_cores"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=6)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device-ms", type=float, default=2.0, help="per image and per pair")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="for the workers, e.g. glibc's MALLOC_ARENA_MAX=2 or MALLOC_MMAP_THRESHOLD_=1048576")
    parser.add_argument("--quick", action="store_true", help="64x64, 1 and 2 units: the test's setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.units, args.factor, args.size, args.rows_per_shard, args.batch = 1, 2, 64, 8, 4
    worker_env = dict(item.split("=", 1) for item in args.env)
    os.environ.update(worker_env)  # the local Ray's workers inherit it
    figures = Figures("memory", args.out or default_out())
    figures.machine(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, s3_server() as s3, \
            local_ray(num_cpus=2, num_gpus=1, workdir=Path(tmp)):
        model_dir = build_tiny_models(Path(tmp))["instaflow"]
        short = run(s3, model_dir, args.units, args, "short")
        setting = {"size": args.size, "rows_per_shard": args.rows_per_shard, "worker_env": worker_env}
        figures.add("short run", **setting, **short)
        long = run(s3, model_dir, args.units * args.factor, args, "long")
        figures.add(f"{args.factor}x longer run", **setting, **long)
        growth = {f"{key}_growth": long[key] - short[key] for key in GROWTH_KEYS if key in long}
        figures.add("long run against short run", peak_ratio=long["worker_peak_rss_mib"] / short["worker_peak_rss_mib"],
                    worker_peak_rss_mib_growth=long["worker_peak_rss_mib"] - short["worker_peak_rss_mib"], **growth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
