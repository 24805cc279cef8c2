"""ControlNet conditioning for the samplers: residuals a ControlNet adds to the UNet at every step.

At each step the ControlNet gets the UNet's own input (latent, timestep, text embeddings) and the control image,
and its residuals enter the UNet as `down_block_additional_residuals` and `mid_block_additional_residual`, scaled
by the conditioning scale: diffusers' StableDiffusionControlNetPipeline without guess mode. With classifier-free
guidance the control image is given to both halves of the batch. A `Control` is a conditioner of the samplers
(instaflow/conditioning.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from instaflow.loading import LatentGeometry, config_blocks, config_int


@dataclass(frozen=True)
class ControlNet:
    """A loaded diffusers ControlNetModel and the scale of its residuals (controlnet_conditioning_scale)."""

    model: torch.nn.Module
    scale: float

    def control(self, pixels: torch.Tensor) -> "Control":
        """A conditioner for one batch of (N, H, W, 3) uint8 control images on the host."""
        return Control(self, pixels)


def controlnet_geometry(config: Mapping) -> LatentGeometry:
    """The latents a ControlNet runs on, from its config: `in_channels`, and the side its conditioning embedding
    brings the control image down to (each of its blocks after the first halves it, with a stride-2 convolution)."""
    return LatentGeometry(config_int(config, "in_channels"),
                          2 ** (config_blocks(config, "conditioning_embedding_out_channels") - 1))


class Control:
    """A ControlNet with one batch's control images, copied to the device once, at the first step that needs
    them (a student and a teacher of one batch share the copy)."""

    def __init__(self, controlnet: ControlNet, pixels: torch.Tensor):
        self.controlnet = controlnet
        self.pixels = pixels
        self._on_device: dict = {}

    def images(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (device, dtype) not in self._on_device:
            self._on_device[device, dtype] = conditioning_images(self.pixels, device, dtype)
        return self._on_device[device, dtype]

    def unet_kwargs(self, model_input: torch.Tensor, timestep, embeds: torch.Tensor, guided: bool) -> dict:
        """The UNet's extra arguments for this step: the ControlNet on the same latent, timestep and embeddings,
        its outputs scaled by the conditioning scale (ControlNetModel multiplies them by `conditioning_scale`)."""
        images = self.images(model_input.device, model_input.dtype)
        images = torch.cat([images] * 2) if guided else images
        down, mid = self.controlnet.model(model_input, timestep, encoder_hidden_states=embeds, controlnet_cond=images,
                                          conditioning_scale=self.controlnet.scale, guess_mode=False,
                                          return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def conditioning_images(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 control images (on the host) -> (N, 3, H, W) in [0, 1] on the device, as diffusers'
    control image processor makes them (VaeImageProcessor with do_normalize=False)."""
    images = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    return images.to(dtype)
