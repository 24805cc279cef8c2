"""The SDXL refiner stage: the model layer against diffusers' StableDiffusionXLImg2ImgPipeline on the tiny refiner
(jobs/tiny/refiner.py), fp32 on the CPU, and what a job stores with it."""

import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch
from instaflow.refiner import Refiner, RefinerSettings, refined_size, refiner_seed
from jobs.main import main
from tests.jobhelpers import prompt_table, tar_members

PROMPTS = ["a red fox in the snow", "a castle above the sea at sunset", "a bowl of ramen, studio photo"]
SEEDS = [5, 9, 2**62 + 3]
TOLERANCE = 1  # uint8 levels: the same math, the VAE encoding the batch at once where the pipeline encodes per row


@pytest.fixture(scope="module")
def components(tiny_models):
    return ComponentCache(Runtime.default(device="cpu")).load_refiner(str(tiny_models["sdxl-refiner"]))


@pytest.fixture(scope="module")
def pipeline(tiny_models):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_models["sdxl-refiner"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student_pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(3, 3, 8, 8, generator=generator), size=64, mode="bilinear")
    return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def refined(components, settings, pixels, prompts=PROMPTS, seeds=SEEDS, negatives=None, size=96):
    refiner = Refiner(components, settings, size)
    batch = PromptBatch(prompts, seeds, negatives or [None] * len(prompts))
    refiner.prepare(batch)
    return refiner.refine(pixels, batch, seeds)


@pytest.mark.parametrize("strength,steps,guidance,negative", [(0.3, 50, 5.0, None), (0.6, 10, 7.0, "blurry"),
                                                              (1.0, 4, 1.0, None)])
def test_refiner_equals_diffusers_img2img(components, pipeline, student_pixels, strength, steps, guidance, negative):
    settings = RefinerSettings(strength=strength, steps=steps, guidance_scale=guidance)
    ours = refined(components, settings, student_pixels, negatives=[negative] * 3 if negative else None)
    # the pipeline gets the same image: the student's, resized as the stage resizes it, in [0, 1]
    image = F.interpolate(student_pixels.permute(0, 3, 1, 2).float() / 255, size=(96, 96), mode="bicubic",
                          antialias=True).clamp(0, 1)
    generators = [torch.Generator("cpu").manual_seed(refiner_seed(seed)) for seed in SEEDS]
    theirs = pipeline(PROMPTS, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                      negative_prompt=[negative] * 3 if negative else None, generator=generators,
                      output_type="np").images
    theirs = torch.from_numpy((theirs * 255).round()).to(torch.uint8)
    assert ours.pixels.shape == theirs.shape == (3, 96, 96, 3) and bool(ours.finite.all())
    assert (ours.pixels.int() - theirs.int()).abs().max() <= TOLERANCE
    resized = (image * 255).round().permute(0, 2, 3, 1)
    assert (ours.pixels.float() - resized).abs().mean() > 5  # the tiny refiner changes the image visibly


def test_a_row_refines_the_same_alone_and_in_a_batch(components, student_pixels):
    settings = RefinerSettings(strength=0.5, steps=10)
    together = refined(components, settings, student_pixels).pixels
    alone = refined(components, settings, student_pixels[1:2], PROMPTS[1:2], SEEDS[1:2]).pixels
    assert (together[1:2].int() - alone.int()).abs().max() <= TOLERANCE
    other_seed = refined(components, settings, student_pixels[1:2], PROMPTS[1:2], [SEEDS[1] + 1]).pixels
    assert (other_seed.float() - alone.float()).abs().mean() > 1  # the row's seed decides its refiner noise


