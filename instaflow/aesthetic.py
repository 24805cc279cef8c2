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
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the dtypes a head may be stored in


class AestheticError(ValueError):
    """A head file that is not the aesthetic predictor's MLP: the message names the file and what differs."""


class HeadWidthError(AestheticError):
    """A head of the released layout for CLIP embeddings of another width (`width`): another CLIP model's."""

    def __init__(self, message: str, width: int):
        super().__init__(message)
        self.width = width


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


def head_shapes(input_dim: int) -> dict[str, tuple[int, ...]]:
    """The released head's tensors, by name, with their shapes, for CLIP embeddings of `input_dim` values: read from
    the head built on the meta device, which holds no data, so a claimed width costs nothing."""
    with torch.device("meta"):
        return {name: tuple(value.shape) for name, value in AestheticHead(input_dim).state_dict().items()}


def read_head(path: str | Path, input_dim: int) -> AestheticHead:
    """The head in a `.safetensors` file (never a pickle), for CLIP embeddings of `input_dim` values. The file's
    names and shapes are checked from its header before any tensor is read or any layer made, so a file costs at
    most what the released head costs; raises AestheticError naming the file for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AestheticError(f"{path}: the aesthetic head must be a .safetensors file (pickle files can run code)")
    expected = head_shapes(input_dim)
    try:
        with safe_open(str(path), framework="pt") as file:
            found = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
            integral = sorted(name for name in found if file.get_slice(name).get_dtype() not in FLOAT_DTYPES)
            if integral:
                raise AestheticError(f"{path}: tensors {', '.join(integral[:4])} are not floating point: not the "
                                     "LAION aesthetic predictor's MLP")
            first = found.get("layers.0.weight")
            if first is not None and len(first) == 2 and first[1] != input_dim and \
                    {**found, "layers.0.weight": expected["layers.0.weight"]} == expected:
                raise HeadWidthError(f"{path}: reads embeddings of {first[1]} values, not {input_dim}", first[1])
            if found != expected:
                differ = sorted(name for name in {*found, *expected} if found.get(name) != expected.get(name))
                raise AestheticError(f"{path}: not the LAION aesthetic predictor's MLP for embeddings of "
                                     f"{input_dim} values (tensors {', '.join(differ[:4])} differ)")
            state = {name: file.get_tensor(name).float() for name in found}
    except AestheticError:
        raise
    except Exception as exc:  # safetensors' and the OS's errors: the user needs the file named
        raise AestheticError(f"{path}: not a readable safetensors file: {exc}") from None
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise AestheticError(f"{path}: its weights are not all finite")
    head = AestheticHead(input_dim)
    head.load_state_dict(state)
    return head.eval()
