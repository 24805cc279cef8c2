"""The sampling math: the seed contract, rectified-flow Euler sampling, the SD-1.5 DPM-Solver teacher, decoding,
and encoding images into latents.

Each sampler is one plain function that reads top to bottom, with the formula beside the line that computes it.
"""

import math
from typing import Sequence

import torch

from instaflow.conditioning import Conditioner, unet_kwargs

MAX_STEPS = 1000  # SD-1.5's training timesteps; no sampler can take more
MAX_GUIDANCE_SCALE = 100.0
MAX_SIDE = 4096


def check_inputs(height: int, width: int, steps: int, guidance_scale: float, multiple: int = 8) -> None:
    """Rejects settings that would otherwise fail deep inside a model, naming the argument and its value."""
    check_size(height, width, multiple)
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer between 1 and {MAX_STEPS}, got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE}, got {guidance_scale!r}")


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """Rejects an image size the VAE cannot take (a side that is no multiple of its scale factor)."""
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or side % multiple or not multiple <= side <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {multiple} between {multiple} and {MAX_SIDE}, got {side!r}")


def noise_for_seed(seed: int, height: int, width: int, channels: int = 4, vae_scale_factor: int = 8) -> torch.Tensor:
    """The seed contract: a sample's starting noise depends on its seed only, on any machine, in any batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, channels, height // vae_scale_factor, width // vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def batch_noise(seeds: list[int], height: int, width: int, channels: int = 4,
                vae_scale_factor: int = 8) -> torch.Tensor:
    """Per-sample noise stacked into a batch, float32 on the CPU; samplers get it cast to the model dtype."""
    return torch.cat([noise_for_seed(seed, height, width, channels, vae_scale_factor) for seed in seeds])


def use_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance only above 1; at 1 or below the conditional prediction is used alone."""
    return guidance_scale > 1.0


@torch.inference_mode()
def rectified_flow_euler(unet, noise, prompt_embeds, negative_embeds, steps: int, guidance_scale: float,
                         conditioners: Sequence[Conditioner] = ()):
    """InstaFlow (steps=1) and 2-Rectified Flow (steps>1): Euler steps along the learned velocity field.

    Transcribes the official RectifiedFlowPipeline: t_i = (1 - i/N) * 1000, z <- z + v(z, t_i) / N.
    The update is computed in float32 and cast back, as diffusers' flow-matching Euler step does. Each of the
    `conditioners` (a ControlNet's control images) gives the UNet extra arguments at every step
    (instaflow/conditioning.py).
    """
    guided = use_guidance(guidance_scale)
    embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
    latents = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = (1.0 - i / steps) * 1000.0
        model_input = torch.cat([latents] * 2) if guided else latents
        timestep = torch.full((model_input.shape[0],), t, device=latents.device)
        residuals = unet_kwargs(conditioners, model_input, timestep, embeds, guided)
        v = unet(model_input, timestep, encoder_hidden_states=embeds, return_dict=False, **residuals)[0]
        if guided:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)  # v = v_u + g (v_c - v_u)
        latents = (latents.float() + dt * v.float()).to(noise.dtype)  # z_{i+1} = z_i + v / N
    return latents


def dpm_solver_scheduler(scheduler_config: dict, **options):
    """DPM-Solver multistep built from the model's own scheduler config, as diffusers users swap it in."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(scheduler_config, **options)


@torch.inference_mode()
def dpm_solver_teacher(
    unet, scheduler, noise, prompt_embeds, negative_embeds, steps: int, guidance_scale: float,
    conditioners: Sequence[Conditioner] = (),
) -> torch.Tensor:
    """SD-1.5 teacher: the denoising loop of diffusers' StableDiffusionPipeline, from given noise, no decoding;
    with a ControlNet among the `conditioners`, that of StableDiffusionControlNetPipeline (no guess mode).

    `scheduler` must be fresh (multistep solvers keep state across steps); returns the final latent.
    """
    guided = use_guidance(guidance_scale)
    embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        residuals = unet_kwargs(conditioners, model_input, t, embeds, guided)
        eps = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False, **residuals)[0]
        if guided:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)  # eps = eps_u + g (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


@torch.inference_mode()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """x = D(z / scaling_factor): images in [-1, 1], (N, 3, H, W), in the model dtype."""
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


CPU_CHUNK_ELEMENTS = 1 << 17  # to_pixels on the CPU: 512 KB of float32 at a time, which stays in the cache


@torch.inference_mode()
def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] to uint8 (N, H, W, 3) on the device, rounded as diffusers rounds: round(clamp(x / 2 + 0.5, 0, 1)
    * 255), computed in float32.

    The same operations in the same order as diffusers' out-of-place chain, so the same values, done in place on
    one float32 buffer. On the CPU (a CPU device, or a decoder that runs there) the buffer is a small one reused
    chunk by chunk: the chain's five passes stay in the cache, and no batch-sized float buffer is allocated
    (each a fresh mapping, page-faulted on every batch); 8x less CPU than the out-of-place chain at 512x512."""
    n, channels, height, width = images.shape
    if images.device.type != "cpu":
        x = images.to(torch.float32, copy=True).div_(2)
        x.add_(0.5).clamp_(0, 1).mul_(255).round_()
        return x.to(torch.uint8).permute(0, 2, 3, 1)
    flat = images.reshape(-1)
    pixels = torch.empty((n, channels, height, width), dtype=torch.uint8)
    out = pixels.view(-1)
    buffer = torch.empty(min(CPU_CHUNK_ELEMENTS, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), CPU_CHUNK_ELEMENTS):
        chunk = flat[start : start + CPU_CHUNK_ELEMENTS]
        x = buffer[: len(chunk)].copy_(chunk).div_(2)
        x.add_(0.5).clamp_(0, 1).mul_(255).round_()
        out[start : start + len(chunk)].copy_(x)
    return pixels.permute(0, 2, 3, 1)


@torch.inference_mode()
def encode_images(vae, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> z = mean(E(x)) * scaling_factor, with x = 2 * pixels / 255 - 1 in [-1, 1]
    (N, 3, H, W) computed in float32 as diffusers' VaeImageProcessor normalises, then the model dtype on `device`.
    The encoder's mean, not a sample of its distribution: deterministic (SD's training draws a sample)."""
    images = 2.0 * (pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0) - 1.0
    return vae.encode(images.to(dtype)).latent_dist.mean * vae.config.scaling_factor


def decode_to_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    return to_pixels(decode(vae, latents))


@torch.inference_mode()
def finite_per_sample(*tensors: torch.Tensor) -> torch.Tensor:
    """True for the samples (first dimension) whose values are all finite in every tensor: NaN or inf in a
    latent or an image is a failed sample, never a black image with status ok.

    One reduction per tensor and batch, on the tensor's device, without a copy or a mask of its size: a
    sample's values are all finite exactly when its minimum and maximum are (NaN propagates through both,
    +inf is the maximum, -inf the minimum)."""
    return torch.stack([_finite_rows(t) for t in tensors]).all(0)


def _finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    rows = tensor.flatten(1)
    if rows.shape[1] == 0 or not rows.is_floating_point():
        return torch.isfinite(rows).all(1)
    return torch.isfinite(rows.amax(1)) & torch.isfinite(rows.amin(1))  # (aminmax is not vectorised on the CPU)
