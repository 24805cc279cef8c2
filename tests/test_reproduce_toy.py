"""`reproduce-toy --scale smoke`: the whole recipe runs end to end with the engine's jobs, the report is complete,
a finished reproduction re-runs without work, and one stopped mid-way resumes from the phase it was in. (The
claims themselves are checked by the full scale, whose figures are in jobs/toy/README.md.)"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.toy.data import PARTIAL_CAPTIONS, SHAPES, Caption, all_captions, draw, split_captions, training_caption
from jobs.toy.evaluation import (CAPTIONS, CLAIMS, Judged, bootstrap, caption_labels, clean_shapes, evaluate, fitting,
                                 frechet_distance, mode_gap, t_quantile, verdict)
from jobs.toy import reproduce as reproduce_toy
from jobs.main import main
from pipeline.writers import read_tensor_column

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
    assert {claim["verdict"] for claim in report["claims"].values()} <= {"shown", "not shown", "contradicted"}
    difference = report["claims"]["one_step_2rf_beats_one_step_1rf"]["partial_fid"]["difference"]
    assert difference[1] <= difference[2]
    assert set(report["measures"]) == {"real", "real_again"} | REPORT_ACCURACIES - {"classifier_real",
                                                                                     "classifier_autoencoded"}
    for real in ("real", "real_again"):  # the real images, and the second draw judged as a model: clean shapes
        assert report["measures"][real]["held_out"]["clean"][0] == 1.0
    for model, sets in report["measures"].items():  # every measure of every model, with its interval
        assert set(sets["partial"]) == ({"accuracy", "clean"} if model == "real" else
                                        {"accuracy", "clean", "fid", "mode_gap"})
        assert all(low <= high for values in sets.values() for _, low, high in values.values()), model
    assert report["budgets"]["distill_2rf"]["steps"] == report["budgets"]["distill_1rf"]["steps"]
    assert report["seconds"]["total"] > 0 and "train_1rf" in report["seconds"]
    html = (smoke / "report.html").read_text()
    assert "http" not in html.replace('lang="en"', "")  # no network: every figure inline
    # the straightness chart, the real images and six models' on held-out captions, and the same on a partial one
    assert html.count("data:image/png;base64,") == 15
    assert {p.name for p in (smoke / "figures").iterdir()} >= {"straightness.png", "samples-2rf_1step.png"}
    # the training set is in the engine's image-dataset format: Hugging Face datasets reads the images
    table = pq.read_table(next((smoke / "data" / "train").glob("*.parquet")))
    assert b"Image" in table.schema.metadata[b"huggingface"] and table.column("image")[0]["bytes"].as_py()
    full = {c.text for c in all_captions()}  # training images are shown with full and partial captions alike
    prompts = table.column("prompt").to_pylist()
    assert 0 < sum(prompt in full for prompt in prompts) < len(prompts)
    evaluated = set(pq.read_table(smoke / "data" / "eval-prompts" / "00000.parquet").column("prompt").to_pylist())
    assert {c.text for c in PARTIAL_CAPTIONS} <= evaluated
    # the second draw of real images: the same captions as the first in the same order, other images
    first, again = (pq.read_table(smoke / "data" / name) for name in ("eval-real", "eval-real-again"))
    assert again.column("prompt").to_pylist() == first.column("prompt").to_pylist()
    assert [c["bytes"] for c in again.column("image").to_pylist()] != \
        [c["bytes"] for c in first.column("image").to_pylist()]
    # the 1-RF was trained by the engine from the encode job's pairs: noise independent of the image
    encoded = pq.read_table(next((smoke / "pairs" / "encoded").glob("*.parquet")))
    assert set(encoded.column("teacher_kind").to_pylist()) == {"encode"}
    # the smoke scale's autoencoder has 3 blocks: the engine's jobs draw noise at its 16x16 latent side
    assert read_tensor_column(encoded, "noise").shape[1:] == read_tensor_column(encoded, "latent").shape[1:] == \
        (4, 16, 16)
    settings = json.loads((smoke / "reproduction.json").read_text())
    assert settings["autoencoder_blocks"] == 3 and settings["partial_captions"] == [c.text for c in PARTIAL_CAPTIONS]
    assert settings["code"] == reproduce_toy.code_digest() and settings["packages"] == reproduce_toy.package_versions()


def test_a_finished_reproduction_reruns_without_work(smoke, capsys):
    before = {p: p.stat().st_mtime_ns for p in smoke.rglob("*") if p.is_file()}
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == 0
    changed = sorted(p.relative_to(smoke).as_posix() for p, mtime in before.items() if p.stat().st_mtime_ns != mtime)
    assert changed == []
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "full"]) == 2  # another scale is refused
    assert "other settings" in capsys.readouterr().err


def test_a_phase_whose_job_fails_or_is_interrupted_passes_its_status_on_and_a_re_run_resumes_there(smoke, monkeypatch,
                                                                                                   capsys):
    """Stopped while sampling the control's distilled model: an interrupted job is an interrupted reproduction
    (130), a failed one a failed phase (1), neither "a bug"; a re-run resumes at that phase, keeps the phases
    before it, and its resumed jobs find their work done (the same samples, so the same figures)."""
    phases = smoke / "phases"
    report_before = json.loads((smoke / "report.json").read_text())
    for name in ("samples_distilled_1rf", "measures", "report"):
        (phases / f"{name}.json").unlink()
    (smoke / "report.json").unlink()  # rewritten by the report phase, not read back from before
    kept = {path.name: path.read_text() for path in phases.glob("*.json")}
    for status, ending in ((130, "error: interrupted"), (1, " exited with status 1; re-run reproduce-toy to resume")):
        monkeypatch.setattr(reproduce_toy.generate, "main", lambda argv, status=status: status)
        assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == status
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].endswith(ending), errors
    monkeypatch.undo()
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == 0
    assert {path.name: path.read_text() for path in phases.glob("*.json") if path.name in kept} == kept
    assert len(list(phases.glob("*.json"))) == len(kept) + 3
    job = json.loads((smoke / "samples" / "distilled-1rf" / "_job.json").read_text())["progress"]
    assert (job["shards_committed_now"], job["shards_committed_before"]) == (0, 1)  # its work was done
    report = json.loads((smoke / "report.json").read_text())
    assert (report["accuracy"], report["measures"]) == (report_before["accuracy"], report_before["measures"])


def test_a_reproduction_made_by_other_code_is_refused(smoke, monkeypatch, capsys):
    """Its finished phases hold another code's figures: resuming would mix two runs in one report."""
    before = {p: p.stat().st_mtime_ns for p in smoke.rglob("*") if p.is_file()}
    monkeypatch.setattr(reproduce_toy, "code_digest", lambda: "0" * 64)
    assert reproduce_toy.main(["--out", str(smoke), "--scale", "smoke"]) == 2
    assert "other settings (scale 'smoke'; differing: code); use another --out" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())


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


