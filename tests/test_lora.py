"""LoRA fusing and fine-tune merges (instaflow.lora) against the LoRA formula and diffusers' unfused adapters, on
the tiny models and the tiny adapters (jobs/tiny/adapters.py), fp32 on the CPU."""

import copy
import dataclasses
import hashlib
import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from PIL import Image

from jobs.main import main

from instaflow.loading import ComponentCache, Runtime, component_digest, tensor_digest
from instaflow.lora import (
    LoraError,
    LoraMismatchError,
    MergeMismatchError,
    check_lora,
    fuse_loras,
    merge_finetune,
    meta_modules,
    read_lora,
)
from instaflow.models import PromptBatch, Settings, Student
from jobs.tiny.adapters import ALPHA, LORA_UP_GAIN, RANK, write_tiny_adapters
from tests.jobhelpers import prompt_table, tar_members

UNET_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
KOHYA_UNET = "lora_unet_" + UNET_MODULE.replace(".", "_")
TE_MODULE = "encoder.layers.1.self_attn.out_proj"
KOHYA_TE = "lora_te_text_model_" + TE_MODULE.replace(".", "_")
FUSED_TOLERANCE = 1e-5  # fp32: fused W + s*a/r*B@A against the unfused adapter, on outputs of magnitude ~1


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    return write_tiny_adapters(tmp_path_factory.mktemp("adapters"), tiny_models["sd15"])


@pytest.fixture(scope="module")
def cache():
    return ComponentCache(Runtime.default(device="cpu"))


@pytest.fixture(scope="module")
def student(cache, tiny_models):
    return cache.load(str(tiny_models["instaflow"]))


def fused(components, loras):
    """The components with copies of the UNet and text encoder that have `loras` fused in."""
    unet, text_encoder = copy.deepcopy(components.unet), copy.deepcopy(components.text_encoder)
    fuse_loras(unet, text_encoder, loras)
    return dataclasses.replace(components, unet=unet, text_encoder=text_encoder)


def images(components) -> torch.Tensor:
    batch = PromptBatch(["a red fox in the snow", "a castle above the sea at sunset"], [3, 7], [None, None])
    return Student(components, Settings(1, 0.0, 64, 64)).generate(batch).pixels


