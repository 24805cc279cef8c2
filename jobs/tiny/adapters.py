"""A tiny LoRA, in kohya and in diffusers format, and a tiny fine-tune of SD-1.5, for the tiny models.

`write_tiny_adapters(out_dir, sd15_dir)` writes, from fixed seeds:

- `lora-kohya.safetensors` and `lora-diffusers.safetensors`: the same rank-4 LoRA on the attention projections of
  the tiny UNet (to_q, to_k, to_v, to_out.0) and of the tiny text encoder (q_proj, k_proj, v_proj, out_proj), which
  instaflow/, sd15/ and 2rf/ share. The kohya file (CivitAI's format) stores alpha = 3 beside each module; the
  diffusers file, like those diffusers' training scripts wrote before adapter metadata, has no alpha (alpha =
  rank), so alpha / rank is folded into its up weights (lora_B);
- `finetune/`: an SD-1.5 pipeline folder like sd15/ whose UNet, VAE and text encoder are sd15/'s plus seeded noise,
  as a fine-tune (e.g. dreamshaper-7) is SD-1.5 moved a little.
"""

import shutil
from pathlib import Path

import safetensors.torch
import torch

RANK = 4
ALPHA = 3.0  # != RANK, so the alpha / rank factor is exercised
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_UP_GAIN = 1.5  # big enough to change the tiny student's images visibly, small enough to keep them finite
FINETUNE_NOISE = 0.05  # relative to each tensor's spread


def lora_factors(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name as SD-1.5 LoRA files write it ("unet." / "text_encoder.text_model." + its path): (down A,
    up B)}, seeded: delta W = ALPHA / RANK * B @ A."""
    generator = torch.Generator().manual_seed(14)
    modules = [(f"unet.{name}", module) for name, module in unet.named_modules()
               if name.endswith(tuple(f".{t}" for t in UNET_TARGETS))]
    modules += [(f"text_encoder.text_model.{name.removeprefix('text_model.')}", module)
                for name, module in text_encoder.named_modules()
                if name.endswith(tuple(f".{t}" for t in TEXT_ENCODER_TARGETS))]
    factors = {}
    for name, module in modules:
        down = torch.randn(RANK, module.in_features, generator=generator) / module.in_features ** 0.5
        up = torch.randn(module.out_features, RANK, generator=generator) * LORA_UP_GAIN / RANK ** 0.5
        factors[name] = (down, up)
    return factors


def kohya_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """kohya-ss / CivitAI naming: `lora_unet_` / `lora_te_` + the module path with "_" for ".", lora_down,
    lora_up and a scalar alpha per module."""
    state_dict = {}
    for name, (down, up) in factors.items():
        part, path = name.split(".", 1)
        key = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
        state_dict[f"{key}.lora_down.weight"] = down
        state_dict[f"{key}.lora_up.weight"] = up
        state_dict[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state_dict


def write_lora_files(out_dir: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, Path]:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    factors = lora_factors(unet, text_encoder)
    paths = {"lora-kohya": out_dir / "lora-kohya.safetensors", "lora-diffusers": out_dir / "lora-diffusers.safetensors"}
    safetensors.torch.save_file(kohya_state_dict(factors), paths["lora-kohya"])
    layers = {"unet": {}, "text_encoder": {}}
    for name, (down, up) in factors.items():
        part, path = name.split(".", 1)
        layers[part][f"{path}.lora_A.weight"] = down
        layers[part][f"{path}.lora_B.weight"] = up * (ALPHA / RANK)
    StableDiffusionLoraLoaderMixin.save_lora_weights(out_dir, unet_lora_layers=layers["unet"],
                                                     text_encoder_lora_layers=layers["text_encoder"],
                                                     weight_name=paths["lora-diffusers"].name)
    return paths


def _add_seeded_noise(module: torch.nn.Module, seed: int) -> None:
    """W <- W + FINETUNE_NOISE * std(W) * N(0, 1) for every floating tensor with a spread."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(module.state_dict().items()):
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.add_(FINETUNE_NOISE * tensor.std() * noise)


def write_finetune(out: Path, sd15_dir: Path) -> Path:
    """sd15/ copied (tokenizer, scheduler, model_index.json byte for byte), with its UNet, VAE and text encoder
    moved by seeded noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(sd15_dir, out)
    for seed, (name, cls) in enumerate((("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                        ("text_encoder", CLIPTextModel)), start=20):
        module = cls.from_pretrained(sd15_dir / name)
        _add_seeded_noise(module, seed)
        shutil.rmtree(out / name)
        module.save_pretrained(out / name)
    return out


def write_tiny_adapters(out_dir: str | Path, sd15_dir: str | Path) -> dict[str, Path]:
    """Writes lora-kohya.safetensors, lora-diffusers.safetensors and finetune/ under `out_dir` for the tiny models
    whose SD-1.5 folder is `sd15_dir` (jobs/tiny); returns their paths by name."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out_dir, sd15_dir = Path(out_dir), Path(sd15_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(sd15_dir / "unet")  # the student's UNet has the same layout
    text_encoder = CLIPTextModel.from_pretrained(sd15_dir / "text_encoder")
    paths = write_lora_files(out_dir, unet, text_encoder)
    paths["finetune"] = write_finetune(out_dir / "finetune", sd15_dir)
    return paths
