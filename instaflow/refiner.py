"""The SDXL refiner after the student: img2img from the student's image, as diffusers'
StableDiffusionXLImg2ImgPipeline does it, on the device and batch by batch, with one generator per row.

The student's uint8 image is resized on the device to the refine size (bicubic with antialiasing) and scaled to
[-1, 1]. Then, as the pipeline: the prompt is encoded by the refiner's text encoders (the penultimate hidden states,
concatenated; the pooled embedding of the last one); the scheduler's timesteps are cut by the strength (strength x
steps of them run); the image is encoded by the VAE (in float32 when its config forces it) and a latent sampled
from it, noised to the first timestep; the UNet denoises with the pooled embedding and the time ids (original size,
crop, aesthetic score) as added conditions; the VAE decodes. Randomness comes from a CPU generator per row seeded
from the row's seed (`refiner_seed`), so a row refines the same in any batch, on any device.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instaflow.sampling import finite_per_sample, to_pixels, use_guidance
from instaflow.text import Tokens, tokenize_prompts

REFINER_INPUTS = "refiner"  # PromptBatch.stage_inputs: the refiner's tokens
MAX_SEED = 2**63 - 1


def refiner_seed(seed: int) -> int:
    """The seed of a row's refiner generator: from its own seed only, apart from the student's noise."""
    return int.from_bytes(hashlib.sha256(f"refiner:{seed}".encode()).digest()[:8], "big") & MAX_SEED


def refined_size(height: int, width: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """The refined image's (height, width): its longer side `size`, the other in proportion, both multiples of
    `multiple` (rounded down)."""
    if height >= width:
        return size, max(multiple, width * size // height // multiple * multiple)
    return max(multiple, height * size // width // multiple * multiple), size


@dataclass
class RefinerComponents:
    """An SDXL refiner pipeline's parts. `text_encoders` and `tokenizers` are in the pipeline's order (the
    refiner 1.0 has only the second pair); the VAE is float32 where its config forces the upcast."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class RefinerSettings:
    """diffusers' defaults but for strength, which is the InstaFlow demo's."""

    strength: float = 0.3
    steps: int = 50
    guidance_scale: float = 5.0
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def check(self) -> None:
        if not 0 < self.strength <= 1:
            raise ValueError(f"refiner strength must be in (0, 1], got {self.strength!r}")
        if not isinstance(self.steps, int) or self.steps < 1 or int(self.steps * self.strength) < 1:
            raise ValueError(f"refiner steps x strength must make at least one step, got {self.steps} x "
                             f"{self.strength}")


@dataclass
class RefinerOutput:
    pixels: torch.Tensor  # (N, h, w, 3) uint8 on the device
    finite: torch.Tensor  # (N,) bool


