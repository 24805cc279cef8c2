"""Loading diffusers-format models from local folders or the Hugging Face hub, each component once per process.

The InstaFlow repos name a custom pipeline class (`RectifiedFlowPipeline`) in `model_index.json`, so we never go
through `DiffusionPipeline.from_pretrained`: we load unet, vae, text_encoder and tokenizer ourselves. Components are
keyed by the digest of their files, so a student and a teacher that ship the same VAE and text encoder (InstaFlow
and SD-1.5 do) share one copy in memory.
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
# Only what sampling needs: no safety checker, no root checkpoints, no fp16/non-EMA/flax/onnx duplicates.
HUB_ALLOW = ["model_index.json", *(f"{name}/*" for name in (*REQUIRED_COMPONENTS, "scheduler"))]
HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.ckpt"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message names it."""


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: fp16 on CUDA by default, fp32 on the CPU."""

    device: torch.device
    dtype: torch.dtype
    compile: bool = False

    @classmethod
    def default(cls, dtype: str | None = None, compile: bool | None = None) -> "Runtime":
        """fp16 and torch.compile on CUDA, fp32 and eager on the CPU, unless told otherwise.

        On an H200, compiling the UNet and the decoder doubled one-step images/s at batch 32 (BENCHMARKS.md);
        on the CPU its minute of warm-up outweighs what it saves.
        """
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = "float16" if device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if compile is None:
            compile = device.type == "cuda"
        return cls(device=device, dtype=DTYPES[dtype], compile=compile)


def resolve_model_dir(model: str) -> Path:
    """A local folder as is; a hub id through the hub cache (honouring HF_HUB_OFFLINE), with one clear error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.match(model):
        raise ModelLoadError(f"model {model!r}: no such folder, and not a Hugging Face hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE))
    except Exception as exc:  # the hub raises a dozen types; the user needs one message naming the model
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the hub is unreachable"
        raise ModelLoadError(f"model {model!r}: cannot load from the Hugging Face hub ({hint}): {exc}") from None


def _file_digest(path: Path) -> str:
    """Content identity of one file; hub-cache symlinks already point at blobs named by their hash."""
    if path.is_symlink():
        return Path(os.path.realpath(path)).name
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def component_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder)}:{_file_digest(file)}\n".encode())
    return digest.hexdigest()


@dataclass
class Components:
    """One model's parts, ready to run. `scheduler_config` is the model's own, for teachers that build a solver."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    runtime: Runtime

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


class ComponentCache:
    """Loads each distinct component once per process, whichever model asks for it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._loaded: dict[tuple[str, str], object] = {}

    def load(self, model: str) -> Components:
        folder = resolve_model_dir(model)
        missing = [name for name in REQUIRED_COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise ModelLoadError(f"model {model!r} ({folder}): missing component folders {missing}")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
        try:
            parts = {name: self._component(name, folder / name) for name in REQUIRED_COMPONENTS}
        except Exception as exc:
            raise ModelLoadError(f"model {model!r} ({folder}): {exc}") from exc
        return Components(name=model, scheduler_config=scheduler_config, runtime=self.runtime, **parts)

    def _component(self, name: str, folder: Path):
        key = (name, component_digest(folder))
        if key not in self._loaded:
            logger.info("loading %s from %s", name, folder)
            self._loaded[key] = self._load_component(name, folder)
        return self._loaded[key]

    def _load_component(self, name: str, folder: Path):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if name == "tokenizer":
            return CLIPTokenizer.from_pretrained(folder)
        loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[name]
        module = loader.from_pretrained(folder, torch_dtype=self.runtime.dtype)
        # Contiguous memory, not channels_last: on an H200 channels_last made one-step images 11% slower
        # (BENCHMARKS.md). diffusers attends with PyTorch's SDPA by default.
        module = module.to(self.runtime.device).eval().requires_grad_(False)
        if self.runtime.compile and name == "unet":
            module = torch.compile(module)
        if self.runtime.compile and name == "vae":
            module.decode = torch.compile(module.decode)
        return module
