"""Conditioning for the samplers: the UNet's extra arguments at each step, from whatever conditions a batch.

A conditioner is put in a batch's `conditioners` by the stage that owns it (a ControlNet's control images are the
first, instaflow/controlnet.py); the samplers ask each conditioner of the batch for the UNet's extra arguments at
every step, knowing none of them. Residuals that two conditioners both give are added, as diffusers'
MultiControlNetModel adds its ControlNets' residuals.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class Conditioner(Protocol):
    def unet_kwargs(self, model_input: torch.Tensor, timestep, embeds: torch.Tensor, guided: bool) -> dict:
        """The UNet's extra arguments for this step, given its own input (the latent, doubled under guidance with
        the unconditional half first), the timestep and the text embeddings."""


def unet_kwargs(conditioners: Sequence[Conditioner], model_input: torch.Tensor, timestep, embeds: torch.Tensor,
                guided: bool) -> dict:
    """Every conditioner's arguments for this step, those given twice added."""
    merged: dict = {}
    for conditioner in conditioners:
        for name, value in conditioner.unet_kwargs(model_input, timestep, embeds, guided).items():
            merged[name] = _added(merged[name], value) if name in merged else value
    return merged


def _added(first, second):
    if isinstance(first, (tuple, list)):
        return type(first)(a + b for a, b in zip(first, second, strict=True))
    return first + second
