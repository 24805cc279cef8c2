"""Training end to end on Ray Train (CPU workers): tiny-teacher pairs from the real pairs job, reflow that lowers the
loss and the one-step error, one worker against two, a killed driver that resumes bit for bit, S3 checkpoints, and
the final model in jobs.generate."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from instaflow.models import student_defaults
from jobhelpers import prompt_table
from jobs import generate, reflow_pairs, straightness, train_reflow
from pipeline.spec import JobSpec

NUM_PROMPTS = 64
REFLOW_STEPS = 300


@pytest.fixture(scope="module")
def pairs(ray_cpus, tiny_models, tmp_path_factory):
    """Pairs of the tiny SD teacher, one prompt failing (an empty prompt), in 4 shards."""
    folder = tmp_path_factory.mktemp("pairs")
    table = prompt_table(NUM_PROMPTS)
    prompts = table.column("prompt").to_pylist()
    prompts[5] = ""
    pq.write_table(table.set_column(0, "prompt", [prompts]), folder / "prompts.parquet", row_group_size=8)
    status = reflow_pairs.main([
        "--prompts", str(folder / "prompts.parquet"), "--output", str(folder / "out"),
        "--teacher", str(tiny_models["sd15"]), "--steps", "8", "--height", "64", "--width", "64",
        "--rows-per-shard", "16", "--batch-size", "16", "--no-progress", "--device", "cpu",
    ])
    assert status == 0
    return folder / "out"


def train_args(pairs, init, output, steps, *extra) -> list[str]:
    return [
        "--pairs", str(pairs), "--init", str(init), "--output", str(output), "--steps", str(steps),
        "--batch-size", "16", "--learning-rate", "1e-3", "--warmup-steps", "20", "--checkpoint-every", "20",
        "--log-every", "20", "--seed", "5", "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def reflow_run(ray_cpus, pairs, tiny_models, tmp_path_factory):
    """Reflow from the SD teacher's UNet on its own pairs: one worker with two data-loader processes."""
    output = tmp_path_factory.mktemp("reflow")
    args = train_args(pairs, tiny_models["sd15"], output, REFLOW_STEPS, "--num-workers", "1", "--loader-workers", "2")
    assert train_reflow.main(args) == 0
    return output


def checkpoint_state(root, step: int) -> dict:
    folder = os.path.join(root, "checkpoints", f"step-{step:07d}")
    return {name: torch.load(os.path.join(folder, f"{name}.pt"), weights_only=True) for name in ("unet", "ema")}


def assert_states_equal(a: dict, b: dict, **tolerance) -> None:
    for name in ("unet",):
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], **tolerance)
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][key], b["ema"]["shadow"][key], **tolerance)


def test_reflow_lowers_the_loss_and_the_one_step_error(reflow_run, pairs, tiny_models, tmp_path):
    report = tmp_path / "straightness.jsonl"
    assert straightness.main([
        "--pairs", str(pairs), "--model", str(tiny_models["sd15"]), "--model", str(reflow_run / "final"),
        "--max-pairs", "64", "--device", "cpu", "--report", str(report),
    ]) == 0
    before, after = [json.loads(line) for line in report.read_text().splitlines()]
    rows = [json.loads(line) for line in (reflow_run / "metrics.jsonl").read_text().splitlines()]
    print(f"\nreflow {REFLOW_STEPS} steps, tiny models, CPU: reflow loss {before['reflow_loss']:.3f} -> "
          f"{after['reflow_loss']:.3f}, straightness {before['straightness']:.3f} -> {after['straightness']:.3f}, "
          f"one-step error {before['one_step_error']:.3f} -> {after['one_step_error']:.3f}; "
          f"training {statistics.median(r['samples_per_s'] for r in rows):.0f} samples/s (median of intervals)")
    assert after["reflow_loss"] < 0.5 * before["reflow_loss"]
    assert after["one_step_error"] < 0.5 * before["one_step_error"]
    assert [r["step"] for r in rows] == list(range(20, REFLOW_STEPS + 1, 20))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]

    record = json.loads((reflow_run / "final" / "instaflow_batch.json").read_text())
    assert record["kind"] == "2-rectified-flow" and record["trained"]["step"] == REFLOW_STEPS
    # The saved weights are the EMA's, not the raw ones.
    final = load_file(reflow_run / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    last = checkpoint_state(reflow_run, REFLOW_STEPS)
    for key, value in last["ema"]["shadow"].items():
        assert torch.equal(final[key], value)
    assert any(not torch.equal(final[k], last["unet"][k]) for k in final)


def test_two_workers_equal_one_with_the_same_global_batch(reflow_run, pairs, tiny_models, s3):
    """One worker reading with 2 loader processes, against 2 workers reading with one each; S3 output, and the
    text embeddings cached beside the pairs (each worker encodes half the shards) instead of encoded per step."""
    options = json.dumps(s3.storage_options)
    output = s3.url("train-two-workers")
    args = train_args(pairs, tiny_models["sd15"], output, 20, "--num-workers", "2", "--loader-workers", "1",
                      "--storage-options", options, "--cache-text-embeddings")
    assert train_reflow.main(args) == 0
    [cache] = (pairs / "_text-embeddings").iterdir()
    assert sorted(path.name for path in cache.iterdir()) == [f"0000{i}.parquet" for i in range(4)]
    s3.fs.invalidate_cache()
    root = f"{s3.bucket}/train-two-workers"
    checkpoint = f"{root}/checkpoints/step-0000020"
    assert s3.fs.exists(f"{checkpoint}/train_state.json") and s3.fs.exists(f"{root}/final/instaflow_batch.json")
    two = {name: torch.load(s3.fs.open(f"{checkpoint}/{name}.pt"), weights_only=True) for name in ("unet", "ema")}
    assert_states_equal(two, checkpoint_state(reflow_run, 20), rtol=1e-5, atol=1e-6)
    one_rows = [json.loads(line) for line in (reflow_run / "metrics.jsonl").read_text().splitlines()]
    two_rows = [json.loads(line) for line in s3.fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert len(two_rows) == 1 and two_rows[0]["loss"] == pytest.approx(one_rows[0]["loss"], rel=1e-5)
    # A job reads a model's record from the store too: this one says it is a 25-step 2-RF model.
    spec = JobSpec(prompts="p.parquet", output="out", model=f"{output}/final", storage_options=s3.storage_options)
    assert (spec.steps, spec.guidance_scale) == (25, 1.5)


def test_killed_run_resumes_bit_for_bit(reflow_run, pairs, tiny_models, tmp_path):
    output = tmp_path / "killed"
    args = train_args(pairs, tiny_models["sd15"], output, 60, "--num-workers", "1", "--loader-workers", "2",
                      "--lock-lease", "3")
    command = [sys.executable, "-m", "jobs.train_reflow", *args, "--ray-address", ray.get_runtime_context().gcs_address]
    driver = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = output / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not (snapshot.exists() and "step-0000020" in snapshot.read_text()):
        assert driver.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # its own session: the driver and nothing else of ours
    driver.wait(timeout=60)
    assert not (output / "final").exists()
    kept = output / "checkpoints" / "step-0000020" / "unet.pt"
    written_at = kept.stat().st_mtime_ns

    assert train_reflow.main(args) == 0
    assert kept.stat().st_mtime_ns == written_at  # resumed from it, not trained again from the start
    assert_states_equal(checkpoint_state(output, 60), checkpoint_state(reflow_run, 60), rtol=0, atol=0)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (reflow_run / "metrics.jsonl").read_text().splitlines()][:3]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in reference]