def test_partial_captions_leave_attributes_out_and_fit_their_images():
    image = Caption("star", "orange", "white", "top left")
    assert image.keeping(["colour"]).text == "an orange shape"
    assert image.keeping(["shape", "background"]).text == "a star on a white background"
    assert image.keeping(["position"]).text == "something, top left" and image.keeping([]).text == "something"
    assert image.keeping(["colour"]).matches(image) and not Caption(None, "red", None, None).matches(image)
    rng = np.random.default_rng(1)
    shown = [training_caption(image, 0.5, rng) for _ in range(400)]
    assert 150 < sum(c == image for c in shown) < 280 and len({c.text for c in shown}) == 16  # every subset
    assert all(c.matches(image) for c in shown)
    texts = {c.text for c in all_captions()}
    assert all(c.text not in texts and len(c.given) <= 1 for c in PARTIAL_CAPTIONS)  # common in training
    # the text encoder's positives: a caption fits every image whose drawn attributes it says
    prompts = ["a red shape", "a blue star on a white background, top left", "something"]
    drawn = caption_labels(["a red star on a white background, top left",
                            "a blue star on a white background, top left"])
    said = caption_labels(prompts)
    assert fitting({k: v[:, None] for k, v in said.items()}, {k: v[None, :] for k, v in drawn.items()}).tolist() == \
        [[True, False], [False, True], [True, True]]


