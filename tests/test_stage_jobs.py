"""LoRA adapters, fine-tune merges and scores through `instaflow-batch run`, on a local Ray with logical GPUs, the
tiny models and their tiny adapters and scorers (jobs/tiny). The math of each is tested against diffusers and
transformers in test_lora.py and test_scores.py; here, what a job makes of them."""

import hashlib
import io
import json
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from jobs.main import main
from pipeline.manifest import read_manifest
from tests.jobhelpers import image_rows, png_bytes, prompt_table

# One worker a job: each job here starts its own, and four of them would load the models four times over.
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32", "--image-format", "png", "--num-workers", "1"]
NUM_PROMPTS = 12
CLIP_SCORE_TOLERANCE = 0.5  # device preprocessing against PIL's (test_scores.py); PNG keeps the pixels exact
NSFW_SCORE_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    table = prompt_table(NUM_PROMPTS)
    pq.write_table(table.append_column("lora", pa.array(["an input column named like an output"] * NUM_PROMPTS)),
                   path, row_group_size=4)
    return path


@pytest.fixture(scope="module")
def run(ray_gpus, tiny_models, prompts, tmp_path_factory):
    """run(job, *flags) -> the output folder: a job on the tiny models that must exit 0."""
    outputs = tmp_path_factory.mktemp("outputs")

    finished = {}  # a job that ran to the end, by its command line: tests that need the same job share it

    def run_job(job: str, *flags: str, status: int = 0, inputs=prompts):
        if status == 0 and (job, flags, str(inputs)) in finished:
            return finished[job, flags, str(inputs)]
        output = outputs / f"out-{len(list(outputs.iterdir()))}"
        model = ["--model", str(tiny_models["instaflow"])]
        if job == "reflow-pairs":
            model = ["--teacher", str(tiny_models["sd15"]), "--steps", "2", *(model if "--no-student" not in flags
                                                                             else [])]
        flags = [flag for flag in flags if flag != "--no-student"]
        assert main(["run", job, "--prompts", str(inputs), "--output", str(output), *model, *SIZE,
                     "--rows-per-shard", "6", "--batch-size", "4", "--no-progress", *flags]) == status
        if status == 0:
            finished[job, tuple(flags), str(inputs)] = output
        return output

    return run_job


def error_line(capsys) -> str:
    """The one error line a command printed (Ray's workers of earlier jobs may log to stderr as well)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def pixels(images: dict[str, bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(images[key]))) for key in sorted(images)]).astype(np.int16)


def test_scale_zero_is_no_lora_and_formats_agree(run, tiny_models):
    plain = image_rows(run("generate"))[1]
    zero = image_rows(run("generate", "--lora", f"{tiny_models['lora-kohya']}:0"))[1]
    assert zero == plain  # bytes
    kohya = image_rows(run("generate", "--lora", f"{tiny_models['lora-kohya']}:0.8"))[1]
    diffusers = image_rows(run("generate", "--lora", f"{tiny_models['lora-diffusers']}:0.8"))[1]
    assert kohya.keys() == plain.keys() and kohya != plain
    assert np.abs(pixels(kohya) - pixels(diffusers)).max() <= 1  # the same LoRA; float rounding of alpha / rank
    assert np.abs(pixels(kohya) - pixels(plain)).mean() > 2  # it changes the images visibly


def test_rows_record_the_weights_and_identity_tells_file_and_scale_apart(run, tiny_models, prompts):
    merge = ["--merge-finetune", f"{tiny_models['finetune']}:0.5", "--merge-base", str(tiny_models["sd15"])]
    output = run("generate", *merge, "--lora", str(tiny_models["lora-kohya"]), "--lora",
                 f"{tiny_models['lora-diffusers']}:-0.25")
    rows, _ = image_rows(output)
    record = json.loads(rows[0]["lora"])
    lora_digest = hashlib.sha256(tiny_models["lora-diffusers"].read_bytes()).hexdigest()
    assert [(entry["kind"], entry["name"], entry["scale"]) for entry in record] == [
        ("merge", "finetune", 0.5), ("lora", "lora-kohya.safetensors", 1.0),
        ("lora", "lora-diffusers.safetensors", -0.25)]
    assert record[2]["digest"] == lora_digest and record[0]["base"] == "sd15"
    assert all(row["lora"] == rows[0]["lora"] for row in rows)
    assert rows[0]["input_lora"] == "an input column named like an output"

    identity = read_manifest(fsspec.filesystem("file"), str(output))["spec"]
    assert identity["lora_scales"] == [1.0, -0.25] and identity["merge_scale"] == 0.5
    assert identity["lora_1"]["revision"] == lora_digest
    job = ["run", "generate", "--prompts", str(prompts), "--output", str(output), "--model",
           str(tiny_models["instaflow"]), *SIZE, "--rows-per-shard", "6", "--batch-size", "4", "--no-progress"]
    same = [*merge, "--lora", f"{tiny_models['lora-kohya']}:1.0", "--lora", f"{tiny_models['lora-diffusers']}:-0.25"]
    assert main([*job, *same]) == 0  # the same job, however spelled: it finds every shard committed
    for other in ([f"{tiny_models['lora-diffusers']}:-0.5"], [str(tiny_models["lora-kohya"])]):
        assert main([*job, *merge, "--lora", str(tiny_models["lora-kohya"]), "--lora", *other]) == 2

def test_a_tiny_decoder_decodes_a_merged_students_images(run, tiny_models):
    """The fine-tune's VAE, taken with its weights, once replaced the tiny decoder: rows named the tiny decoder, and
    the full VAE had decoded them."""
    merged = ["--merge-finetune", f"{tiny_models['finetune']}:0.5", "--merge-base", str(tiny_models["sd15"]),
              "--lora", str(tiny_models["lora-kohya"]), "--lora", f"{tiny_models['lora-diffusers']}:-0.25"]
    full = image_rows(run("generate", *merged))[1]
    tiny = image_rows(run("generate", *merged, "--decoder", "tiny", "--tiny-decoder", str(tiny_models["taesd"])))[1]
    assert tiny.keys() == full.keys()
    assert np.abs(pixels(tiny) - pixels(full)).mean() > 2


def test_a_lora_leaves_the_teachers_pairs_as_they_were(run, tiny_models):
    """The tiny student and teacher share their text encoder: fusing into the student's copy must not reach it."""
    plain, fused = run("reflow-pairs"), run("reflow-pairs", "--lora", str(tiny_models["lora-kohya"]))
    pairs = sorted(plain.glob("pairs/*.parquet"))
    assert pairs and [p.read_bytes() for p in pairs] == [(fused / "pairs" / p.name).read_bytes() for p in pairs]
    assert image_rows(plain)[1] != image_rows(fused)[1]


