"""Prompt encoding with CLIP, as diffusers' Stable Diffusion pipelines do it, counting truncated prompts.

Tokenising is host work and encoding is device work, so they are two functions: a worker tokenises the next
batch while the device still runs the current one.
"""

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    """A batch tokenised to the full window, as SD was trained: BOS, tokens, EOS, then padding."""

    input_ids: torch.Tensor  # (batch, max_length) int64 on the host
    attention_mask: torch.Tensor  # (batch, max_length), 1 for real tokens
    truncated: list[bool]  # prompts longer than the window, cut to fit


def tokenize_prompts(tokenizer, prompts: list[str], pin_memory: bool = False) -> Tokens:
    """One tokeniser pass: the full token lists give the truncation count, then each is cut and padded.

    Cutting keeps BOS, the first max_length - 2 tokens and EOS, which is what the tokenizer's own
    `truncation=True, padding="max_length"` gives (tests compare the two).
    """
    max_length = tokenizer.model_max_length
    full = tokenizer(prompts, truncation=False).input_ids
    input_ids = torch.full((len(prompts), max_length), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), max_length), dtype=torch.int64)
    for row, ids in enumerate(full):
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    if pin_memory:
        input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
    return Tokens(input_ids, attention_mask, [len(ids) > max_length for ids in full])


@torch.inference_mode()
def encode_tokens(text_encoder, tokens: Tokens) -> torch.Tensor:
    """Runs the text encoder once on the device: (batch, max_length, hidden) in the encoder's dtype."""
    device = text_encoder.device
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device, non_blocking=True)
    embeds = text_encoder(tokens.input_ids.to(device, non_blocking=True), attention_mask=attention_mask)[0]
    return embeds.to(text_encoder.dtype)
