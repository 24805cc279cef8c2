"""A tiny SDXL refiner, loadable by diffusers' StableDiffusionXLImg2ImgPipeline.from_pretrained.

`write_tiny_refiner(out_dir)` writes `sdxl-refiner/` from fixed seeds, laid out as
stabilityai/stable-diffusion-xl-refiner-1.0 is: a UNet with SDXL's added conditions (the pooled text embedding and
five time ids: original size, crop, aesthetic score), a VAE whose config forces float32, one text encoder with a
projection (`text_encoder_2`, the refiner has no first one) and its tokenizer, the refiner's Euler scheduler, and
`requires_aesthetics_score` in the pipeline's index.
"""

import shutil
from pathlib import Path

import torch

from jobs.tiny.pipelines import SAMPLE_SIZE, build_tokenizer, build_vae, write_slow_tokenizer_files

TEXT_WIDTH = 32
TIME_EMBED_DIM = 8
NUM_TIME_IDS = 5  # original size (2), crop (2), aesthetic score


def build_text_encoder_2(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(40)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH, hidden_act="gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)).eval()


def build_refiner_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(41)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * NUM_TIME_IDS + TEXT_WIDTH,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.0)  # as the tiny UNets: samples move visibly
    return unet


def build_refiner_scheduler():
    """stable-diffusion-xl-refiner-1.0's scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)


def write_tiny_refiner(out_dir: str | Path) -> dict[str, Path]:
    """Writes sdxl-refiner/ under `out_dir`; returns its folder by name."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    out = Path(out_dir) / "sdxl-refiner"
    if out.exists():
        shutil.rmtree(out)
    tokenizer = build_tokenizer()
    vae = build_vae()
    vae.register_to_config(force_upcast=True, scaling_factor=0.13025)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=build_text_encoder_2(len(tokenizer)), tokenizer=None,
        tokenizer_2=tokenizer, unet=build_refiner_unet(), scheduler=build_refiner_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(out)
    write_slow_tokenizer_files(out / "tokenizer_2")
    return {"sdxl-refiner": out}