def test_a_lora_that_does_not_fit_is_refused_before_any_worker(run, tiny_models, tmp_path, capsys):
    state = safetensors.torch.load_file(tiny_models["lora-kohya"])
    key = next(k for k in state if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    state[key] = torch.zeros(4, 7)  # the module takes another width
    bad = tmp_path / "other-model.safetensors"
    safetensors.torch.save_file(state, bad)
    output = run("generate", "--lora", str(bad), status=2)
    line = error_line(capsys)
    assert "other-model.safetensors" in line and "does not fit" in line, line
    assert not output.exists()  # nothing written: no worker started
    for flags, message in (([str(tmp_path / "missing.safetensors")], "missing.safetensors"),
                           ([f"{tiny_models['lora-kohya']}:nan"], "finite"),
                           ([str(tiny_models["finetune"] / "model_index.json")], ".safetensors")):
        run("generate", "--lora", *flags, status=2)
        assert message in capsys.readouterr().err
    run("reflow-pairs", "--no-student", "--lora", str(tiny_models["lora-kohya"]), status=2)
    assert "need a student --model" in capsys.readouterr().err


def test_a_model_of_the_wrong_kind_is_refused_naming_its_flag(run, tiny_models, capsys):
    """A CLIP model loads as a safety checker (and scores NaN), a safety checker as CLIP (and fails every row):
    each model a flag names is checked for its class on the driver, before any worker starts."""
    cases = [(["--scores", "nsfw", "--safety-checker", str(tiny_models["clip"])],
              "--safety-checker", "its config.json names class CLIPModel, not StableDiffusionSafetyChecker"),
             (["--scores", "clip", "--clip-model", str(tiny_models["safety_checker"])],
              "--clip-model", "its config.json names class StableDiffusionSafetyChecker, not CLIPModel"),
             (["--controlnet", str(tiny_models["taesd"]), "--control-column", "style"], "--controlnet",
              "its config.json names class AutoencoderTiny, not ControlNetModel"),
             (["--decoder", "tiny", "--tiny-decoder", str(tiny_models["controlnet"])], "--tiny-decoder",
              "its config.json names class ControlNetModel, not AutoencoderTiny")]
    for flags, flag, message in cases:
        output = run("generate", *flags, status=2)
        line = error_line(capsys)
        assert line == f"error: {flag} {flags[flags.index(flag) + 1]!r}: {message}", line
        assert not output.exists()
    run("generate", "--refiner", str(tiny_models["sd15"]), status=2)  # SD-1.5's folder lacks SDXL's components
    assert "missing text_encoder_2" in error_line(capsys)


def test_a_pipeline_folder_whose_component_is_of_the_wrong_kind_is_refused_on_the_driver(run, tiny_models, capsys,
                                                                                       tmp_path, monkeypatch):
    """A student whose unet/ is a VAE failed on every worker (three starts, 37 s) before exit 2: each component of
    the pipeline folders that --model, --teacher and --merge-finetune/--merge-base name is checked on the driver."""
    import pipeline.job

    def no_worker(*args):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(pipeline.job, "ray_worker_factory", no_worker)

    def swapped(model: str, component: str, replacement) -> str:
        """A copy of a tiny model whose `component` folder holds `replacement`."""
        copy = tmp_path / f"{model}-{component}"
        shutil.copytree(tiny_models[model], copy)
        shutil.rmtree(copy / component)
        shutil.copytree(replacement, copy / component)
        return str(copy)

    instaflow, sd15 = tiny_models["instaflow"], tiny_models["sd15"]
    cases = [("generate", ["--model", swapped("instaflow", "unet", instaflow / "vae")], "--model",
              "its unet/config.json names class AutoencoderKL, not UNet2DConditionModel"),
             ("reflow-pairs", ["--no-student", "--teacher", swapped("sd15", "vae", tiny_models["taesd"])],
              "--teacher", "its vae/config.json names class AutoencoderTiny, not AutoencoderKL"),
             ("generate", ["--merge-finetune", swapped("sd15", "text_encoder", tiny_models["clip"]), "--merge-base",
                           str(sd15)], "--merge-finetune",
              "its text_encoder/config.json names class CLIPModel, not CLIPTextModel"),
             ("generate", ["--merge-finetune", str(tiny_models["finetune"]), "--merge-base",
                           swapped("sd15", "unet", instaflow / "text_encoder")], "--merge-base",
              "its unet/config.json names class CLIPTextModel, not UNet2DConditionModel")]
    for job, flags, flag, message in cases:
        output = run(job, *flags, status=2)
        model = flags[flags.index(flag) + 1]
        assert error_line(capsys) == f"error: {flag} {model!r}: {message}"
        assert not output.exists()


def test_a_score_that_is_not_finite_is_left_null_with_its_reason_and_the_row_is_kept():
    from pipeline.stages.base import HostCopy, UnitOutputs
    from pipeline.stages.scores import ScoresStage

    class Clip:
        pass

    stage = ScoresStage.__new__(ScoresStage)
    stage.safety, stage.clip = None, Clip()
    outputs = UnitOutputs(["images"], {})
    stage.collect(["a", "b"], {"images": {"safety": None, "clip": HostCopy(torch.tensor([21.5, float("nan")]))}},
                  outputs)
    assert outputs.failed["images"] == {}
    assert outputs.column("images", "clip_score") == {"a": 21.5}
    assert outputs.column("images", "scores_error") == {"b": "clip_score is not finite (nan)"}


def reference_scores(tiny_models, rows: list[dict], images: dict[str, bytes]) -> dict[str, tuple]:
    """diffusers' safety checker and transformers' CLIP on the stored images, as a pipeline and torchmetrics run
    them (PIL preprocessing): {key: (largest concept score, has_nsfw_concept, CLIP score)}."""
    checker_dir, clip_dir = tiny_models["safety_checker"], tiny_models["clip"]
    checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir).eval()
    checker_processor = CLIPImageProcessor.from_pretrained(checker_dir)
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    clip_processor = CLIPImageProcessor.from_pretrained(clip_dir)
    keys = [row["key"] for row in rows if row["status"] == "ok"]
    decoded = [np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB")) for key in keys]
    prompts = [row["prompt"] for row in rows if row["status"] == "ok"]
    with torch.no_grad():
        clip_input = checker_processor(images=decoded, return_tensors="pt").pixel_values
        _, has_nsfw = checker(clip_input=clip_input, images=[image.copy() for image in decoded])
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(checker.special_care_embeds).T
        concept = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(checker.concept_embeds).T
        inputs = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = clip.get_image_features(pixel_values=clip_processor(images=decoded, return_tensors="pt")
                                        .pixel_values).pooler_output
        text = clip.get_text_features(**inputs).pooler_output
        clip_score = (100 * torch.nn.functional.cosine_similarity(image, text)).clamp(min=0)
    largest = []
    for i in range(len(keys)):  # the checker's loop, for the score it does not return
        adjustment = 0.0
        for index, weight in enumerate(checker.special_care_embeds_weights):
            if round(float(special[i, index]) - weight.item() + adjustment, 3) > 0:
                adjustment = 0.01
        largest.append(max(round(float(concept[i, index]) - weight.item() + adjustment, 3)
                           for index, weight in enumerate(checker.concept_embeds_weights)))
    return {key: (largest[i], has_nsfw[i], float(clip_score[i])) for i, key in enumerate(keys)}


def scored(tiny_models) -> list[str]:
    return ["--scores", "nsfw,clip", "--safety-checker", str(tiny_models["safety_checker"]), "--clip-model",
            str(tiny_models["clip"])]


def test_scores_equal_the_reference_models_on_the_stored_images(run, tiny_models):
    scorers = ["--safety-checker", str(tiny_models["safety_checker"]), "--clip-model", str(tiny_models["clip"])]
    plain_rows, plain_images = image_rows(run("generate"))
    rows, images = image_rows(run("generate", *scored(tiny_models)))
    assert images == plain_images  # scoring changes no image
    assert {row["key"] for row in rows} == {row["key"] for row in plain_rows}
    expected = reference_scores(tiny_models, rows, images)
    flags = []
    for row in rows:
        score, flag, clip_score = expected[row["key"]]
        assert row["nsfw_score"] == pytest.approx(score, abs=NSFW_SCORE_TOLERANCE)
        if abs(score) > NSFW_SCORE_TOLERANCE:
            assert row["nsfw"] == flag
        assert row["clip_score"] == pytest.approx(clip_score, abs=CLIP_SCORE_TOLERANCE)
        flags.append(row["nsfw"])
    assert 0 < sum(flags) < len(flags)  # the tiny checker flags some images, and its flags change none

    table = pq.read_table(sorted((run("generate", "--scores", "nsfw", *scorers)).glob("*.parquet"))[0])
    assert "nsfw_score" in table.column_names and "clip_score" not in table.column_names


def test_teacher_images_are_scored_and_failed_rows_have_none(run, tiny_models):
    output = run("reflow-pairs", "--no-student", "--teacher-images", "--scores", "nsfw", "--safety-checker",
                 str(tiny_models["safety_checker"]))
    table = pq.read_table(sorted(output.glob("*.parquet"))[0])
    assert table.column("nsfw").null_count == 0 and table.column("nsfw_score").type == pa.float32()
    run("reflow-pairs", "--no-student", "--scores", "nsfw", status=2)  # no image to score


def test_scores_in_the_readers(run, tiny_models, ray_gpus):
    """Hugging Face datasets (image Parquet), webdataset's .json and Ray Data see the new columns."""
    import datasets
    import ray.data
    import webdataset as wds

    parquet_output = run("generate", "--format", "parquet", *scored(tiny_models), "--lora",
                         str(tiny_models["lora-kohya"]))
    loaded = datasets.load_dataset("parquet", data_files=str(parquet_output / "*.parquet"), split="train")
    assert {"nsfw_score", "nsfw", "clip_score", "lora"} <= set(loaded.column_names)
    assert loaded.features["nsfw"].dtype == "bool" and loaded.features["clip_score"].dtype == "float32"

    tar_output = run("generate", *scored(tiny_models))
    sample = next(iter(wds.WebDataset(str(sorted(tar_output.glob("*.tar"))[0]), shardshuffle=False)))
    metadata = json.loads(sample["json"])
    assert isinstance(metadata["clip_score"], float) and isinstance(metadata["nsfw"], bool)
    assert json.loads(loaded[0]["lora"])[0]["name"] == "lora-kohya.safetensors"

    rows = ray.data.read_parquet(str(parquet_output), file_extensions=["parquet"]).take_all()
    assert len(rows) == NUM_PROMPTS and all("clip_score" in row for row in rows)


def test_preview_shows_scores_where_a_job_made_them(run, tiny_models, tmp_path, capsys):
    from jobs.preview import read_samples, score_line

    output = run("generate", *scored(tiny_models))
    rows = {row["key"]: row for row in image_rows(output)[0]}
    _, samples, _ = read_samples(str(output), 4)
    for sample in samples:
        row = rows[sample.key]
        assert sample.scores == {name: row[name] for name in ("nsfw_score", "nsfw", "clip_score")}
        assert f"clip {row['clip_score']:.1f}" in score_line(sample.scores)
    assert main(["preview", str(output), "--out", str(tmp_path / "sheet.png"), "--n", "4", "--scores"]) == 0
    assert main(["verify", str(output)]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0
    _, plain, _ = read_samples(str(run("generate")), 1)
    assert plain[0].scores == {} and score_line(plain[0].scores) == "no scores"


@pytest.fixture(scope="module")
def control_prompts(tmp_path_factory):
    """Prompts with a control image per row: PNG bytes in one file (bad ones among them), paths in another."""
    folder = tmp_path_factory.mktemp("control")
    rng = np.random.default_rng(3)
    images = [(rng.random((128, 128, 3)) * 255).astype(np.uint8) for _ in range(5)]
    encoded = [png_bytes(image) for image in images]
    (folder / "maps").mkdir()
    (folder / "maps" / "edge.png").write_bytes(encoded[0])
    rows = {"prompt": [f"a red fox number {i}" for i in range(8)],
            "control_image": encoded[:4] + [b"not an image", None, png_bytes(images[4][:64]), encoded[4]]}
    pq.write_table(pa.table(rows), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": ["a house", "a boat"], "control_image": ["maps/edge.png", "maps/none.png"]}),
                   folder / "b.parquet")
    return folder


def test_controlnet_rows_fail_alone_and_record_scale_and_digest(run, tiny_models, control_prompts):
    controlnet = ["--controlnet", str(tiny_models["controlnet"])]
    rows, _ = image_rows(run("generate", *controlnet, "--controlnet-scale", "0.8", inputs=control_prompts))
    by_prompt = {row["prompt"]: row for row in rows}
    failed = {row["prompt"]: row["error_message"] for row in rows if row["status"] == "failed"}
    assert failed.keys() == {"a red fox number 4", "a red fox number 5", "a red fox number 6", "a boat"}
    assert "a.parquet row 4: control image (control_image): cannot be decoded" in failed["a red fox number 4"]
    assert "a.parquet row 5: control image (control_image): missing" in failed["a red fox number 5"]
    assert "row 6: control image (control_image): 128x64 has another aspect ratio" in failed["a red fox number 6"]
    assert "b.parquet row 1: control image (control_image): 'maps/none.png': no such file" in failed["a boat"]
    table = pq.read_table(sorted(control_prompts.glob("a.parquet"))[0])
    first = table.column("control_image")[0].as_py()
    assert by_prompt["a red fox number 0"]["control_digest"] == hashlib.sha256(first).hexdigest()
    assert by_prompt["a house"]["control_digest"] == hashlib.sha256(first).hexdigest()  # the same file, by path
    assert by_prompt["a red fox number 0"]["controlnet_scale"] == pytest.approx(0.8)
    assert by_prompt["a boat"]["control_digest"] is None and "control_image" not in by_prompt["a house"]

    valid = control_prompts.parent / f"{control_prompts.name}-valid.parquet"  # batches as in a job without
    pq.write_table(pq.read_table(control_prompts / "a.parquet").slice(0, 4), valid)
    zero = image_rows(run("generate", *controlnet, "--controlnet-scale", "0", inputs=valid))[1]
    plain = image_rows(run("generate", inputs=valid))[1]
    assert len(zero) == 4 and zero == plain  # scale 0 is no ControlNet, byte for byte
    controlled = image_rows(run("generate", *controlnet, inputs=valid))[1]
    assert all(controlled[key] != plain[key] for key in plain)


def test_controlnet_teacher_pairs_and_a_missing_column(run, tiny_models, control_prompts, prompts, capsys):
    controlnet = ["--controlnet", str(tiny_models["controlnet"])]
    plain = run("reflow-pairs", "--no-student", inputs=control_prompts)
    conditioned = run("reflow-pairs", *controlnet, "--control-preprocess", "canny", inputs=control_prompts)
    ours = pq.read_table(sorted(conditioned.glob("pairs/*.parquet"))[0])
    theirs = pq.read_table(sorted(plain.glob("*.parquet"))[0])
    ok = [i for i, status in enumerate(ours.column("status").to_pylist()) if status == "ok"]
    assert ok and ours.column("latent").take(ok) != theirs.column("latent").take(ok)
    assert set(ours.column("controlnet_scale").to_pylist()) == {1.0, None}
    identity = json.loads((conditioned / "_job.json").read_text())["spec"]
    assert identity["controlnet"]["name"] == "controlnet" and identity["control_preprocess"] == "canny"
    assert identity["canny_low"] == 100 and "controlnet" not in json.loads((plain / "_job.json").read_text())["spec"]

    output = run("generate", *controlnet, status=2)  # the other prompts have no control column
    line = error_line(capsys)
    assert "no column 'control_image' (--control-column)" in line and not output.exists()
