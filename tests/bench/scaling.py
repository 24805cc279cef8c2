"""Benchmark 4: scaling over simulated GPUs on a multi-node `ray.cluster_utils.Cluster`, all on 127.0.0.1.

    python tests/bench/scaling.py [--gpus 1,2,4,8] [--device-ms 50] [--size 512] [--out DIR]
    python tests/bench/scaling.py --quick      # 2 GPUs on 2 nodes, 64x64: the test runs this

N simulated GPUs sit on min(N, 4) nodes (1 GPU on 1 node, 2 on 2, 4 on 4, 8 on 4 nodes of 2), one worker per
GPU with 1 CPU each, the engine's driver and pool, and the stand-in device of tests/bench/simulated.py. Units are
handed out once every worker has started, and each worker gets the same number of units (weak scaling), from one Parquet file on local disk to webdataset shards (JPEG)
on local disk. The device time per image is long enough that 8 workers' host work (about 4 CPU-ms per 512x512
image, measured by tests/bench/simulated.py) stays near half of this machine's 2 cores. Throughput is the steady
state (every worker in its stride), over linear: N times the 1-GPU figure, and N times the device's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fsspec  # noqa: E402

from tests.bench.common import CpuMeter, Figures, build_tiny_models, default_out, timed_pools, \
    write_prompt_files  # noqa: E402
from tests.bench.simulated import SimulatedDevice, SimulatedWorker  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.spec import JobSpec  # noqa: E402

MAX_NODES = 4
CPUS_PER_WORKER = 1


def layout(num_gpus: int) -> tuple[int, int]:
    """(nodes, GPUs per node)."""
    nodes = min(num_gpus, MAX_NODES)
    if num_gpus % nodes:
        raise ValueError(f"{num_gpus} GPUs do not split evenly over {nodes} nodes")
    return nodes, num_gpus // nodes


def run_on_cluster(num_gpus: int, spec: JobSpec, device: SimulatedDevice, workdir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    nodes, per_node = layout(num_gpus)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="r", dir=workdir)  # short: socket paths
    node_args = {"num_cpus": per_node * CPUS_PER_WORKER, "num_gpus": per_node}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=node_args | {"include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cluster_start_s = time.perf_counter() - started
        pools: list = []
        with CpuMeter() as meter:
            make_pool = timed_pools(pools, SimulatedWorker, device, all_ready_first=True)
            progress = run_job(spec, make_pool=make_pool, show_progress=False)
        if not progress.complete:
            raise RuntimeError(f"the job on {num_gpus} GPUs did not complete: {progress.summary()}")
        node_ids = {stats["worker"]["node_id"] for stats in _markers(spec.output)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {**pools[0].steady_rate(), "nodes": nodes, "gpus_per_node": per_node, "nodes_used": len(node_ids),
            "cluster_start_s": cluster_start_s, "job_wall_s": meter.result["wall_s"], "samples": progress.total_samples,
            "machine_busy_cores": meter.result["machine_busy_cores"], "ours_cores": meter.result["ours_cores"],
            "other_jobs_cores": meter.result["other_jobs_cores"]}


def _markers(output: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in Path(output).glob("*.stats.json")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4,8")
    parser.add_argument("--device-ms", type=float, default=50.0, help="simulated device time per image")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--units-per-worker", type=int, default=12)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 GPUs on 2 nodes at 64x64: the test's setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.gpus, args.device_ms, args.size, args.units_per_worker, args.rows_per_shard, args.batch = \
            "2", 5.0, 64, 8, 8, 4
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    figures = Figures("scaling", args.out or default_out())
    figures.machine(sys.argv[1:] if argv is None else argv)
    device = SimulatedDevice(image_s=args.device_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = Path(tmp)
        model_dir = build_tiny_models(workdir)["instaflow"]
        rates = {}
        for num_gpus in gpu_counts:
            rows = num_gpus * args.units_per_worker * args.rows_per_shard
            [prompts] = write_prompt_files(fsspec.filesystem("file"), str(workdir / f"prompts-{num_gpus}"), 1, rows,
                                           row_group_rows=max(1, args.rows_per_shard // 4))
            spec = JobSpec(prompts=prompts, output=str(workdir / f"out-{num_gpus}"), model=str(model_dir),
                           height=args.size, width=args.size, batch_size=args.batch,
                           rows_per_shard=args.rows_per_shard, dtype="float32", num_workers=num_gpus,
                           cpus_per_worker=CPUS_PER_WORKER)
            result = run_on_cluster(num_gpus, spec, device, workdir)
            rates[num_gpus] = result["samples_per_s"]
            limit = num_gpus * 1000 / args.device_ms
            figures.add(f"{num_gpus} simulated GPUs", gpus=num_gpus, size=args.size, device_ms=args.device_ms,
                        rows_per_shard=args.rows_per_shard, batch=args.batch, **result,
                        over_linear=result["samples_per_s"] / (num_gpus * rates[gpu_counts[0]] / gpu_counts[0]),
                        over_device_limit=result["samples_per_s"] / limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
