"""Each CPU benchmark in tests/bench/ at its smallest setting, so that the scripts cannot rot: they run end to end
and what they measure holds together (every prompt written once, no model loaded on a finished job's re-run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import encoders, memory, planning, plainloop, raydata, simulated
from conftest import start_ray

pytestmark = pytest.mark.slow  # jobs, clusters or benchmarks run as processes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shared_ray(tmp_path_factory):
    """One Ray for the benchmarks that run in this process (each would otherwise start its own)."""
    ray = start_ray(tmp_path_factory, num_cpus=4, num_gpus=2)
    yield ray
    ray.shutdown()


def figures(out: Path, bench: str) -> dict[str, dict]:
    return {row["name"]: row for row in map(json.loads, (out / f"{bench}.jsonl").read_text().splitlines())}


def test_simulated_device(shared_ray, tmp_path):
    assert simulated.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = figures(tmp_path, "simulated")
    images = rows["feed: jpeg eager"]
    assert images["samples"] == images["images_encoded"] == simulated.QUICK.units * simulated.QUICK.rows_per_shard
    # the stand-in holds the device for its time per sample: no run can beat that
    assert 0 < images["samples"] / images["job_wall_s"] <= images["limit_per_s"]
    scored = rows["feed: jpeg eager + scores"]  # the scores stage on stand-in scorers: every image scored, none lost
    assert scored["scores"] == "nsfw,clip" and scored["samples"] == scored["images_encoded"] == images["samples"]
    assert 0 < scored["samples"] / scored["job_wall_s"] <= scored["limit_per_s"] < images["limit_per_s"]
    refined = rows["feed: jpeg eager + refiner"]  # the refiner stage on a stand-in: every refined image stored
    assert refined["samples"] == refined["images_encoded"] == images["samples"]
    floats = rows["feed: jpeg float 2 workers"]  # the decoder's float images post-processed on the host, 2 workers
    # both workers are started; under load the first one ready may take all 4 units before the other is up
    assert floats["workers"] == 2 and 1 <= floats["workers_seen"] <= 2 and floats["cpus_per_worker"] == 1
    assert floats["samples"] == floats["images_encoded"] == images["samples"]
    assert floats["reference_one_thread"]["postprocess_ms_per_image"] > 0
    assert floats["ms_per_sample_by_process_kind"]["workers"] > 0 and "engine_steady_ms_per_sample_beyond" in floats
    cores = rows["cores: png, one worker, 2 cpus_per_worker"]
    assert cores["encoder_processes"] == 2 and cores["images_encoded"] == cores["samples"]
    assert cores["threads_2_encode_per_s"] > 0 and cores["processes_2_encode_per_s"] > 0


def test_plain_loop(shared_ray, tmp_path):
    assert plainloop.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = figures(tmp_path, "plainloop")
    medians = [row for name, row in rows.items() if name.startswith("median: ")]
    assert len(medians) == 2 and all(row["samples_per_s"] > 0 for row in medians)
    assert rows["ours over the plain loop (medians)"]["two_workers_over_best_plain"] > 0


def test_ray_data_comparison(shared_ray, tmp_path):
    address = shared_ray.get_runtime_context().gcs_address
    assert raydata.main(["--quick", "--systems", "ours,raydata-in-actor", "--ray-address", address,
                         "--out", str(tmp_path)]) == 0
    rows = figures(tmp_path, "raydata")
    for system in ("ours", "raydata-in-actor"):
        row = rows[f"throughput: {system}"]
        assert (row["distinct_keys"], row["duplicates"], row["missing"]) == (row["prompts"], 0, 0)
        assert 0 < row["first_output_s"] <= row["last_output_s"] <= row["wall_s"]  # the whole job's phases
    assert rows["ours over the best Ray Data pipeline (medians)"]["best"] == "raydata-in-actor"


def test_planning_and_rerun(shared_ray, tmp_path):
    assert planning.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = figures(tmp_path, "planning")
    plan = rows["plan: list, footers, units, fingerprint"]
    assert (plan["files"], plan["rows"], plan["units"], plan["units_asked_for"]) == (20, 40_000, 40, 40)
    rerun = rows["rerun of a finished 8-shard job, local"]
    assert rerun["exit_status"] == 0 and rerun["models_loaded"] == 0 and not rerun["ray_started"]
    assert rows["digest of a local model folder, SD-1.5 fp32 size (sparse files)"]["bytes"] > 0
    assert rows["the same folder pinned again by the next run (digests kept in the model cache)"]["same_revision"]


def test_memory(shared_ray, tmp_path):
    assert memory.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = figures(tmp_path, "memory")
    short, long = rows["short run"], rows["2x longer run"]
    assert short["samples"] * 2 == long["samples"]  # images and pairs of every prompt, in both runs
    assert short["worker_peak_rss_mib"] > 100 and len(long["rss_after_units_by_decile_mib"]) == 10
    assert "python_objects_growth" in rows["long run against short run"]


def test_scaling(tmp_path):
    """In its own process: it starts a multi-node cluster, which cannot share this process's Ray."""
    subprocess.run([sys.executable, "tests/bench/scaling.py", "--quick", "--out", str(tmp_path)], cwd=REPO, check=True,
                   timeout=300)
    row = figures(tmp_path, "scaling")["2 simulated GPUs"]
    assert row["nodes"] == row["nodes_used"] == 2 and row["samples"] > 0


def test_encoders_in_threads_and_processes(tmp_path):
    assert encoders.main(["--quick", "--out", str(tmp_path)]) == 0
    runs = [json.loads(line) for line in (tmp_path / "encoders.jsonl").read_text().splitlines()]
    runs = {row["encoders"]: row for row in runs if row["name"] == "run"}
    assert set(runs) == {"1 threads", "1 processes"}
    for row in runs.values():  # every image encoded, and no run beats the stand-in device's own time
        assert row["images_encoded"] == 4 * 8 and 0 < row["fraction_of_limit"] <= 1