def test_a_row_without_a_negative_prompt_refines_the_same_beside_one_with_it(components, pipeline, student_pixels):
    """A refiner whose config zeroes an absent negative prompt (SDXL base pipelines do) zeroes it per row, as the
    pipeline run on that row alone: a batch where another row has a negative prompt used to encode "" instead."""
    zeroing = dataclasses.replace(components, force_zeros_for_empty_prompt=True)
    settings = RefinerSettings(strength=0.5, steps=10)
    mixed = refined(zeroing, settings, student_pixels, negatives=[None, "blurry", None]).pixels
    pipeline.register_to_config(force_zeros_for_empty_prompt=True)
    try:
        for row, negative in enumerate([None, "blurry", None]):
            image = F.interpolate(student_pixels[row:row + 1].permute(0, 3, 1, 2).float() / 255, size=(96, 96),
                                  mode="bicubic", antialias=True).clamp(0, 1)
            theirs = pipeline(PROMPTS[row], image=image, strength=0.5, num_inference_steps=10,
                              negative_prompt=negative, output_type="np",
                              generator=torch.Generator("cpu").manual_seed(refiner_seed(SEEDS[row]))).images
            theirs = torch.from_numpy((theirs * 255).round()).to(torch.uint8)
            assert (mixed[row:row + 1].int() - theirs.int()).abs().max() <= TOLERANCE, row
    finally:
        pipeline.register_to_config(force_zeros_for_empty_prompt=False)
    encoded_empty = refined(zeroing, settings, student_pixels, negatives=[""] * 3).pixels
    assert (encoded_empty[0].float() - mixed[0].float()).abs().mean() > 1  # zeros are not the encoded ""


def test_offloading_gives_the_same_images_and_leaves_the_models_in_host_memory(tiny_models, student_pixels):
    """--refiner-offload through the stage's loading: the same pixels, and every module back on the host after each
    batch (on this machine the device is the host too, so what it saves in device memory is not measured here)."""
    from pipeline.spec import JobSpec
    from pipeline.stages.refiner import RefinerStage
    from pipeline.model_source import resolve_model_source

    sources = {"refiner": resolve_model_source(str(tiny_models["sdxl-refiner"]), "float32", layout="xl")}
    spec = dict(prompts="p", output="o", model=str(tiny_models["instaflow"]), refiner=str(tiny_models["sdxl-refiner"]),
                refine_size=96, refiner_steps=10, device="cpu", dtype="float32")
    cache = ComponentCache(Runtime.default(device="cpu"))
    plain = RefinerStage.load(JobSpec(**spec), sources, cache).refiner
    offloaded = RefinerStage.load(JobSpec(**spec, refiner_offload=True), sources, cache).refiner
    assert offloaded.offload and not plain.offload

    def run(refiner):
        batch = PromptBatch(PROMPTS, SEEDS, [None] * 3)
        refiner.prepare(batch)
        return refiner.refine(student_pixels, batch, SEEDS).pixels

    assert torch.equal(run(plain), run(offloaded))
    modules = [offloaded.components.unet, offloaded.components.vae, *offloaded.components.text_encoders]
    assert all(p.device.type == "cpu" for module in modules for p in module.parameters())


def test_a_refiner_vae_with_the_students_weights_keeps_its_own_config(tiny_models):
    """The tiny refiner's VAE holds the tiny student's weights with SDXL's scaling factor: loaded after the student
    in one cache (as a worker loads them), it must not be the student's module."""
    cache = ComponentCache(Runtime.default(device="cpu"))
    student = cache.load(str(tiny_models["instaflow"]))
    refiner = cache.load_refiner(str(tiny_models["sdxl-refiner"]))
    assert torch.equal(student.vae.decoder.conv_out.weight, refiner.vae.decoder.conv_out.weight)
    assert refiner.vae is not student.vae
    assert (student.vae.config.scaling_factor, refiner.vae.config.scaling_factor) == (0.18215, 0.13025)


def test_refined_size_keeps_the_aspect_ratio():
    assert refined_size(512, 512, 1024) == (1024, 1024)
    assert refined_size(512, 768, 1024) == (680, 1024) and refined_size(768, 512, 1024) == (1024, 680)
    assert refined_size(64, 64, 96) == (96, 96)


