"""`reproduce-toy --scale smoke`: the whole recipe runs end to end with the engine's jobs, the report is complete,
a finished reproduction re-runs without work, and one stopped mid-way resumes from the phase it was in. (The
claims themselves are checked by the full scale, whose figures are in jobs/toy/README.md.)"""

import json

import pyarrow.parquet as pq
import pytest

from jobs.toy.data import Caption, all_captions, draw, split_captions
from jobs.toy import reproduce as reproduce_toy
from jobs.main import main

REPORT_ACCURACIES = {"classifier_real", "classifier_autoencoded", "1rf_1step", "1rf_nstep", "2rf_1step", "2rf_nstep",
                     "distilled_from_2rf", "distilled_from_1rf"}


@pytest.fixture(scope="module")
def smoke(ray_cpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "reproduction"
    assert reproduce_toy.main(["--out", str(out), "--scale", "smoke"]) == 0
    return out


def test_held_out_captions_are_new_combinations_of_seen_shape_colour_pairs():
    training, held_out = split_captions(0.1, seed=0)
    assert len(held_out) == round(0.1 * len(all_captions())) and not set(training) & set(held_out)
    seen_pairs = {(c.shape, c.colour) for c in training}
    assert all((c.shape, c.colour) in seen_pairs for c in held_out)
    assert split_captions(0.1, seed=0) == (training, held_out)
    caption = Caption("star", "orange", "white", "top left")
    assert caption.text == "an orange star on a white background, top left"
    image = draw(caption, 64, seed=3)
    assert image.shape == (64, 64, 3) and (image == draw(caption, 64, seed=3)).all()
    top_left, bottom_right = image[:32, :32].reshape(-1, 3), image[32:, 32:].reshape(-1, 3)
    orange = (abs(top_left.astype(int) - (245, 130, 30)).sum(1) < 30).mean()
    assert orange > 0.15 and (abs(bottom_right.astype(int) - (245, 245, 245)).sum(1) < 10).all()


def test_smoke_runs_every_phase_and_reports_every_measure(smoke):
    report = json.loads((smoke / "report.json").read_text())
    assert set(report["accuracy"]) == REPORT_ACCURACIES
    assert all(0.0 <= value <= 1.0 for value in report["accuracy"].values())
    for model in ("1rf", "2rf"):
        curve = report["straightness"][model]
        assert set(curve["curve"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"} and curve["mean"] > 0
    assert set(report["claims"]) == {"reflow_straightened", "one_step_2rf_beats_one_step_1rf",
                                     "distilled_from_2rf_beats_distilled_from_1rf"}
    assert report["budgets"]["distill_2rf"]["steps"] == report["budgets"]["distill_1rf"]["steps"]
    assert report["seconds"]["total"] > 0 and "train_1rf" in report["seconds"]
    html = (smoke / "report.html").read_text()
    assert "http" not in html.replace('lang="en"', "")  # no network: every figure inline
    assert html.count("data:image/png;base64,") == 8  # the straightness chart, the real images, six models
    assert {p.name for p in (smoke / "figures").iterdir()} >= {"straightness.png", "samples-2rf_1step.png"}
    # the training set is in the engine's image-dataset format: Hugging Face datasets reads the images
    table = pq.read_table(next((smoke / "data" / "train").glob("*.parquet")))
    assert b"Image" in table.schema.metadata[b"huggingface"] and table.column("image")[0]["bytes"].as_py()
    # the 1-RF was trained by the engine from the encode job's pairs: noise independent of the image
    encoded = pq.read_table(next((smoke / "pairs" / "encoded").glob("*.parquet")))
    assert set(encoded.column("teacher_kind").to_pylist()) == {"encode"}


def test_a_finished_reproduction_reruns_without_work(smoke, capsys):
    before = {p: p.stat().st_mtime_ns for p in smoke.rglob("*") if p.is_file()}
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == 0
    changed = sorted(p.relative_to(smoke).as_posix() for p, mtime in before.items() if p.stat().st_mtime_ns != mtime)
    assert changed == []
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "full"]) == 2  # another scale is refused
    assert "other settings" in capsys.readouterr().err


def test_a_reproduction_stopped_mid_way_resumes_from_its_phase(smoke):
    phases = smoke / "phases"
    kept = {name: (phases / f"{name}.json").read_text() for name in ("data", "models", "train_1rf", "distill_1rf")}
    for name in ("samples_distilled_1rf", "accuracy", "report"):
        (phases / f"{name}.json").unlink()  # as if it stopped while sampling the control's distilled model
    report_before = json.loads((smoke / "report.json").read_text())
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == 0
    assert {name: (phases / f"{name}.json").read_text() for name in kept} == kept
    report = json.loads((smoke / "report.json").read_text())
    assert report["accuracy"] == report_before["accuracy"]  # the resumed jobs found their work done


def test_a_folder_that_holds_a_jobs_output_is_refused(smoke, tmp_path, capsys):
    """Pointed at an images output, the reproduction would write its data into it (which then fails verify); pointed
    inside one, or at or inside a model folder, the same: each is refused before anything is written."""
    job_output, model = smoke / "samples" / "distilled-1rf", smoke / "models" / "init"
    lone_module = tmp_path / "taesd"
    lone_module.mkdir()
    (lone_module / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    cases = [(job_output, "this folder holds a job's output ("),
             (job_output / "par" / "sub", f"it is inside {job_output}, which holds a job's output ("),
             (model, "this folder holds a model (model_index.json)"),
             (model / "unet", "this folder holds a model (config.json)"),
             (model / "sub", f"it is inside {model}, which holds a model (model_index.json)"),
             (lone_module, "this folder holds a model (config.json)")]
    before = {folder: sorted(folder.rglob("*")) for folder in (job_output, model, lone_module)}
    for out, message in cases:
        assert main(["reproduce-toy", "--out", str(out), "--scale", "smoke"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {message}" in err and len(err.splitlines()) == 1, err
    assert {folder: sorted(folder.rglob("*")) for folder in before} == before
    assert main(["verify", str(job_output)]) == 0
    reproduce_toy.Reproduction(str(tmp_path / "fresh"), "smoke", {}).check_not_an_output()  # beside them: fine


def test_an_out_inside_a_jobs_output_in_a_store_is_refused(s3, capsys):
    """Up to the bucket: the folder above --out is named as --out spells it."""
    s3.fs.pipe_file(f"{s3.bucket}/toy-output/_job.json", b"{}")
    out = s3.url("toy-output/par/sub")
    assert main(["reproduce-toy", "--out", out, "--storage-options", json.dumps(s3.storage_options)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: it is inside {s3.url('toy-output')}, which holds a job's output (_job.json)" in err, err
    assert s3.fs.find(f"{s3.bucket}/toy-output") == [f"{s3.bucket}/toy-output/_job.json"]
