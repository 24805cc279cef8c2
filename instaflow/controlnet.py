"""ControlNet conditioning for the samplers: residuals a ControlNet adds to the UNet at every step.

At each step the ControlNet gets the UNet's own input (latent, timestep, text embeddings) and the control image,
and its residuals enter the UNet as `down_block_additional_residuals` and `mid_block_additional_residual`, scaled
by the conditioning scale: diffusers' StableDiffusionControlNetPipeline without guess mode. With classifier-free
guidance the control image is given to both halves of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ControlNet:
    """A loaded diffusers ControlNetModel and the scale of its residuals (controlnet_conditioning_scale)."""

    model: torch.nn.Module
    scale: float

    def control(self, images: torch.Tensor) -> "Control":
        return Control(self, images)


@dataclass(frozen=True)
class Control:
    """A ControlNet with one batch's control images: (N, 3, H, W) in [0, 1] on the device, in its dtype."""

    controlnet: ControlNet
    images: torch.Tensor

    def residuals(self, model_input: torch.Tensor, timestep, embeds: torch.Tensor, guided: bool) -> dict:
        """The UNet's extra arguments for this step: the ControlNet on the same latent, timestep and embeddings,
        its outputs scaled by the conditioning scale (ControlNetModel multiplies them by `conditioning_scale`)."""
        images = torch.cat([self.images] * 2) if guided else self.images
        down, mid = self.controlnet.model(model_input, timestep, encoder_hidden_states=embeds, controlnet_cond=images,
                                          conditioning_scale=self.controlnet.scale, guess_mode=False,
                                          return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def conditioning_images(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 control images (on the host) -> (N, 3, H, W) in [0, 1] on the device, as diffusers'
    control image processor makes them (VaeImageProcessor with do_normalize=False)."""
    images = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    return images.to(dtype)