def test_final_models_record_what_they_are_and_load_in_generate(ray_cpus, reflow_run, pairs, tmp_path):
    """Distil the reflowed model to one step; each final folder records its own sampling defaults, and generate
    takes them from there, not from the folder's name."""
    distilled = tmp_path / "distilled"
    args = train_args(pairs, reflow_run / "final", distilled, 60, "--loss", "distill-l2", "--num-workers", "1",
                      "--loader-workers", "0", "--checkpoint-every", "60")
    assert train_reflow.main(args) == 0
    report = tmp_path / "straightness.jsonl"
    assert straightness.main(["--pairs", str(pairs), "--model", str(distilled), "--device", "cpu",
                              "--report", str(report)]) == 0
    rows = {row["model"]: row for row in map(json.loads, report.read_text().splitlines())}
    assert list(rows) == ["init", "step 60", "final"]
    print(f"\ndistill-l2 60 steps: one-step error {rows['init']['one_step_error']:.3f} -> "
          f"{rows['final']['one_step_error']:.3f}")
    assert rows["final"]["one_step_error"] < 0.7 * rows["init"]["one_step_error"]
    assert student_defaults(str(distilled / "final")) == (1, 0.0)
    assert json.loads((distilled / "final" / "instaflow_batch.json").read_text())["kind"] == "one-step"

    assert student_defaults(str(reflow_run / "final")) == (25, 1.5)  # "final" names no 2-RF model: the record does
    prompts, out = tmp_path / "prompts.parquet", tmp_path / "images"
    pq.write_table(prompt_table(3), prompts)
    assert generate.main(["--prompts", str(prompts), "--output", str(out), "--model", str(reflow_run / "final"),
                          "--height", "64", "--width", "64", "--format", "parquet", "--no-progress", "--device", "cpu"]) == 0
    images = pq.read_table(out / "00000.parquet", columns=["status", "image", "steps", "guidance_scale"]).to_pylist()
    assert len(images) == 3 and all(row["status"] == "ok" and row["image"]["bytes"] for row in images)
    assert {(row["steps"], row["guidance_scale"]) for row in images} == {(25, 1.5)}


def test_bad_settings_exit_2_before_anything_runs(ray_cpus, pairs, tiny_models, tmp_path, capsys):
    output = tmp_path / "never"
    cases = {
        "no _job.json": train_args(tmp_path / "nothing", tiny_models["sd15"], output, 10),
        "no such folder": train_args(pairs, tmp_path / "no-model", output, 10),
        "not divisible by the 3 workers": train_args(pairs, tiny_models["sd15"], output, 10, "--num-workers", "3"),
        "learning_rate must be": train_args(pairs, tiny_models["sd15"], output, 10) + ["--learning-rate", "2"],
        "cpus_per_worker must be": train_args(pairs, tiny_models["sd15"], output, 10) + ["--cpus-per-worker", "0"],
    }
    for message, args in cases.items():
        assert train_reflow.main(args) == 2
        assert message in capsys.readouterr().err
    assert not (output / "checkpoints").exists()
