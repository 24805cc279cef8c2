"""Loading diffusers-format models from local folders or the Hugging Face hub, each component once per process.

The InstaFlow repos name a custom pipeline class (`RectifiedFlowPipeline`) in `model_index.json`, so we never go
through `DiffusionPipeline.from_pretrained`: we load unet, vae, text_encoder and tokenizer ourselves. Components are
keyed by a digest of their tensors, so a student and a teacher that ship the same VAE and text encoder (InstaFlow
and SD-1.5 do, in different file formats) share one copy in memory.
"""

import copy
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from instaflow.refiner import RefinerComponents

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
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
    def default(cls, dtype: str | None = None, compile: bool | None = None, device: str | None = None) -> "Runtime":
        """CUDA when there is a GPU (unless `device` says otherwise); fp16 and torch.compile on CUDA, fp32 and
        eager on the CPU, unless told otherwise.

        On an H200, compiling the UNet and the decoder doubled one-step images/s at batch 32 (tests/bench/README.md);
        on the CPU its minute of warm-up outweighs what it saves.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "float16" if device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if compile is None:
            compile = device.type == "cuda"
        return cls(device=device, dtype=DTYPES[dtype], compile=compile)


XL_COMPONENTS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")  # an SDXL refiner's own parts


def hub_patterns(variant: str | None, layout: str = "pipeline") -> tuple[list[str], list[str]]:
    """What to download of a hub repo: configs, the tokenizer, and one weight format, safetensors (the fp16
    variant when running fp16 and the repo has it); no safety checker, no .bin, no flax/onnx duplicates.
    A `module` repo (a lone model such as TAESD's decoder, or a scorer with its processor and tokenizer) has its
    configs, tokenizer files and weights at the top."""
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    if layout == "module":
        allow = ["*.json", "*.txt", weights]
    else:
        allow = ["model_index.json", "scheduler/*", "tokenizer/*"]
        components = WEIGHT_COMPONENTS
        if layout == "xl":  # an SDXL pipeline: a second text encoder (the refiner has only that one)
            allow, components = allow + ["tokenizer_2/*"], (*WEIGHT_COMPONENTS, "text_encoder_2")
        for name in components:
            allow += [f"{name}/*.json", f"{name}/{weights}"]
    ignore = ["*non_ema*"] + ([] if variant else ["*.fp16.*"])
    return allow, ignore


def resolve_model_dir(model: str, revision: str | None = None, variant: str | None = None,
                      layout: str = "pipeline") -> Path:
    """A local folder as is; a hub id through the hub cache (honouring HF_HUB_OFFLINE), with one clear error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.match(model):
        raise ModelLoadError(f"model {model!r}: no such folder, and not a Hugging Face hub id (org/name)")
    from huggingface_hub import snapshot_download

    allow, ignore = hub_patterns(variant, layout)
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:  # the hub raises a dozen types; the user needs one message naming the model
        raise ModelLoadError(f"model {model!r}: cannot load from the Hugging Face hub ({hub_hint()}): {exc}") from None


def hub_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the hub is unreachable"


def _file_digest(path: Path) -> str:
    """Content identity of one file; hub-cache symlinks already point at blobs named by their hash."""
    if path.is_symlink():
        return Path(os.path.realpath(path)).name
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
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
    def latent(self) -> "LatentGeometry":
        """What the VAE makes of an image: the seed noise, a teacher's output and an encoded image all have its
        shape."""
        return LatentGeometry.of_vae(self.vae.config, type(self.vae).__name__)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.latent.scale_factor


@dataclass(frozen=True)
class LatentGeometry:
    """A VAE's latents: their channels, and the image side over the latent side. Read from the VAE's config, so
    the driver's checks (from config files) and the workers (from loaded modules) agree on it."""

    channels: int
    scale_factor: int

    @classmethod
    def of_vae(cls, config: Mapping, class_name: str) -> "LatentGeometry":
        """From the keys the VAE's class takes (a stray key from another class is ignored, as diffusers ignores
        it): one upsampling per decoder block after the first, AutoencoderKL's each doubling the side, the tiny
        AutoencoderTiny's multiplying it by its `upsampling_scaling_factor`. A ValueError names a bad value."""
        if class_name == "AutoencoderTiny":
            blocks, upsampling = config_blocks(config, "decoder_block_out_channels"), \
                config_int(config, "upsampling_scaling_factor")
        elif class_name == "AutoencoderKL":
            blocks, upsampling = config_blocks(config, "block_out_channels"), 2
        else:
            raise ValueError(f"no latent geometry for a VAE of class {class_name!r}")
        factor = upsampling ** (blocks - 1)
        if factor > MAX_SCALE_FACTOR:
            raise ValueError(f"its latents would be 1/{factor} of the image side, more than 1/{MAX_SCALE_FACTOR}")
        return cls(config_int(config, "latent_channels"), factor)

    def shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One sample's latent, (channels, height, width)."""
        return self.channels, height // self.scale_factor, width // self.scale_factor

    def __str__(self) -> str:
        return f"{self.channels} latent channels at 1/{self.scale_factor} of the image side"


VAE_CONFIG, UNET_CONFIG = "vae/config.json", "unet/config.json"  # in a pipeline folder
MAX_SCALE_FACTOR = 64  # SD-1.5's VAE makes latents at 1/8 of the image side; beyond 1/64 no model is real
MAX_CONFIG_INT = 4096


def config_int(config: Mapping, key: str) -> int:
    """A count from a config (channels, a factor): a positive integer of a plausible size, or a ValueError."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONFIG_INT:
        raise ValueError(f"{key} must be an integer between 1 and {MAX_CONFIG_INT}, got {value!r:.80}")
    return value


def config_blocks(config: Mapping, key: str) -> int:
    """How many blocks a config's list of per-block channels names (each a count), or a ValueError."""
    value = config.get(key)
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16:
        raise ValueError(f"{key} must be a list of 1 to 16 channel counts, got {value!r:.80}")
    for index in range(len(value)):
        config_int({f"{key}[{index}]": value[index]}, f"{key}[{index}]")
    return len(value)


def component_config(path: Path, component: str) -> dict:
    """A component's config file as diffusers reads it: the file's values, and for the keys it leaves out the
    defaults of the class the component is loaded into. For checks on a driver, which loads no weights."""
    config = json.loads(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError("it holds no JSON object")
    parameters = inspect.signature(component_class(component).__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty} | config


def config_geometry(path: Path, component: str, what: str, read):
    """`read` of a component's config file, as diffusers reads it (component_config); a ModelLoadError naming
    `what` (a flag, its model and the file) for a file that cannot be read or a value that is not a count."""
    try:
        return read(component_config(path, component))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested beyond the parser's depth
        raise ModelLoadError(f"{what}: {type(exc).__name__ if isinstance(exc, RecursionError) else exc}") from None


def pipeline_geometry(folder: Path, model: str) -> LatentGeometry:
    """The latents of a pipeline folder's VAE, from its configs alone; a ModelLoadError naming `model` when its
    UNet takes or makes latents of other channels (every unit would fail in a convolution on the workers)."""
    geometry = config_geometry(folder / VAE_CONFIG, "vae", f"{model}: its {VAE_CONFIG}",
                               lambda vae: LatentGeometry.of_vae(vae, "AutoencoderKL"))
    unet = config_geometry(folder / UNET_CONFIG, "unet", f"{model}: its {UNET_CONFIG}",
                           lambda config: {key: config_int(config, key) for key in ("in_channels", "out_channels")})
    if not geometry.channels == unet["in_channels"] == unet["out_channels"]:
        raise ModelLoadError(f"{model}: its {VAE_CONFIG} has latent_channels {geometry.channels}, but its "
                             f"{UNET_CONFIG} has in_channels {unet['in_channels']} and out_channels "
                             f"{unet['out_channels']}")
    return geometry


def tensor_digest(module: torch.nn.Module) -> str:
    """Content identity of a module's weights: equal tensors give equal digests, whatever files they came from
    (InstaFlow's repos and SD-1.5's ship the same VAE and text encoder in different formats)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_digest(module: torch.nn.Module) -> str:
    """Identity of what a module's config makes of its weights: equal tensors under another config are another
    component (the SDXL refiner's VAE may hold SD-1.5's weights with another scaling factor, and sharing the
    student's VAE then refined every image from the wrong latents). Keys starting with "_" (the folder it came
    from, library versions) and transformers' version are left out, so the same component shipped in two repos is
    still loaded once."""
    config = getattr(module, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    kept = {key: value for key, value in values.items() if not key.startswith("_") and key != "transformers_version"}
    text = json.dumps([type(module).__qualname__, kept], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


UNET_CLASS = "UNet2DConditionModel"


def _check_unet_class(folder: Path) -> None:
    """Only diffusers' UNet2DConditionModel is loaded, of any size (its config gives widths, depth, heads and the
    cross-attention size). Another class, such as a stacked U-Net, is named in one error: loading it would need its
    class here beside UNet2DConditionModel, with the same call (latents, timestep, encoder_hidden_states)."""
    try:
        named = json.loads((folder / "config.json").read_text()).get("_class_name", UNET_CLASS)
    except (OSError, ValueError, AttributeError):
        return  # diffusers' own loading says what is wrong with the config
    if named != UNET_CLASS:
        raise ModelLoadError(f"{folder}/config.json names the UNet class {named!r}; this engine loads "
                             f"{UNET_CLASS} of any size, and another class would need to be added to "
                             "instaflow/loading.py")


# The class each component is loaded into, by its name in a pipeline folder or its role: (module, class).
COMPONENT_CLASSES = {"unet": ("diffusers", UNET_CLASS), "vae": ("diffusers", "AutoencoderKL"),
                     "text_encoder": ("transformers", "CLIPTextModel"),
                     "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                     "tiny_decoder": ("diffusers", "AutoencoderTiny"), "controlnet": ("diffusers", "ControlNetModel"),
                     "safety_checker": ("diffusers.pipelines.stable_diffusion.safety_checker",
                                        "StableDiffusionSafetyChecker"),
                     "clip": ("transformers", "CLIPModel")}


def component_class(name: str) -> type:
    """The class a component of this name is loaded into, imported when first asked for."""
    module, class_name = COMPONENT_CLASSES[name]
    return getattr(importlib.import_module(module), class_name)


class ComponentCache:
    """Loads each distinct component once per process, whichever model asks for it.

    Weights are read from safetensors only, unless `allow_pickle` (pickle checkpoints can run code on load).
    """

    def __init__(self, runtime: Runtime, allow_pickle: bool = False):
        self.runtime = runtime
        self.allow_pickle = allow_pickle
        self._loaded: dict[tuple[str, str], object] = {}

    def load(self, model: str, revision: str | None = None, variant: str | None = None) -> Components:
        folder = resolve_model_dir(model, revision, variant)
        missing = [name for name in REQUIRED_COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise ModelLoadError(f"model {model!r} ({folder}): missing component folders {missing}")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
        try:
            parts = {name: self._component(name, folder / name, variant) for name in REQUIRED_COMPONENTS}
        except Exception as exc:
            raise ModelLoadError(f"model {model!r} ({folder}): {exc}") from exc
        return Components(name=model, scheduler_config=scheduler_config, runtime=self.runtime, **parts)

    def load_tiny_decoder(self, model: str) -> torch.nn.Module:
        """A tiny decoder (diffusers' AutoencoderTiny, e.g. TAESD for SD-1.5) to use in place of the VAE: far
        cheaper, for previews and for users who accept its quality."""
        folder = resolve_model_dir(model, layout="module")
        try:
            return self._component("tiny_decoder", folder, None)
        except Exception as exc:
            raise ModelLoadError(f"tiny decoder {model!r} ({folder}): {exc}") from exc

    def load_refiner(self, model: str, variant: str | None = None) -> RefinerComponents:
        """An SDXL refiner (or base) pipeline folder's parts; the VAE in float32 where its config forces the
        upcast, as diffusers' pipelines run it."""
        folder = resolve_model_dir(model, variant=variant, layout="xl")
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.exists() else {}
        encoders = [name for name in ("text_encoder", "text_encoder_2") if (folder / name).is_dir()]
        try:
            vae_config = json.loads((folder / "vae" / "config.json").read_text())
            vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else None
            return RefinerComponents(
                unet=self._component("unet", folder / "unet", variant),
                vae=self._component("vae", folder / "vae", variant, dtype=vae_dtype),
                text_encoders=[self._component(name, folder / name, variant) for name in encoders],
                tokenizers=[self._component(name.replace("text_encoder", "tokenizer"),
                                            folder / name.replace("text_encoder", "tokenizer"), None)
                            for name in encoders],
                scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
                requires_aesthetics_score=index.get("requires_aesthetics_score", False),
                force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                device=self.runtime.device, dtype=self.runtime.dtype,
            )
        except Exception as exc:
            raise ModelLoadError(f"refiner {model!r} ({folder}): {exc}") from exc

    def load_controlnet(self, model: str) -> torch.nn.Module:
        """A diffusers ControlNetModel (config and weights at the top of its folder, as the hub repos ship it)."""
        folder = resolve_model_dir(model, layout="module")
        try:
            return self._component("controlnet", folder, None)
        except Exception as exc:
            raise ModelLoadError(f"ControlNet {model!r} ({folder}): {exc}") from exc

    def load_scorer(self, kind: str, folder: str) -> tuple:
        """A scorer from a model folder with its image processor: "safety_checker" (diffusers'
        StableDiffusionSafetyChecker) -> (model, processor); "clip" (a transformers CLIPModel) -> (model,
        processor, tokenizer)."""
        from transformers import CLIPImageProcessor, CLIPTokenizer

        path = Path(folder)
        try:
            model = self._component(kind, path, None)
            processor = CLIPImageProcessor.from_pretrained(path)
            if kind == "clip":
                return model, processor, CLIPTokenizer.from_pretrained(path)
            return model, processor
        except Exception as exc:
            raise ModelLoadError(f"{kind.replace('_', ' ')} {folder!r}: {exc}") from exc

    def editable_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of a loaded module for one model to change (a fused LoRA, a merged fine-tune): uncompiled, never
        shared through this cache, so the models that share the original keep it as it is. Give it to `place`
        once changed."""
        return copy.deepcopy(getattr(module, "_orig_mod", module))

    def _component(self, name: str, folder: Path, variant: str | None, dtype: torch.dtype | None = None):
        if name.startswith("tokenizer"):
            key = (name, component_digest(folder))
            if key not in self._loaded:
                from transformers import CLIPTokenizer

                self._loaded[key] = CLIPTokenizer.from_pretrained(folder)
            return self._loaded[key]
        logger.info("loading %s from %s", name, folder)
        module = self._read_weights(name, folder, variant, dtype or self.runtime.dtype)
        key = (name, config_digest(module), tensor_digest(module))
        if key not in self._loaded:
            self._loaded[key] = self.place(name, module)
        return self._loaded[key]

    def _read_weights(self, name: str, folder: Path, variant: str | None, dtype: torch.dtype) -> torch.nn.Module:
        loader = component_class(name)
        if name == "unet":
            _check_unet_class(folder)
        safetensors = sorted(p.name for p in folder.glob("*.safetensors"))
        if not safetensors and not self.allow_pickle:
            raise ModelLoadError(f"{folder} has no .safetensors weights; pickle checkpoints (.bin) can run code "
                                 "when loaded and are refused unless you pass --allow-pickle")
        if variant and not any(f".{variant}." in file for file in safetensors):
            variant = None  # this component has no such variant (a local folder, a mixed repo): the full weights
        return loader.from_pretrained(folder, torch_dtype=dtype, variant=variant,
                                      use_safetensors=None if self.allow_pickle else True)

    def place(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """`module` on the device, for inference, compiled where that pays (the UNet and a ControlNet, the
        decoders)."""
        # Contiguous memory, not channels_last: on an H200 channels_last made one-step images 11% slower
        # (tests/bench/README.md). diffusers attends with PyTorch's SDPA by default.
        module = module.to(self.runtime.device).eval().requires_grad_(False)
        if self.runtime.compile and name in ("unet", "controlnet"):
            module = torch.compile(module)
        if self.runtime.compile and name in ("vae", "tiny_decoder"):
            module.decode = torch.compile(module.decode)
        return module