class Refiner:
    """`offload`: the refiner's modules stay in host memory and each is moved to the device only while it runs,
    as diffusers' model offloading does, for a device too small for the student and the refiner together."""

    def __init__(self, components: RefinerComponents, settings: RefinerSettings, size: int, offload: bool = False):
        settings.check()
        self.components = components
        self.settings = settings
        self.size = size
        self.offload = offload

    @contextlib.contextmanager
    def _on_device(self, *modules: torch.nn.Module):
        """The modules on the device for the block: a no-op unless offloading, which moves them there and back."""
        if self.offload:
            for module in modules:
                module.to(self.components.device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    def prepare(self, batch) -> None:
        """Host work: the prompts (and negative prompts) tokenised for each of the refiner's tokenizers."""
        pin = self.components.device.type == "cuda"
        negatives = [text or "" for text in batch.negative_prompts]
        batch.stage_inputs[REFINER_INPUTS] = {
            "prompts": [tokenize_prompts(t, batch.prompts, pin_memory=pin) for t in self.components.tokenizers],
            "negatives": [tokenize_prompts(t, negatives, pin_memory=pin) for t in self.components.tokenizers],
        }

    @torch.inference_mode()
    def refine(self, pixels: torch.Tensor, batch, seeds: list[int]) -> RefinerOutput:
        """Refines the first len(pixels) rows of `batch`: (N, H, W, 3) uint8 on the device -> the refined pixels."""
        c, s, n = self.components, self.settings, len(pixels)
        tokens = batch.stage_inputs[REFINER_INPUTS]
        guided = use_guidance(s.guidance_scale)
        # 1. text: penultimate hidden states of each encoder, concatenated; the last encoder's pooled embedding
        embeds, pooled = self._encode(tokens["prompts"], n)
        if guided:
            negative, negative_pooled = self._encode(tokens["negatives"], n)
            if c.force_zeros_for_empty_prompt:  # per row, as the pipeline run on that row: no negative prompt, zeros
                absent = torch.tensor([text is None for text in batch.negative_prompts[:n]], device=negative.device)
                negative = negative.masked_fill(absent[:, None, None], 0)
                negative_pooled = negative_pooled.masked_fill(absent[:, None], 0)
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        # 2. timesteps: the last strength x steps of the schedule
        scheduler = _scheduler(c.scheduler_config)
        scheduler.set_timesteps(s.steps, device=c.device)
        start = s.steps - min(int(s.steps * s.strength), s.steps)
        timesteps = scheduler.timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        # 3. the start latents: the image encoded and sampled, then noised to the first timestep (per-row draws)
        height, width = refined_size(*pixels.shape[1:3], self.size)
        image = F.interpolate(pixels.permute(0, 3, 1, 2).float() / 255.0, size=(height, width), mode="bicubic",
                              antialias=True, align_corners=False).clamp(0, 1)
        generators = [torch.Generator("cpu").manual_seed(refiner_seed(seed)) for seed in seeds[:n]]
        latents = self._encode_image(image * 2 - 1, generators)
        noise = torch.cat([torch.randn(latents.shape[1:], generator=g, dtype=c.dtype)[None] for g in generators])
        latents = scheduler.add_noise(latents, noise.to(c.device), timesteps[:1].repeat(n))
        # 4. added conditions: original size, crop (0, 0) and the aesthetic score, for each half
        conditions = {"text_embeds": pooled, "time_ids": self._time_ids(height, width, n, guided)}
        # 5. denoise
        step_options = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters \
            else {}
        with self._on_device(c.unet):
            for t in timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
                eps = c.unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=conditions,
                             return_dict=False)[0]
                if guided:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + s.guidance_scale * (eps_text - eps_uncond)  # eps = eps_u + g (eps_c - eps_u)
                latents = scheduler.step(eps, t, latents, **step_options, return_dict=False)[0]
        # 6. decode (in the VAE's dtype: float32 when forced)
        with self._on_device(c.vae):
            images = c.vae.decode(latents.to(c.vae.dtype) / c.vae.config.scaling_factor, return_dict=False)[0]
        finite = finite_per_sample(latents, images)
        return RefinerOutput(to_pixels(images), finite)

    def _encode(self, token_sets: list[Tokens], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.components
        hidden, pooled = [], None
        for encoder, tokens in zip(c.text_encoders, token_sets):
            with self._on_device(encoder):
                output = encoder(tokens.input_ids[:n].to(c.device, non_blocking=True), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(c.dtype), pooled.to(c.dtype)

    def _encode_image(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One latent per row sampled from the VAE's posterior with that row's generator (mean + std x N(0, 1),
        drawn on the CPU as diffusers draws for a CPU generator), times the scaling factor, in the model dtype."""
        c = self.components
        with self._on_device(c.vae):  # the pipeline's image is cast to the model dtype first
            posterior = c.vae.encode(image.to(c.dtype).to(c.vae.dtype)).latent_dist
        samples = [posterior.mean[i:i + 1] + posterior.std[i:i + 1] * torch.randn(
            posterior.mean.shape[1:], generator=g, dtype=posterior.mean.dtype)[None].to(c.device)
            for i, g in enumerate(generators)]
        return c.vae.config.scaling_factor * torch.cat(samples).to(c.dtype)

    def _time_ids(self, height: int, width: int, n: int, guided: bool) -> torch.Tensor:
        c, s = self.components, self.settings
        if c.requires_aesthetics_score:
            positive, negative = [height, width, 0, 0, s.aesthetic_score], [height, width, 0, 0,
                                                                             s.negative_aesthetic_score]
        else:  # a base model's time ids: original size, crop, target size
            positive = negative = [height, width, 0, 0, height, width]
        ids = torch.tensor([positive] * n, dtype=c.dtype)
        if guided:
            ids = torch.cat([torch.tensor([negative] * n, dtype=c.dtype), ids])
        return ids.to(c.device)


def _scheduler(config: dict):
    """A fresh scheduler of the refiner's own class and config (schedulers keep state across steps)."""
    import diffusers

    return getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler")).from_config(config)