def unet_velocity(unet, components):
    """The UNet's velocity for fixed noise and prompt embeddings (of the unchanged text encoder)."""
    ids = components.tokenizer(["a red fox in the snow"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = components.text_encoder(ids)[0]
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        return unet(noise, torch.tensor([1000.0]), encoder_hidden_states=embeds).sample


def text_embeddings(text_encoder, components):
    ids = components.tokenizer(["a castle above the sea at sunset"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[name] - sb[name]).abs().max().item() for name in sa)


def test_scale_zero_is_no_lora(student, adapters):
    lora = read_lora(adapters["lora-kohya"])
    zero = fused(student, [(lora, 0.0)])
    assert tensor_digest(zero.unet) == tensor_digest(student.unet)
    assert tensor_digest(zero.text_encoder) == tensor_digest(student.text_encoder)
    assert torch.equal(images(zero), images(student))


def test_lora_changes_images_visibly_and_leaves_plain_modules(student, adapters):
    with_lora = fused(student, [(read_lora(adapters["lora-kohya"]), 1.0)])
    before, after = images(student).float(), images(with_lora).float()
    assert (after - before).abs().mean() > 5  # of 255: a visible change
    assert torch.isfinite(after).all()
    for fused_module, plain in ((with_lora.unet, student.unet), (with_lora.text_encoder, student.text_encoder)):
        assert type(fused_module.get_submodule(UNET_MODULE if plain is student.unet else TE_MODULE)) is torch.nn.Linear
        assert fused_module.state_dict().keys() == plain.state_dict().keys()  # no LoRA layers left
        assert not getattr(fused_module, "peft_config", None)


def test_fused_equals_lora_formula_and_unfused_adapter(student, adapters):
    """W + scale * alpha / rank * up @ down, read from the file by hand; and diffusers' adapter, loaded and active
    but not fused, gives the same UNet and text-encoder outputs."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as loader
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    scale = 0.7
    lora = read_lora(adapters["lora-kohya"])
    with_lora = fused(student, [(lora, scale)])
    raw = safetensors.torch.load_file(adapters["lora-kohya"])
    for module, kohya, base, merged in ((UNET_MODULE, KOHYA_UNET, student.unet, with_lora.unet),
                                        (TE_MODULE, KOHYA_TE, student.text_encoder, with_lora.text_encoder)):
        assert raw[f"{kohya}.alpha"].item() == ALPHA != RANK
        delta = scale * ALPHA / RANK * raw[f"{kohya}.lora_up.weight"] @ raw[f"{kohya}.lora_down.weight"]
        expected = base.get_submodule(module).weight + delta
        torch.testing.assert_close(merged.get_submodule(module).weight, expected, rtol=0, atol=1e-6)

    unet, text_encoder = copy.deepcopy(student.unet), copy.deepcopy(student.text_encoder)
    renamed = check_lora(lora, unet, text_encoder)  # in the module names diffusers' loaders take
    loader.load_lora_into_unet(renamed.state_dict, None, unet, adapter_name="unfused", metadata=renamed.metadata)
    loader.load_lora_into_text_encoder(renamed.state_dict, None, text_encoder, adapter_name="unfused",
                                       metadata=renamed.metadata)
    unet.set_adapters(["unfused"], weights=[scale])
    set_adapters_for_text_encoder(["unfused"], text_encoder, [scale])
    assert unet_velocity(unet, student).sub(unet_velocity(student.unet, student)).abs().max() > 0.05
    torch.testing.assert_close(unet_velocity(with_lora.unet, student), unet_velocity(unet, student),
                               rtol=0, atol=FUSED_TOLERANCE)
    torch.testing.assert_close(text_embeddings(with_lora.text_encoder, student),
                               text_embeddings(text_encoder, student), rtol=0, atol=FUSED_TOLERANCE)


def test_kohya_and_diffusers_files_give_the_same_lora(student, adapters, tmp_path):
    """The kohya file (alpha in the file), the diffusers file (alpha/rank folded into lora_B) and a diffusers file
    with adapter metadata (alpha in its header, as diffusers writes now; its text-encoder module names with
    `text_model.`, as written under transformers 4) fuse to the same weights, within fp32 rounding, and the same
    images, within one level of 255."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    raw = safetensors.torch.load_file(adapters["lora-diffusers"])
    unscaled = {k: v / (ALPHA / RANK) if ".lora_B." in k else v for k, v in raw.items()}
    parts = {part: {k.removeprefix(f"{part}."): v for k, v in unscaled.items() if k.startswith(f"{part}.")}
             for part in ("unet", "text_encoder")}
    metadata = {part: {"r": RANK, "lora_alpha": ALPHA,
                       "target_modules": sorted({k.split(".lora_")[0] for k in parts[part]})} for part in parts}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        weight_name="lora-metadata.safetensors")
    with_metadata = read_lora(tmp_path / "lora-metadata.safetensors")
    assert with_metadata.metadata and not with_metadata.kohya

    kohya = fused(student, [(read_lora(adapters["lora-kohya"]), 1.0)])
    kohya_images = images(kohya).int()
    for lora in (read_lora(adapters["lora-diffusers"]), with_metadata):
        other = fused(student, [(lora, 1.0)])
        assert max_difference(other.unet, kohya.unet) < 1e-6
        assert max_difference(other.text_encoder, kohya.text_encoder) < 1e-6
        assert (images(other).int() - kohya_images).abs().max() <= 1


def test_several_loras_add_with_their_scales(student, adapters):
    kohya, diffusers_file = read_lora(adapters["lora-kohya"]), read_lora(adapters["lora-diffusers"])
    both = fused(student, [(kohya, 0.5), (diffusers_file, 0.25)])
    once = fused(student, [(kohya, 0.75)])
    assert max_difference(both.unet, once.unet) < 1e-6
    assert max_difference(both.text_encoder, once.text_encoder) < 1e-6


def test_fusing_into_a_copy_leaves_the_shared_modules_unchanged(student, adapters):
    digests = tensor_digest(student.unet), tensor_digest(student.text_encoder)
    fused(student, [(read_lora(adapters["lora-kohya"]), 1.0)])
    assert (tensor_digest(student.unet), tensor_digest(student.text_encoder)) == digests


def test_a_lora_that_breaks_the_weights_is_refused(student, adapters, tmp_path):
    tensors = safetensors.torch.load_file(adapters["lora-kohya"])
    tensors[f"{KOHYA_UNET}.lora_up.weight"][0, 0] = 3e38  # finite, but the fused weights overflow
    safetensors.torch.save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(LoraError, match="broken.safetensors: fusing into the unet at scale 1e.30 gives non-finite"):
        fused(student, [(read_lora(tmp_path / "broken.safetensors"), 1e30)])


def _rename(key: str) -> str:
    return key.replace("attn2_to_k", "attn3_to_k")


def _narrow(tensors: dict, key: str) -> None:
    tensors[key] = tensors[key][:, :16].contiguous()


@pytest.mark.parametrize("fmt,change,named", [
    ("kohya", lambda t: {_rename(k): v for k, v in t.items()},
     f"{_rename(KOHYA_UNET)}.alpha"),
    ("kohya", lambda t: _narrow(t, f"{KOHYA_TE}.lora_down.weight"),
     f"{KOHYA_TE}.lora_down.weight"),
    ("kohya", lambda t: {k: v for k, v in t.items() if k != f"{KOHYA_TE}.lora_up.weight"},
     f"{KOHYA_TE}.lora_down.weight"),
    ("diffusers", lambda t: _narrow(t, f"unet.{UNET_MODULE}.lora_A.weight"), f"unet.{UNET_MODULE}.lora_A.weight"),
    ("diffusers", lambda t: {k.replace("unet.", "transformer."): v for k, v in t.items()},
     "transformer.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"),
    ("diffusers", lambda t: {k.replace("encoder.layers.1.", "encoder.layers.5."): v for k, v in t.items()},
     "text_encoder.text_model.encoder.layers.5.self_attn.k_proj.lora_A.weight"),
    ("kohya", lambda t: t | {f"{KOHYA_UNET}.lora_up.weight": torch.full_like(t[f"{KOHYA_UNET}.lora_up.weight"],
                                                                               float("inf"))},
     f"{KOHYA_UNET}.lora_up.weight"),
    ("kohya", lambda t: t | {f"{KOHYA_UNET}.alpha": torch.tensor(float("nan"))}, f"{KOHYA_UNET}.alpha"),
    ("kohya", lambda t: t | {f"{KOHYA_TE}.lora_down.weight": torch.tensor(1.0)}, f"{KOHYA_TE}.lora_down.weight"),
    ("diffusers", lambda t: t | {f"unet.{UNET_MODULE}.lora_A.weight": torch.zeros(0, 32),
                                 f"unet.{UNET_MODULE}.lora_B.weight": torch.zeros(32, 0)},
     f"unet.{UNET_MODULE}.lora_A.weight"),
], ids=["kohya-renamed-module", "kohya-text-encoder-shape", "kohya-down-without-up", "diffusers-unet-shape",
        "diffusers-other-model", "diffusers-missing-layer", "kohya-inf-weight", "kohya-nan-alpha",
        "kohya-scalar-down", "diffusers-rank-zero"])
def test_lora_for_another_model_is_refused_naming_file_and_key(student, tiny_models, adapters, tmp_path,
                                                               fmt, change, named):
    tensors = safetensors.torch.load_file(adapters[f"lora-{fmt}"])
    tensors = change(tensors) or tensors
    path = tmp_path / f"other-{fmt}.safetensors"
    safetensors.torch.save_file(tensors, path)
    lora = read_lora(path)
    with pytest.raises(LoraMismatchError) as on_meta:
        check_lora(lora, *meta_modules(tiny_models["instaflow"]))  # what a driver runs: configs only
    assert on_meta.value.file == str(path) and on_meta.value.key == named
    assert str(path) in str(on_meta.value) and named in str(on_meta.value)
    unet, text_encoder = copy.deepcopy(student.unet), copy.deepcopy(student.text_encoder)
    with pytest.raises(LoraMismatchError, match="does not fit"):
        fuse_loras(unet, text_encoder, [(read_lora(adapters["lora-kohya"]), 1.0), (lora, 1.0)])
    assert tensor_digest(unet) == tensor_digest(student.unet)  # refused before anything was loaded
    assert not getattr(unet, "peft_config", None) and not getattr(text_encoder, "peft_config", None)


def test_only_safetensors_loras_are_read(tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "lora.bin")
    with pytest.raises(LoraError, match="must be .safetensors"):
        read_lora(tmp_path / "lora.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="broken.safetensors"):
        read_lora(tmp_path / "broken.safetensors")


def test_merge_finetune(student, cache, tiny_models, adapters):
    """The InstaFlow repo's "hf" mode: W + scale * (W_finetune - W_base), tensor by tensor."""
    finetune, base = cache.load(str(adapters["finetune"])), cache.load(str(tiny_models["sd15"]))
    unchanged = copy.deepcopy(student.unet)
    merge_finetune(unchanged, finetune.unet, base.unet, 0.0)
    assert tensor_digest(unchanged) == tensor_digest(student.unet)

    onto_itself = copy.deepcopy(base.unet)
    merge_finetune(onto_itself, finetune.unet, base.unet, 1.0)
    assert max_difference(onto_itself, finetune.unet) < 1e-6

    merged = copy.deepcopy(student.unet)
    merge_finetune(merged, finetune.unet, base.unet, 0.5)
    name = "conv_in.weight"
    files = [safetensors.torch.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")[name]
             for folder in (tiny_models["instaflow"], adapters["finetune"], tiny_models["sd15"])]
    torch.testing.assert_close(merged.state_dict()[name], files[0] + 0.5 * (files[1] - files[2]), rtol=0, atol=1e-7)
    merged_images = images(dataclasses.replace(student, unet=merged)).float()
    assert torch.isfinite(merged_images).all() and (merged_images - images(student).float()).abs().mean() > 1


def test_merge_finetune_names_the_first_tensor_that_differs(student, tiny_models):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(tiny_models["sd15"] / "unet")
    other = UNet2DConditionModel.from_config({**config, "cross_attention_dim": 16})
    target = copy.deepcopy(student.unet)
    with pytest.raises(MergeMismatchError, match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2"
                                                 r"\.to_k\.weight': shape \(32, 16\) in the fine-tune UNet"):
        merge_finetune(target, other, student.unet, 1.0)
    assert tensor_digest(target) == tensor_digest(student.unet)


def test_finetune_is_a_loadable_sd15_that_differs_and_adapters_are_deterministic(cache, tiny_models, adapters,
                                                                                 tmp_path):
    finetune, sd15 = cache.load(str(adapters["finetune"])), cache.load(str(tiny_models["sd15"]))
    for name in ("unet", "vae", "text_encoder"):
        assert tensor_digest(getattr(finetune, name)) != tensor_digest(getattr(sd15, name))
    assert finetune.tokenizer is sd15.tokenizer  # the same tokenizer files
    again = write_tiny_adapters(tmp_path, tiny_models["sd15"])
    for name in ("lora-kohya", "lora-diffusers"):
        assert hashlib.sha256(again[name].read_bytes()).digest() == hashlib.sha256(adapters[name].read_bytes()).digest()
    assert component_digest(again["finetune"]) == component_digest(adapters["finetune"])


# Subsets of modules, as trainers that adapt only some layers write them: {"unet.<module>" / "text_encoder.<module>"
# (the text encoder's names without `text_model.`): (rank, alpha, or None for a file without `.alpha`)}.
TE_LAYERS = ("encoder.layers.0", "encoder.layers.1")
TE_Q_V = {f"text_encoder.{layer}.self_attn.{proj}": (RANK, ALPHA)
          for layer in TE_LAYERS for proj in ("q_proj", "v_proj")}
UNET_ATTENTION = {f"unet.{UNET_MODULE}": (RANK, None),
                  "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v": (RANK, None)}
SUBSETS = {
    "text-encoder-q-v": TE_Q_V,
    "text-encoder-one-mlp-no-alpha": {"text_encoder.encoder.layers.1.mlp.fc1": (2, None),
                                      "text_encoder.encoder.layers.1.mlp.fc2": (2, None)},
    "unet-attention": UNET_ATTENTION,
    "unet-ff": {"unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (RANK, ALPHA),
                "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (RANK, ALPHA)},
    "unet-conv-and-resnets": {"unet.down_blocks.0.resnets.0.conv1": (RANK, ALPHA),  # 3x3
                              "unet.down_blocks.1.resnets.0.conv_shortcut": (2, 1.0),  # 1x1
                              "unet.up_blocks.0.attentions.1.proj_in": (RANK, None),
                              "unet.down_blocks.1.resnets.0.time_emb_proj": (3, ALPHA)},
    "both-parts-mixed-ranks": {"text_encoder.encoder.layers.0.self_attn.k_proj": (2, 1.0),
                               "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": (RANK, ALPHA)},
}


def write_lora(path, student, targets: dict, fmt: str = "kohya") -> dict:
    """A seeded LoRA on `targets` (as SUBSETS), in kohya format (CivitAI's names, `.alpha` where given) or diffusers'
    (no alpha: alpha = rank). Returns {target: (down, up, alpha)} for the transcription of the formula."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    generator = torch.Generator().manual_seed(len(targets))
    factors, tensors, layers = {}, {}, {"unet": {}, "text_encoder": {}}
    for target, (rank, alpha) in targets.items():
        part, name = target.split(".", 1)
        weight = getattr(student, part).get_submodule(name).weight
        down = torch.randn(rank, *weight.shape[1:], generator=generator) / weight[0].numel() ** 0.5
        up = torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * LORA_UP_GAIN
        factors[target] = (down, up, rank if alpha is None else alpha)
        kohya = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + name.replace(".", "_")
        tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}
        if alpha is not None:
            tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
        layers[part] |= {f"{'text_model.' * (part == 'text_encoder')}{name}.lora_A.weight": down,
                         f"{'text_model.' * (part == 'text_encoder')}{name}.lora_B.weight": up}
    if fmt == "kohya":
        safetensors.torch.save_file(tensors, path)
    else:
        assert all(alpha is None for _, alpha in targets.values())
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            path.parent, unet_lora_layers=layers["unet"] or None,
            text_encoder_lora_layers=layers["text_encoder"] or None, weight_name=path.name)
    return factors


def lora_formula(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float, scale: float):
    """W + scale * alpha / rank * up @ down; a conv's down (rank x in x kh x kw) and up (out x rank x 1 x 1) taken
    as matrices, as kohya's conv LoRA defines them."""
    return weight + scale * alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def assert_fused_by_formula(components, student, factors: dict, scale: float) -> None:
    """Every adapted weight is the formula's, within fp32 rounding; every other tensor is unchanged, bit for bit."""
    for part in ("unet", "text_encoder"):
        before, after = getattr(student, part).state_dict(), getattr(components, part).state_dict()
        adapted = {f"{target.split('.', 1)[1]}.weight": value for target, value in factors.items()
                   if target.startswith(f"{part}.")}
        for name, tensor in after.items():
            if name in adapted:
                expected = lora_formula(before[name], *adapted[name], scale)
                assert (expected - before[name]).abs().max() > 100 * FUSED_TOLERANCE  # the LoRA changes it
                torch.testing.assert_close(tensor, expected, rtol=0, atol=FUSED_TOLERANCE)
            else:
                assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("fmt,subset", [("kohya", name) for name in SUBSETS] + [
    ("diffusers", "text-encoder-q-v-no-alpha"), ("diffusers", "text-encoder-one-mlp-no-alpha"),
    ("diffusers", "unet-attention")])
def test_any_subset_of_modules_fuses_to_the_formula(student, tiny_models, tmp_path, fmt, subset):
    """A LoRA on any modules of either part (only q and v of self_attn, one layer's MLP, UNet attention only, ff,
    convs and resnets), with or without alpha, in either format: checked on the driver's meta modules, then fused
    exactly by the formula."""
    targets = SUBSETS.get(subset) or {target: (rank, None) for target, (rank, _) in TE_Q_V.items()}
    path = tmp_path / f"{subset}.safetensors"
    factors = write_lora(path, student, targets, fmt)
    lora = read_lora(path)
    assert lora.kohya == (fmt == "kohya")
    check_lora(lora, *meta_modules(tiny_models["instaflow"]))
    assert_fused_by_formula(fused(student, [(lora, 0.6)]), student, factors, 0.6)


def job_images(output) -> tuple[list[dict], np.ndarray]:
    """A job's rows (key, prompt, seed) and their images, in key order."""
    rows, images = [], {}
    for tar in sorted(output.glob("*.tar")):
        rows += pq.read_table(tar.with_suffix(".parquet"), columns=["key", "prompt", "seed"]).to_pylist()
        images |= {name: data for name, data in tar_members(tar.read_bytes()).items() if name.endswith(".png")}
    rows.sort(key=lambda row: row["key"])
    assert rows and len(images) == len(rows)
    return rows, np.stack([np.asarray(Image.open(io.BytesIO(images[f"{row['key']}.png"]))) for row in rows])


def test_subset_loras_through_the_cli(ray_gpus, cache, student, tiny_models, tmp_path, capsys):
    """What a user meets: `run generate` with a text-encoder LoRA of only q and v (with alpha) and a UNet LoRA of two
    attention projections (no alpha) exits 0, and its images are those of the model whose weights a transcription of
    the formula changed, for each row's prompt and seed; a file with one key that does not fit exits 2 naming that
    key, before any worker starts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    files = {"text_encoder": (tmp_path / "te-q-v.safetensors", TE_Q_V, 0.6),
             "unet": (tmp_path / "unet-attention.safetensors", UNET_ATTENTION, 1.3)}
    reference = tmp_path / "reference"
    shutil.copytree(tiny_models["instaflow"], reference)
    for part, model_class in (("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel)):
        path, targets, scale = files[part]
        module = model_class.from_pretrained(reference / part)
        with torch.no_grad():
            for target, (down, up, alpha) in write_lora(path, student, targets).items():
                weight = module.get_submodule(target.split(".", 1)[1]).weight
                weight.copy_(lora_formula(weight, down, up, alpha, scale))
        module.save_pretrained(reference / part)
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(prompt_table(4), prompts)

    def run(output: str, model, *flags: str) -> int:
        return main(["run", "generate", "--prompts", str(prompts), "--output", str(tmp_path / "out" / output),
                     "--model", str(model), "--height", "64", "--width", "64", "--dtype", "float32",
                     "--image-format", "png", "--num-workers", "1", "--no-progress", *flags])

    loras = [flag for path, _, scale in files.values() for flag in ("--lora", f"{path}:{scale}")]
    assert run("with-loras", tiny_models["instaflow"], *loras) == 0
    rows, with_loras = job_images(tmp_path / "out/with-loras")
    batch = PromptBatch([row["prompt"] for row in rows], [row["seed"] for row in rows], [None] * len(rows))
    expected, plain = (Student(components, Settings(1, 0.0, 64, 64)).generate(batch).pixels.numpy().astype(np.int16)
                       for components in (cache.load(str(reference)), student))
    assert np.abs(expected - plain).mean() > 2  # the LoRAs change the images visibly
    assert np.abs(with_loras.astype(np.int16) - expected).max() <= 1  # float rounding: fused by PEFT, not by hand

    tensors = safetensors.torch.load_file(files["text_encoder"][0])
    tensors[f"{KOHYA_UNET}.lora_down.weight"] = torch.zeros(RANK, 7)  # the module takes another width
    tensors[f"{KOHYA_UNET}.lora_up.weight"] = torch.zeros(32, RANK)
    safetensors.torch.save_file(tensors, tmp_path / "one-misfit.safetensors")
    twice_keys = write_to_q_twice(tmp_path / "twice.safetensors", student)
    for misfit, named in (("one-misfit", [f"'{KOHYA_UNET}.lora_down.weight'", f"shape ({RANK}, 7)"]),
                          ("twice", [repr(key) for key in twice_keys])):
        capsys.readouterr()
        assert run(misfit, tiny_models["instaflow"], "--lora", str(tmp_path / f"{misfit}.safetensors")) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"{misfit}.safetensors" in errors[0], errors
        assert all(name in errors[0] for name in named), errors
        assert not (tmp_path / "out" / misfit).exists()  # nothing written: no worker started


# A diffusers file's keys in each naming diffusers reads: (suffix of the down weight, of the up weight); "old" names
# the attention module, not its projection (the old attention processors').
NAMINGS = {"peft": ("lora_A", "lora_B"), "diffusers": ("lora.down", "lora.up"),
           "linear-layer": ("lora_linear_layer.down", "lora_linear_layer.up")}
OLD_PROJECTIONS = {"to_q": "processor.to_q_lora", "to_v": "processor.to_v_lora", "q_proj": "to_q_lora",
                   "v_proj": "to_v_lora", "to_out.0": "processor.to_out_lora"}
UNET_ATTN = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
TE_ATTN = "text_encoder.encoder.layers.0.self_attn"


def diffusers_key(target: str, naming: str, factor: str) -> str:
    """The file's key for `target`'s down ("A") or up ("B") weight in `naming` (text-encoder keys with
    `text_model.`, as files are written)."""
    part, name = target.split(".", 1)
    name = f"text_model.{name}" if part == "text_encoder" else name
    if naming == "old":
        attention, projection = name.rsplit(".", 2 if name.endswith("to_out.0") else 1)[0], name.split(".attn1.")[-1]
        projection = name.split("self_attn.")[-1] if part == "text_encoder" else projection
        return f"{part}.{attention}.{OLD_PROJECTIONS[projection]}.{'down' if factor == 'A' else 'up'}.weight"
    return f"{part}.{name}.{NAMINGS[naming][factor == 'B']}.weight"


def write_diffusers_lora(path, student, namings: dict, header: dict | None = None, alphas: dict | None = None) -> dict:
    """A seeded diffusers-format LoRA of rank RANK on {target: naming}, with `header` as its LoraConfig settings.
    Returns {target: (down, up, alpha)} for the transcription of the formula (`alphas` by target, else rank)."""
    import json

    generator = torch.Generator().manual_seed(len(namings))
    factors, tensors = {}, {}
    for target, naming in namings.items():
        part, name = target.split(".", 1)
        weight = getattr(student, part).get_submodule(name).weight
        down = torch.randn(RANK, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
        up = torch.randn(weight.shape[0], RANK, generator=generator) * LORA_UP_GAIN
        factors[target] = (down, up, (alphas or {}).get(target, RANK))
        tensors |= {diffusers_key(target, naming, "A"): down, diffusers_key(target, naming, "B"): up}
    safetensors.torch.save_file(tensors, path, metadata=header and {"lora_adapter_metadata": json.dumps(header)})
    return factors


@pytest.mark.parametrize("namings", [
    {f"{UNET_ATTN}.to_q": "peft", f"{UNET_ATTN}.to_v": "diffusers"},
    {f"{UNET_ATTN}.to_q": "diffusers", f"{UNET_ATTN}.to_v": "peft"},
    {f"{UNET_ATTN}.to_q": "old", f"{UNET_ATTN}.to_v": "linear-layer", f"{UNET_ATTN}.to_out.0": "old"},
    {f"{TE_ATTN}.q_proj": "old", f"{TE_ATTN}.v_proj": "peft", f"{UNET_ATTN}.to_v": "linear-layer"},
], ids=["unet-peft-then-diffusers", "unet-diffusers-then-peft", "unet-old-and-linear-layer", "text-encoder-mixed"])
def test_each_diffusers_key_is_read_in_its_own_naming(student, tiny_models, tmp_path, namings):
    """A diffusers file whose keys mix namings loads whichever key sorts first, and fuses to the formula."""
    path = tmp_path / "mixed.safetensors"
    factors = write_diffusers_lora(path, student, namings)
    lora = read_lora(path)
    check_lora(lora, *meta_modules(tiny_models["instaflow"]))
    assert_fused_by_formula(fused(student, [(lora, 0.8)]), student, factors, 0.8)


def write_to_q_twice(path, student) -> set[str]:
    """to_q's weights under two namings (diffusers' and PEFT's), next to to_v's: diffusers' whole-set rename merged
    the two to_q keys, so the file's keys fell out of step with the renamed ones and to_v was fused with to_q's
    tensors. Returns to_q's two down keys."""
    write_diffusers_lora(path, student, {f"{UNET_ATTN}.to_q": "diffusers", f"{UNET_ATTN}.to_v": "diffusers"})
    tensors = safetensors.torch.load_file(path)
    twice = {diffusers_key(f"{UNET_ATTN}.to_q", "peft", factor): tensors[diffusers_key(f"{UNET_ATTN}.to_q",
                                                                                        "diffusers", factor)] * 2
             for factor in "AB"}
    safetensors.torch.save_file(tensors | twice, path)
    return {diffusers_key(f"{UNET_ATTN}.to_q", naming, "A") for naming in ("peft", "diffusers")}


def test_two_keys_for_one_weight_are_refused_naming_both(student, tiny_models, tmp_path):
    down_keys = write_to_q_twice(tmp_path / "twice.safetensors", student)
    with pytest.raises(LoraMismatchError) as refused:
        check_lora(read_lora(tmp_path / "twice.safetensors"), *meta_modules(tiny_models["instaflow"]))
    assert refused.value.key in down_keys
    assert all(repr(key) in str(refused.value) for key in down_keys), refused.value


Q, V = f"{UNET_ATTN}.to_q", f"{UNET_ATTN}.to_v"
FULL_NAMES = [name.removeprefix("unet.") for name in (Q, V)]


def test_header_settings_are_checked_and_alpha_read_from_them(student, tiny_models, tmp_path):
    """A header as PEFT writes it (every LoraConfig setting, most at their defaults; short target_modules names, an
    alpha_pattern for one module): each module fuses with its own alpha / rank."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, alpha_pattern={"attn1.to_v": 1.0}, target_modules=["to_q", "to_v"],
                        lora_dropout=0.1, init_lora_weights="gaussian").to_dict()
    header = {f"unet.{setting}": list(value) if isinstance(value, set) else value
              for setting, value in config.items()}
    path = tmp_path / "header.safetensors"
    factors = write_diffusers_lora(path, student, {Q: "peft", V: "peft"}, header, alphas={Q: ALPHA, V: 1.0})
    lora = read_lora(path)
    assert lora.metadata["unet.use_dora"] is False and lora.metadata["unet.peft_type"] == "LORA"
    check_lora(lora, *meta_modules(tiny_models["instaflow"]))
    assert_fused_by_formula(fused(student, [(lora, 0.5)]), student, factors, 0.5)


@pytest.mark.parametrize("header,named", [
    ({"unet.r": RANK + 1}, f"{Q}.lora_A.weight"),
    ({"unet.rank_pattern": {"to_v": RANK + 1}}, f"{V}.lora_A.weight"),
    ({"unet.target_modules": ["to_q"]}, f"{V}.lora_A.weight"),
    ({"unet.target_modules": FULL_NAMES, "unet.exclude_modules": ["to_q"]}, f"{Q}.lora_A.weight"),
    ({"unet.r": "x"}, "'unet.r' = 'x'"),
    ({"unet.lora_alpha": True}, "'unet.lora_alpha' = True"),
    ({"unet.alpha_pattern": {"to_v": float("nan")}}, "'unet.alpha_pattern'"),
    ({"unet.use_dora": True}, "'unet.use_dora' = True"),
    ({"unet.use_rslora": True}, "'unet.use_rslora' = True"),
    ({"unet.peft_type": "LOHA"}, "'unet.peft_type' = 'LOHA'"),
    ({"unet.init_lora_weights": "pissa"}, "'unet.init_lora_weights' = 'pissa'"),
    ({"unet.lora_scale": 2.0}, "'unet.lora_scale' = 2.0: not a setting"),
    ({"r": RANK}, f"'r' = {RANK}: names neither"),
], ids=["r-not-the-tensors", "rank-pattern-not-the-tensors", "target-modules-leave-out-a-key", "excluded-key",
        "r-not-a-number", "alpha-a-boolean", "alpha-nan", "dora", "rslora", "another-adapter-type", "pissa-init",
        "unknown-setting", "setting-of-no-part"])
def test_header_settings_that_do_not_fit_are_refused_naming_them(student, tiny_models, tmp_path, header, named):
    """On the driver: a header setting that contradicts the tensors names the key; one that is malformed, unknown or
    changes the formula from W + scale * alpha / rank * up @ down names the setting."""
    path = tmp_path / "header.safetensors"
    write_diffusers_lora(path, student, {Q: "peft", V: "peft"},
                         {"unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.target_modules": FULL_NAMES} | header)
    with pytest.raises(LoraError) as refused:
        check_lora(read_lora(path), *meta_modules(tiny_models["instaflow"]))
    assert str(path) in str(refused.value)
    if isinstance(refused.value, LoraMismatchError):
        assert refused.value.key == named
    else:
        assert named in str(refused.value)


def test_a_dora_scale_that_diffusers_drops_is_refused(student, tmp_path):
    path = tmp_path / "dora.safetensors"
    write_diffusers_lora(path, student, {Q: "peft"})
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors | {f"{Q}.dora_scale": torch.ones(1, 32)}, path)
    with pytest.raises(LoraMismatchError) as refused:
        read_lora(path)
    assert refused.value.key == f"{Q}.dora_scale" and "DoRA" in str(refused.value)