def test_the_measures_on_known_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3))
    a -= a.mean(0)
    assert frechet_distance(a, b) < 0.02 and abs(frechet_distance(a, a + [2, 0, 0]) - 4) < 1e-6
    assert abs(frechet_distance(a, 3 * a) - np.trace(np.cov(a, rowvar=False)) * (3 - 1) ** 2) < 1e-6  # sd x3
    real = [Caption("star", "red", "white", "top left"), Caption("circle", "blue", "black", "bottom right")]
    images = np.stack([draw(c, 64, seed) for seed, c in enumerate(real)])
    assert clean_shapes(images, ["red", "blue"]).tolist() == [True, True]
    assert clean_shapes(images, ["blue", None]).tolist() == [False, True]  # the wrong colour; any colour
    blurred = images.astype(float).mean(0, keepdims=True).astype(np.uint8)  # two modes averaged: no clean shape
    assert clean_shapes(blurred, [None]).tolist() == [False]
    shapes = np.stack([draw(Caption(shape, "blue", "white", "top left"), 64, 3) for shape in SHAPES])
    jitters = np.stack([draw(Caption("star", "red", "white", "top left"), 64, seed) for seed in range(32)])
    averages = np.stack([shapes.mean(0), jitters.mean(0)]).astype(np.uint8)  # one colour, modes overlaid
    assert clean_shapes(averages, ["blue", "red"]).tolist() == clean_shapes(averages, [None, None]).tolist() == \
        [False, False]
    orange_on_red = draw(Caption("circle", "orange", "red", "top left"), 64, 1)[None]  # on the red-yellow blend line
    assert clean_shapes(orange_on_red, ["yellow"]).tolist() == [False] and clean_shapes(orange_on_red, ["orange"])
    two = images.copy()
    two[1, :20, :20] = two[1, 50, 50]  # a second blue region: not one shape
    assert clean_shapes(two, ["red", "blue"]).tolist() == [True, False]
    assert [round(t_quantile(0.975, df), 3) for df in (1, 7, 66)] == [12.706, 2.365, 1.997]
    labels = {name: np.array([0, 1, 2, 3]) for name in ("shape", "colour", "background", "position")}
    collapsed = {name: np.array([0, 0, 0, 0]) for name in labels}
    assert mode_gap(labels, labels, ["shape"]) == 0 and mode_gap(collapsed, labels, ["shape", "colour"]) == 0.75
    groups = [(np.arange(10 * g, 10 * g + 10),) for g in range(20)]
    values = np.arange(200) % 2  # half ones: the mean's interval holds 0.5 and is narrow
    low, high = bootstrap(lambda draws: values[np.concatenate(draws)].mean(), groups, seed=0)
    assert low <= 0.5 <= high and high - low < 0.2
    assert (verdict(0.1, 0.3, True), verdict(-0.3, -0.1, False), verdict(-0.1, 0.1, True)) == \
        ("shown", "shown", "not shown")
    assert verdict(0.1, 0.3, False) == "contradicted"


def judged(prompts: list[str], features: np.ndarray) -> Judged:
    """Images as the classifier would see them, with given features; every label 0, every image clean."""
    labels = {name: np.zeros(len(prompts), dtype=np.int64) for name in ("shape", "colour", "background", "position")}
    return Judged(np.array(prompts), features, labels, labels, np.ones(len(prompts), bool), np.ones(len(prompts), bool))


def test_a_claim_between_two_draws_of_one_distribution_is_not_shown_and_a_collapsed_model_loses():
    """The toy FID's interval must not favour a model that collapses modes: with the real images' distribution
    against itself, not shown; against a model 0.5x as spread, the real-like model is shown better."""
    _, held_out = split_captions(0.1, seed=0)
    prompts = [c.text for c in held_out for _ in range(4)] + [c.text for c in PARTIAL_CAPTIONS for _ in range(32)]
    rng = np.random.default_rng(3)
    sets = {name: judged(prompts, rng.normal(size=(len(prompts), 128)))
            for name in ("real", "1rf_1step", "distilled_from_2rf")}
    sets["2rf_1step"] = judged(prompts, rng.normal(size=(len(prompts), 128)))
    sets["distilled_from_1rf"] = judged(prompts, 0.5 * rng.normal(size=(len(prompts), 128)))
    claims = evaluate(sets, seed=0)["claims"]
    same, collapsed = CLAIMS  # 2-RF against 1-RF (both real-like); distilled from the 2-RF against a collapsed one
    assert claims[same]["held_out_fid"]["verdict"] == "not shown" and claims[same]["verdict"] == "not shown"
    assert claims[collapsed]["held_out_fid"]["verdict"] == "shown" and claims[collapsed]["verdict"] == "shown"
    for claim in claims.values():
        value, low, high = claim["partial_fid"]["difference"]
        assert low <= value <= high


def test_accuracy_leaves_out_a_caption_that_says_nothing():
    """`something` is right whatever is drawn: counted, a model right on a share a of the others would score
    1/8 + 7/8·a, and every difference would shrink to 7/8."""
    prompts = [c.text for c in PARTIAL_CAPTIONS for _ in range(4)]
    sets = {name: judged(prompts, np.random.default_rng(1).normal(size=(len(prompts), 8)))
            for name in ("real", "1rf_1step", "2rf_1step", "distilled_from_2rf", "distilled_from_1rf")}
    sets["1rf_1step"].agrees[:] = [CAPTIONS[p].given == () for p in prompts]  # right only where nothing is said
    result = evaluate(sets, seed=0)
    assert result["measures"]["1rf_1step"]["partial"]["accuracy"][0] == 0.0
    assert result["measures"]["1rf_1step"]["partial"]["clean"][0] == 1.0  # the other measures keep every caption
    claim = result["claims"]["one_step_2rf_beats_one_step_1rf"]
    assert claim["partial_accuracy"]["captions"] == 7 and len(PARTIAL_CAPTIONS) == 8  # all but `something`
    assert claim["partial_accuracy"]["difference"][0] == 1.0
    assert claim["partial_clean"]["captions"] == len(PARTIAL_CAPTIONS)