def test_refiner_settings_that_make_no_step_are_refused():
    with pytest.raises(ValueError, match="at least one step"):
        RefinerSettings(strength=0.01, steps=50).check()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("refine") / "prompts.parquet"
    pq.write_table(prompt_table(6), path, row_group_size=3)
    return path


def test_a_job_stores_the_refined_image_and_keeps_the_students(ray_gpus, tiny_models, pipeline, prompts, tmp_path,
                                                                capsys):
    job = ["run", "generate", "--prompts", str(prompts), "--model", str(tiny_models["instaflow"]), "--height", "64",
           "--width", "64", "--dtype", "float32", "--image-format", "png", "--rows-per-shard", "3",
           "--num-workers", "1", "--no-progress"]
    refine = ["--refiner", str(tiny_models["sdxl-refiner"]), "--refine-size", "96", "--refiner-steps", "10"]
    assert main([*job, "--output", str(tmp_path / "plain")]) == 0
    assert main([*job, "--output", str(tmp_path / "refined"), *refine, "--keep-unrefined"]) == 0
    assert main([*job, "--output", str(tmp_path / "parquet"), *refine, "--keep-unrefined", "--format",
                 "parquet"]) == 0

    plain = {name: data for tar in sorted((tmp_path / "plain").glob("*.tar"))
             for name, data in tar_members(tar.read_bytes()).items()}
    members = {name: data for tar in sorted((tmp_path / "refined").glob("*.tar"))
               for name, data in tar_members(tar.read_bytes()).items()}
    keys = sorted(name[:-4] for name in plain if name.endswith(".png"))
    assert len(keys) == 6
    for key in keys:
        assert members[f"{key}.unrefined.png"] == plain[f"{key}.png"]  # the student's image, as without a refiner
        assert Image.open(io.BytesIO(members[f"{key}.png"])).size == (96, 96)
        row = json.loads(members[f"{key}.json"])
        assert (row["refiner"], row["refined_height"], row["refined_width"], row["refiner_steps"]) == (
            "sdxl-refiner", 96, 96, 10)
        assert row["refiner_seed"] == refiner_seed(row["seed"]) and row["refiner_strength"] == pytest.approx(0.3)

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "parquet" / "*.parquet"), split="train")
    assert loaded.features["unrefined_image"].__class__.__name__ == "Image"
    first = loaded[0]
    assert first["image"].size == (96, 96) and first["unrefined_image"].size == (64, 64)
    # each stored image is diffusers' img2img pipeline run on what its row records: the stored unrefined image
    # (resized to the refine size as jobs/README.md says), the row's prompt, a CPU generator seeded with refiner_seed
    for row in loaded:
        unrefined = torch.from_numpy(np.array(row["unrefined_image"].convert("RGB"))).permute(2, 0, 1)[None]
        image = F.interpolate(unrefined.float() / 255, size=(row["refined_height"], row["refined_width"]),
                              mode="bicubic", antialias=True).clamp(0, 1)
        theirs = pipeline(row["prompt"], image=image, strength=row["refiner_strength"],
                          num_inference_steps=row["refiner_steps"],
                          generator=torch.Generator("cpu").manual_seed(row["refiner_seed"]), output_type="np").images
        stored = np.asarray(row["image"].convert("RGB"), dtype=np.int64)
        assert np.abs((theirs[0] * 255).round().astype(np.int64) - stored).max() <= TOLERANCE, row["key"]
    assert main(["verify", str(tmp_path / "refined")]) == 0

    capsys.readouterr()
    assert main([*job, "--output", str(tmp_path / "bad"), *refine, "--refiner-strength", "0.05"]) == 2
    assert "must run at least one" in capsys.readouterr().err
    assert main([*job, "--output", str(tmp_path / "bad"), "--keep-unrefined"]) == 2
    assert "needs --refiner" in capsys.readouterr().err
