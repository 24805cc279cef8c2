"""ControlNet in the model layer against a transcription of the step and diffusers' own ControlNet pipeline, and
the control images a job prepares, on the tiny models and the tiny ControlNet (jobs/tiny), fp32 on the CPU."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from instaflow.controlnet import ControlNet
from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch, Settings, Student, Teacher
from instaflow.sampling import noise_for_seed

PROMPTS = ["a lighthouse on a cliff during a storm", "a bowl of ramen, studio photo", "a red fox in the snow"]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def cache():
    return ComponentCache(Runtime.default(device="cpu"))


@pytest.fixture(scope="module")
def control_images() -> torch.Tensor:
    """(3, 64, 64, 3) uint8: smooth random images, as edge or depth maps are smooth-ish."""
    generator = torch.Generator().manual_seed(5)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=generator), size=64, mode="bilinear")
    return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def batch_with(images: torch.Tensor, controlnet: ControlNet | None, negative=None) -> PromptBatch:
    """A batch under `controlnet` with these control images, as the ControlNet stage prepares it."""
    batch = PromptBatch(PROMPTS, SEEDS, [negative] * len(PROMPTS))
    if controlnet is not None:
        batch.conditioners.append(controlnet.control(images))
    return batch


def transcribed_controlled_flow(components, controlnet, scale, images, steps, guidance_scale):
    """The Euler steps of RectifiedFlowPipeline with a ControlNet, written out again with diffusers' ControlNetModel
    and no code of ours: at t_i = (1 - i/N) * 1000 the ControlNet sees the UNet's input; its residuals, times the
    scale, enter the UNet; z <- z + v / N. With guidance, each half is run apart (the control image given to
    both)."""
    tokenizer, text_encoder, unet, vae = components.tokenizer, components.text_encoder, components.unet, components.vae

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    cond_image = images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        cond, uncond = embed(PROMPTS), embed([""] * len(PROMPTS))
        z = torch.cat([noise_for_seed(seed, 64, 64) for seed in SEEDS])

        def velocity(t, embeds):
            down, mid = controlnet(z, t, encoder_hidden_states=embeds, controlnet_cond=cond_image,
                                   conditioning_scale=scale, return_dict=False)
            return unet(z, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

        for i in range(steps):
            t = torch.full((len(PROMPTS),), (1 - i / steps) * 1000.0)
            v = velocity(t, cond)
            if guidance_scale > 1:
                v_uncond = velocity(t, uncond)
                v = v_uncond + guidance_scale * (v - v_uncond)
            z = z + v / steps
        x = vae.decode(z / vae.config.scaling_factor).sample
    return z, ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)


@pytest.mark.parametrize("model,steps,guidance,scale", [("instaflow", 1, 0.0, 1.0), ("2rf", 3, 1.5, 0.7),
                                                         ("instaflow", 1, 4.0, 1.3)])
def test_student_equals_the_transcribed_step(cache, tiny_models, control_images, model, steps, guidance, scale):
    components = cache.load(str(tiny_models[model]))
    controlnet = cache.load_controlnet(str(tiny_models["controlnet"]))
    student = Student(components, Settings(steps, guidance, 64, 64))
    under = ControlNet(controlnet, scale)
    latents, _ = student.sample_latents(batch_with(control_images, under))
    want_latents, want_pixels = transcribed_controlled_flow(components, controlnet, scale, control_images, steps,
                                                            guidance)
    torch.testing.assert_close(latents, want_latents, atol=1e-4, rtol=1e-4)
    pixels = student.generate(batch_with(control_images, under)).pixels
    assert (pixels.float() - want_pixels).abs().max() <= 1
    plain, _ = student.sample_latents(batch_with(control_images, None))
    assert (latents - plain).abs().mean() > 0.05  # the ControlNet moves the samples: the comparison is not vacuous
    other, _ = student.sample_latents(batch_with(control_images.flip(1), under))
    assert (latents - other).abs().mean() > 0.01  # and so does the control image itself


def test_scale_zero_is_no_controlnet(cache, tiny_models, control_images):
    components = cache.load(str(tiny_models["instaflow"]))
    controlnet = cache.load_controlnet(str(tiny_models["controlnet"]))
    student = Student(components, Settings(1, 0.0, 64, 64))
    assert torch.equal(student.generate(batch_with(control_images, ControlNet(controlnet, 0.0))).pixels,
                       student.generate(batch_with(control_images, None)).pixels)


@pytest.mark.parametrize("guidance,negative,scale", [(5.0, None, 1.0), (7.5, "blurry", 0.6), (1.0, None, 1.0)])
def test_teacher_equals_diffusers_controlnet_pipeline(cache, tiny_models, control_images, guidance, negative, scale):
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    components = cache.load(str(tiny_models["sd15"]))
    controlnet = cache.load_controlnet(str(tiny_models["controlnet"]))
    teacher = Teacher(components, "sd", Settings(25, guidance, 64, 64))
    ours = teacher.pairs(batch_with(control_images, ControlNet(controlnet, scale), negative))

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_models["sd15"], controlnet=ControlNetModel.from_pretrained(tiny_models["controlnet"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.cat([noise_for_seed(seed, 64, 64) for seed in SEEDS])
    theirs = pipe(PROMPTS, image=[Image.fromarray(image.numpy()) for image in control_images],
                  negative_prompt=[negative] * 3 if negative else None, latents=noise, num_inference_steps=25,
                  guidance_scale=guidance, controlnet_conditioning_scale=scale, output_type="latent", height=64,
                  width=64).images
    assert (ours.latents - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours.latents, theirs, atol=1e-4, rtol=1e-4)  # the pairs' tolerance
    plain = teacher.pairs(batch_with(control_images, None, negative))
    assert (ours.latents - plain.latents).abs().mean() > 0.01


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_control_images_are_resized_and_canny_is_opencvs(tmp_path):
    """What the stage hands the ControlNet: the image at the job's size (Lanczos, as diffusers resizes), or
    OpenCV's Canny edges of that, in all three channels; another aspect ratio is the row's error."""
    import cv2
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.row_images import RowImageError
    from pipeline.spec import JobSpec
    from pipeline.stages.controlnet import ControlNetStage

    rng = np.random.default_rng(0)
    image = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    for preprocess in ("none", "canny"):
        spec = JobSpec(prompts=str(tmp_path), output=str(tmp_path / "out"), model=str(tmp_path), height=64, width=64,
                       steps=1, guidance_scale=0.0, controlnet="lllyasviel/sd-controlnet-canny",
                       control_preprocess=preprocess, canny_low=50, canny_high=150)
        stage = ControlNetStage(spec, None, LocalFileSystem())  # no ControlNet: its host work alone
        resized = np.asarray(Image.fromarray(image).resize((64, 64), Image.LANCZOS))
        want = resized if preprocess == "none" else np.repeat(cv2.Canny(resized, 50, 150)[:, :, None], 3, axis=2)
        got = stage._pixels(png(image))
        assert got.shape == (64, 64, 3) and np.array_equal(got, want)
        with pytest.raises(RowImageError, match="another aspect ratio"):
            stage._pixels(png(image[:96]))
