"""The model layer against the published math and diffusers' own pipelines, on the tiny offline models."""

import shutil
import time

import pytest
import torch

from instaflow.loading import ComponentCache, ModelLoadError, Runtime, hub_patterns
from instaflow.models import PromptBatch, Settings, Student, Teacher, student_defaults, teacher_defaults
from instaflow.sampling import check_inputs, finite_per_sample, noise_for_seed, to_pixels
from instaflow.text import tokenize_prompts
from jobs.tiny.pipelines import build_tokenizer, build_unet

PROMPTS = [
    "a lighthouse on a cliff during a storm, oil painting",
    "a bowl of ramen, studio photo",
    "an astronaut riding a horse on the moon",
    "",  # the empty prompt is what the unconditional branch sees; it must still encode
]


@pytest.fixture(scope="module")
def cache():
    return ComponentCache(Runtime.default())


def transcribed_rectified_flow(components, prompts, seeds, steps, guidance_scale, height, width):
    """The official RectifiedFlowPipeline's math, written out again from the paper's formulas, no shared code."""
    tokenizer, text_encoder, unet, vae = (
        components.tokenizer, components.text_encoder, components.unet, components.vae
    )

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    with torch.no_grad():
        cond = embed(prompts)
        uncond = embed([""] * len(prompts))
        z = torch.cat([
            torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(s))
            for s in seeds
        ])
        for i in range(steps):
            t = torch.full((len(prompts),), (1 - i / steps) * 1000.0)
            v_text = unet(z, t, encoder_hidden_states=cond).sample
            if guidance_scale > 1:
                v_uncond = unet(z, t, encoder_hidden_states=uncond).sample
                v = v_uncond + guidance_scale * (v_text - v_uncond)
            else:
                v = v_text
            z = z + v / steps
        x = vae.decode(z / vae.config.scaling_factor).sample
    return z, (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("model,steps,guidance", [("instaflow", 1, 0.0), ("2rf", 3, 1.5), ("instaflow", 1, 4.0)])
def test_student_equals_transcribed_formulas(cache, tiny_models, model, steps, guidance):
    components = cache.load(str(tiny_models[model]))
    student = Student(components, Settings(steps, guidance, 64, 64))
    seeds = [11, 22, 33]
    batch = PromptBatch(PROMPTS[:3], seeds, [None] * 3)
    latents, _ = student.sample_latents(batch)
    want_latents, want_images = transcribed_rectified_flow(components, PROMPTS[:3], seeds, steps, guidance, 64, 64)
    assert (latents - batch.noise(components, 64, 64)).abs().mean() > 0.1  # the tiny UNet moves the latents: the comparison is not vacuous
    torch.testing.assert_close(latents, want_latents, atol=1e-4, rtol=1e-4)
    pixels = student.generate(batch).pixels
    assert pixels.shape == (3, 64, 64, 3) and pixels.dtype == torch.uint8
    want_pixels = (want_images * 255).round().permute(0, 2, 3, 1)
    assert (pixels.float() - want_pixels).abs().max() <= 1


@pytest.mark.parametrize("guidance,negative", [(5.0, None), (7.5, "blurry, low quality"), (1.0, None)])
def test_sd_teacher_equals_diffusers_pipeline(cache, tiny_models, guidance, negative):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    components = cache.load(str(tiny_models["sd15"]))
    teacher = Teacher(components, "sd", Settings(25, guidance, 64, 64))
    prompts, seeds = PROMPTS[:2], [5, 6]
    ours = teacher.pairs(PromptBatch(prompts, seeds, [negative] * 2))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"], safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.cat([noise_for_seed(s, 64, 64) for s in seeds])
    theirs = pipe(
        prompts, negative_prompt=[negative] * 2 if negative else None, latents=noise, num_inference_steps=25,
        guidance_scale=guidance, output_type="latent", height=64, width=64,
    ).images
    torch.testing.assert_close(ours.noise, noise, atol=0, rtol=0)
    assert (ours.latents - noise).abs().mean() > 0.1
    torch.testing.assert_close(ours.latents, theirs, atol=1e-4, rtol=1e-4)


def test_rf_teacher_is_euler_on_the_2rf_model(cache, tiny_models):
    components = cache.load(str(tiny_models["2rf"]))
    teacher = Teacher(components, "rf", Settings(4, 1.5, 64, 64))
    out = teacher.pairs(PromptBatch(PROMPTS[:2], [1, 2], [None, None]))
    want, _ = transcribed_rectified_flow(components, PROMPTS[:2], [1, 2], 4, 1.5, 64, 64)
    torch.testing.assert_close(out.latents, want, atol=1e-4, rtol=1e-4)


def test_seed_contract():
    noise = noise_for_seed(1234, 64, 96)
    want = torch.randn((1, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(1234), dtype=torch.float32)
    assert torch.equal(noise, want)
    assert not torch.equal(noise, noise_for_seed(1235, 64, 96))


def test_batch_invariance(cache, tiny_models):
    """A sample's output does not depend on its batch or its position there: batch 1 against batch 16."""
    student = Student(cache.load(str(tiny_models["instaflow"])), Settings(1, 0.0, 64, 64))
    teacher = Teacher(cache.load(str(tiny_models["sd15"])), "sd", Settings(10, 5.0, 64, 64))
    prompts = [f"a photo of a cat number {i}" for i in range(16)]
    seeds = [1000 + i for i in range(16)]
    full = PromptBatch(prompts, seeds, [None] * 16)
    student_full, _ = student.sample_latents(full)
    teacher_full = teacher.pairs(full).latents
    for position in (0, 7, 15):
        alone = PromptBatch([prompts[position]], [seeds[position]], [None])
        torch.testing.assert_close(student.sample_latents(alone)[0][0], student_full[position], atol=1e-4, rtol=0)
        torch.testing.assert_close(teacher.pairs(alone).latents[0], teacher_full[position], atol=1e-4, rtol=0)


def test_shared_components_load_once(cache, tiny_models):
    student = cache.load(str(tiny_models["instaflow"]))
    teacher = cache.load(str(tiny_models["sd15"]))
    assert student.vae is teacher.vae
    assert student.text_encoder is teacher.text_encoder
    assert student.tokenizer is teacher.tokenizer
    assert student.unet is not teacher.unet


def test_tiny_models_round_trip_offline(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    components = ComponentCache(Runtime.default()).load(str(tiny_models["instaflow"]))
    rebuilt = build_unet(seed=4).state_dict()
    for name, tensor in components.unet.state_dict().items():
        assert torch.equal(tensor, rebuilt[name]), name
    assert components.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert components.default_size == 64


def test_tiny_tokenizer_is_a_working_clip_bpe(tiny_models):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models["sd15"] / "tokenizer")
    ids = tokenizer("a red fox sitting in the snow").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) < 16  # merges make whole words into few tokens
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red fox sitting in the snow"


def test_long_prompts_are_truncated_and_counted(cache, tiny_models):
    student = Student(cache.load(str(tiny_models["instaflow"])), Settings(1, 0.0, 64, 64))
    long_prompt = " ".join(["a very detailed castle"] * 40)
    out = student.generate(PromptBatch([long_prompt, "a cat"], [1, 2], [None, None]))
    assert out.truncated == [True, False]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=65), "height must be a multiple of 8"),
        (dict(width=0), "width must be a multiple of 8"),
        (dict(steps=0), "steps must be an integer"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=-1.0), "guidance_scale must be between"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    args = dict(height=64, width=64, steps=1, guidance_scale=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        check_inputs(**args)


def test_unknown_model_path_names_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        ComponentCache(Runtime.default()).load(str(tmp_path / "no-such-model"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"missing component folders \['vae', 'text_encoder', 'tokenizer'\]"):
        ComponentCache(Runtime.default()).load(str(tmp_path / "half"))


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="XCLiu/instaflow_0_9B_from_sd_1_5.*HF_HUB_OFFLINE"):
        ComponentCache(Runtime.default()).load("XCLiu/instaflow_0_9B_from_sd_1_5")
    assert time.monotonic() - started < 10  # no stack of retries


def test_defaults_follow_the_papers():
    assert student_defaults("XCLiu/instaflow_0_9B_from_sd_1_5") == (1, 0.0)
    assert student_defaults("XCLiu/2_rectified_flow_from_sd_1_5") == (25, 1.5)
    assert teacher_defaults("sd") == (25, 5.0)
    with pytest.raises(ValueError, match="teacher kind"):
        teacher_defaults("ddim")


def test_equal_weights_in_other_files_are_shared_and_pickles_refused(cache, tiny_models, tmp_path):
    """Sharing goes by tensors: a copy whose VAE and text encoder were saved again (other file bytes, sharded)
    shares them with the original; a model with only pickle weights loads only when allowed."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    copy = tmp_path / "resaved"
    shutil.copytree(tiny_models["instaflow"], copy)
    for name, loader in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        shutil.rmtree(copy / name)
        loader.from_pretrained(tiny_models["instaflow"] / name).save_pretrained(copy / name, max_shard_size="20KB")
    assert sorted(p.name for p in (copy / "vae").iterdir()) != sorted(
        p.name for p in (tiny_models["instaflow"] / "vae").iterdir())
    original, resaved = cache.load(str(tiny_models["instaflow"])), cache.load(str(copy))
    assert resaved.vae is original.vae and resaved.text_encoder is original.text_encoder

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["instaflow"], pickled)
    shutil.rmtree(pickled / "unet")
    build_unet(seed=4).save_pretrained(pickled / "unet", safe_serialization=False)
    with pytest.raises(ModelLoadError, match="no .safetensors weights.*--allow-pickle"):
        ComponentCache(Runtime.default()).load(str(pickled))
    unet = ComponentCache(Runtime.default(), allow_pickle=True).load(str(pickled)).unet
    assert torch.equal(unet.conv_out.weight, build_unet(seed=4).conv_out.weight)


def test_one_weight_format_is_downloaded_from_the_hub():
    full_allow, full_ignore = hub_patterns(None)
    fp16_allow, fp16_ignore = hub_patterns("fp16")
    assert "unet/*.safetensors" in full_allow and "*.fp16.*" in full_ignore
    assert "unet/*.fp16.safetensors" in fp16_allow and "unet/*.safetensors" not in fp16_allow
    assert not any(pattern.endswith((".bin", "/*")) and pattern.startswith(("unet", "vae", "text_encoder"))
                   for pattern in full_allow + fp16_allow)


def test_tokenising_once_equals_the_tokenizers_own_padding_and_truncation(tiny_models):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models["sd15"] / "tokenizer")
    prompts = ["a cat", "", " ".join(["a very detailed castle"] * 40), "ünïcödé 東京 🦊"]
    tokens = tokenize_prompts(tokenizer, prompts)
    want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokens.input_ids, want.input_ids)
    assert torch.equal(tokens.attention_mask, want.attention_mask)
    assert tokens.truncated == [False, False, True, False]


def test_to_pixels_equals_diffusers_out_of_place_chain():
    """The in-place, chunked post-processing gives diffusers' values exactly, NaN and inf included, any dtype."""
    def diffusers_chain(images):
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((3, 3, 64, 64), (2, 3, 256, 320), (1, 3, 8, 24)):
            images = (torch.randn(shape, generator=generator) * 0.8).to(dtype)
            images.view(-1)[::97] = float("nan")
            images.view(-1)[5::89] = float("inf")
            images.view(-1)[7::83] = -float("inf")
            for layout in (images, images.transpose(2, 3)):
                want, got = diffusers_chain(layout), to_pixels(layout)
                assert got.shape == want.shape and torch.equal(got, want)


def test_non_finite_samples_are_found_per_sample():
    latents, images = torch.zeros(4, 4, 8, 8), torch.zeros(4, 3, 64, 64)
    latents[1, 0, 0, 0] = float("nan")
    images[3, 2, 5, 5] = float("inf")
    assert finite_per_sample(latents, images).tolist() == [True, False, True, False]
    images[2, 0, 0, 0] = -float("inf")
    latents[0, 3, 7, 7] = float("nan")
    assert finite_per_sample(latents.half(), images).tolist() == [False, False, False, False]
    assert finite_per_sample(torch.full((2, 3), 3e38), torch.zeros(2, 0)).tolist() == [True, True]
