"""The LAION aesthetic predictor: a score of about 1 to 10 from an image's CLIP ViT-L/14 embedding.

christophschuhmann/improved-aesthetic-predictor trains an MLP on L2-normalised CLIP image embeddings
(`encode_image`, transformers' `get_image_features`) to predict human ratings (SAC, LOGOS, AVA); NeMo Curator and
dataset builders filter on it. The MLP has no activation between its layers (as trained) and its dropouts are off
in evaluation, so it is an affine map; it is kept layer by layer here so that its weights load as released.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN = (1024, 128, 64, 16)  # the released head's layer widths; its input is the CLIP model's projection_dim
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}  # by position in `layers`, as the released state dict numbers its linears


class AestheticError(ValueError):
    """A head file that is not the aesthetic predictor's MLP: the message names the file and what differs."""


class AestheticHead(torch.nn.Module):
    """improved-aesthetic-predictor's `MLP`: linears at `layers.0, 2, 4, 6, 7`, dropouts between the first four."""

    def __init__(self, input_dim: int):
        super().__init__()
        widths, modules = (input_dim, *HIDDEN, 1), []
        for inputs, outputs in zip(widths, widths[1:]):
            modules.append(torch.nn.Linear(inputs, outputs))
            if len(modules) in DROPOUTS:
                modules.append(torch.nn.Dropout(DROPOUTS[len(modules)]))
        self.layers = torch.nn.Sequential(*modules)
        self.input_dim = input_dim

    @torch.inference_mode()
    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N,) float32 scores of (N, input_dim) CLIP image embeddings (any dtype; normalised here, in float32)."""
        return self.layers(F.normalize(image_embeds.float(), dim=-1)).squeeze(-1)


def read_head(path: str | Path) -> AestheticHead:
    """The head in a `.safetensors` file (never a pickle), its input width read from its first layer; raises
    AestheticError naming the file for anything else."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AestheticError(f"{path}: the aesthetic head must be a .safetensors file (pickle files can run code)")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors' and the OS's errors: the user needs the file named
        raise AestheticError(f"{path}: not a readable safetensors file: {exc}") from None
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise AestheticError(f"{path}: no layers.0.weight matrix: not the LAION aesthetic predictor's MLP")
    head = AestheticHead(first.shape[1])
    expected = {name: tuple(value.shape) for name, value in head.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in state.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(n for n in found if found[n] != expected[n])
        raise AestheticError(f"{path}: not the LAION aesthetic predictor's MLP (layers {', '.join(differ[:4])} "
                             f"differ from {', '.join(f'{n} {s}' for n, s in list(expected.items())[:2])}, ...)")
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise AestheticError(f"{path}: its weights are not all finite")
    head.load_state_dict({name: value.float() for name, value in state.items()})
    return head.eval()
