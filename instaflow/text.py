"""Prompt encoding with CLIP, as diffusers' Stable Diffusion pipelines do it, counting truncated prompts."""

from dataclasses import dataclass

import torch


@dataclass
class EncodedPrompts:
    embeds: torch.Tensor  # (batch, 77, hidden) on the model's device, in its dtype
    truncated: list[bool]  # prompts longer than the encoder's window, cut to fit


@torch.inference_mode()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> EncodedPrompts:
    """Tokenise to the full 77-token window (padding included, as SD was trained) and run the text encoder once."""
    max_length = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    device = text_encoder.device
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
    return EncodedPrompts(embeds=embeds.to(text_encoder.dtype), truncated=[n > max_length for n in lengths])
