"""The GPU benchmark's code paths on the CPU (tiny models), so the script is ready whenever a GPU is at hand."""

import json

import pytest

from tests.bench import gpu

pytestmark = pytest.mark.slow  # jobs, clusters or benchmarks run as processes


def test_gpu_benchmark_runs_every_part_on_tiny_models(tmp_path):
    parts = [part for part in gpu.PARTS if part not in ("peak", "compile")]  # no CUDA; compile takes minutes here
    assert gpu.main(["--tiny", "--parts", ",".join(parts), "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    failed = [row for row in rows if row["name"] == "FAILED"]
    assert not failed, failed
    figures = {row["part"] for row in rows if any(k.endswith("_per_s") for k in row)}
    assert figures >= {"calibrate", "student", "teacher", "baseline", "plainloop", "worker", "options", "stages"}
    stages = [row for row in rows if row["part"] == "stages" and row["name"].startswith("ShardWorker")]
    assert len(stages) == 3 and all(row["samples"] > 0 for row in stages)
    worker = [row for row in rows if row["part"] == "worker" and "samples_per_s" in row]
    assert len(worker) == 3 and all(row["samples"] > 0 and row["samples_per_s"] > 0 for row in worker)
    flops = {row["name"]: row for row in rows if row["part"] == "flops"}
    assert flops["per image"]["tflop"] > flops["unet"]["tflop_per_sample"] > 0
