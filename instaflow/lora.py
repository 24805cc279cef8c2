"""LoRA adapters and fine-tune merges on the student, as the InstaFlow repo applies them (code/rf_lora.py).

A LoRA file (diffusers/PEFT or kohya/CivitAI format) is read (a diffusers file by diffusers' own loader), its keys
are matched one by one to the model's modules and checked, then loaded by diffusers' loaders as PEFT adapters into
the UNet and the text encoder, fused into their weights and unloaded: afterwards they are plain modules with
changed weights, so a LoRA costs no speed. A fine-tune merge adds SCALE x (fine-tune UNet - base UNet) to the
student's UNet, the repo's "hf" mode.

Both change the modules they are given, in place: callers pass their own copies (`copy.deepcopy`), never modules
that the component cache shares with another model (a teacher).
"""

import functools
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

# The prefixes diffusers' StableDiffusionLoraLoaderMixin gives each part's keys (its unet_name, text_encoder_name).
UNET = "unet"
TEXT_ENCODER = "text_encoder"
# kohya-ss / CivitAI: `lora_unet_` or `lora_te_` + the module's path with "_" for ".", then what the tensor is.
KOHYA_PARTS = {"lora_unet_": UNET, "lora_te_": TEXT_ENCODER}
KOHYA_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te_)(?P<path>[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_FACTORS = {"lora_down.weight": "A", "lora_up.weight": "B"}  # PEFT's names: A = down, B = up
# Every key of a file in kohya's format starts with one of these (diffusers' own test in `lora_state_dict`).
KOHYA_FILE_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message names the file."""


class LoraMismatchError(LoraError):
    """A LoRA key that does not fit the model: the message names the file and the first such key."""

    def __init__(self, file: str, key: str, why: str):
        self.file, self.key = file, key
        super().__init__(f"{file}: LoRA key {key!r} does not fit the model: {why}")


class MergeMismatchError(ValueError):
    """A fine-tune whose UNet tensors do not line up with the student's; the message names the first tensor."""


@dataclass(frozen=True)
class Lora:
    """One LoRA file: a diffusers/PEFT file as diffusers' `lora_state_dict` returns it (keys in any of diffusers'
    namings, prefixed `unet.` or `text_encoder.`; `metadata`: the LoraConfig arguments a diffusers-written file
    stores in its header, alpha among them, by part), or a kohya file's own keys (`kohya`: `lora_unet_*`, `lora_te_*`,
    `.alpha`). `check_lora` gives either as diffusers' loaders take it, with LoraConfig arguments derived from the
    checked tensors and alphas. Without alpha, alpha = rank."""

    name: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict | None
    kohya: bool = False


def read_lora(path: str | Path) -> Lora:
    """Reads a local `.safetensors` LoRA (never a pickle): a kohya/CivitAI file (`lora_unet_*`, `lora_te_*`,
    `.alpha`) as it is, a diffusers/PEFT file through diffusers' `lora_state_dict`.

    Diffusers would convert kohya keys too, but it tells their naming from the whole set of keys and finds none for
    a text-encoder part that adapts only some projections of a layer (q and v of self_attn, as attention-only
    trainers write): `check_lora` renames each key on its own, by the model's module names."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files must be .safetensors (pickle files can run code when loaded)")
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            if keys and all(key.startswith(KOHYA_FILE_PREFIXES) for key in keys):
                return Lora(str(path), {key: file.get_tensor(key) for key in keys}, None, kohya=True)
        state_dict, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(path), use_safetensors=True, return_lora_metadata=True)
    except Exception as exc:  # safetensors, OS and conversion errors: the user needs the file named
        raise LoraError(f"{path}: not a readable LoRA file: {exc}") from None
    for key in keys:
        if key not in state_dict:  # diffusers drops DoRA's `dora_scale` with a warning: DoRA is another formula
            raise LoraMismatchError(str(path), key, "diffusers' reader drops it (DoRA's magnitude): DoRA is not "
                                                    "W + scale * alpha / rank * up @ down")
    if not state_dict:
        raise LoraError(f"{path}: holds no tensors")
    return Lora(str(path), state_dict, metadata)


def meta_modules(model_dir: str | Path, parts: Sequence[str] = (UNET, TEXT_ENCODER)) -> list[torch.nn.Module]:
    """The UNet and/or text encoder of a diffusers model folder, in the order `parts` names them, built from their
    config.json files alone on the `meta` device (no weights read, no memory): enough for `check_lora` and
    `check_merge` on a driver."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model_dir = Path(model_dir)
    build = {UNET: lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / UNET)),
             TEXT_ENCODER: lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / TEXT_ENCODER))}
    with torch.device("meta"):
        return [build[part]() for part in parts]


# A diffusers file's keys, the UNet's and the text encoder's alike, in any of the namings diffusers reads, each key read
# on its own: PEFT's (`lora_A`/`lora_B`), diffusers' (`lora.down`/`lora.up`, `lora_linear_layer.down`/`up`) and the
# old attention processors' (`[processor.]to_q_lora.down`, on the attention module rather than the projection).
DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)(?:\.lora_(?P<peft>[AB])|\.lora(?:_linear_layer)?\.(?P<diffusers>down|up)"
    r"|(?:\.processor)?\.to_(?P<old_projection>q|k|v|out)_lora\.(?P<old>down|up))\.weight$")
DOWN_UP = {"down": "A", "up": "B"}
# The projection an old-style key names, under the attention module: the UNet's Attention, the text encoder's CLIP.
OLD_PROJECTIONS = {UNET: {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                   TEXT_ENCODER: {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}

Factors = dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]]  # (part, module) -> A/B -> (file key, tensor)


def _kohya_module_names(part: str, model: torch.nn.Module) -> dict[str, str]:
    """{a module's path as kohya writes it ("_" for "."; the text encoder's from `text_model.`): the module's name
    in `model`}. As rf_lora.py does, keys are matched to the model's own names: "_" also occurs inside names
    (down_blocks, self_attn, to_out), so a kohya path cannot be split on its own."""
    names = {}
    for name, _ in model.named_modules():
        if name:
            path = name if part == UNET or name.startswith("text_model.") else f"text_model.{name}"
            names[path.replace(".", "_")] = name
    return names


def _kohya_factors(lora: Lora, parts: dict[str, torch.nn.Module]) -> tuple[Factors, dict[tuple[str, str], float]]:
    """The kohya file's down/up weights by the model's module names, each key on its own, and its `.alpha` values."""
    module_names = {part: _kohya_module_names(part, model) for part, model in parts.items()}
    factors, alphas, alpha_keys = {}, {}, {}
    for key, tensor in lora.state_dict.items():
        match = KOHYA_KEY.match(key)
        if match is None:
            raise LoraMismatchError(lora.name, key, "not a kohya LoRA key (lora_unet_* or lora_te_*, then "
                                                    ".lora_down.weight, .lora_up.weight or .alpha)")
        part = KOHYA_PARTS[match["prefix"]]
        module = module_names[part].get(match["path"])
        if module is None:
            raise LoraMismatchError(lora.name, key, f"the {part} has no module {match['path']!r}")
        if match["kind"] != "alpha":
            factors.setdefault((part, module), {})[KOHYA_FACTORS[match["kind"]]] = (key, tensor)
        elif tensor.numel() != 1 or not torch.isfinite(tensor).all():
            raise LoraMismatchError(lora.name, key, "alpha must be one finite number, not "
                                                    f"{tensor.flatten()[:4].tolist()} (shape {tuple(tensor.shape)})")
        else:
            alphas[part, module], alpha_keys[part, module] = tensor.item(), key
    for target, key in alpha_keys.items():
        if target not in factors:
            raise LoraMismatchError(lora.name, key, "an alpha without its lora_down and lora_up weights")
    return factors, alphas


def _diffusers_factors(lora: Lora, parts: dict[str, torch.nn.Module]) -> Factors:
    """The diffusers file's down/up weights by module name, each key renamed on its own (diffusers' loaders infer
    one naming from the whole set of a part's keys, so a file that mixes namings loads or fails by which key comes
    first, and merges keys that rename alike)."""
    factors = {}
    flattened = not hasattr(parts[TEXT_ENCODER], "text_model")  # transformers 5; files keep `text_model.`
    for key, tensor in lora.state_dict.items():
        part, _, name = key.partition(".")
        if part not in parts:
            raise LoraMismatchError(lora.name, key, "names neither the UNet (unet.) nor the text encoder "
                                                    "(text_encoder.)")
        match = DIFFUSERS_KEY.match(name)
        if match is None:
            raise LoraMismatchError(lora.name, key, "not a LoRA down/up weight (lora_A/lora_B, lora.down/up, "
                                                    "lora_linear_layer.down/up, to_q_lora.down/up) that diffusers "
                                                    "fuses")
        module = match["module"]
        if part == TEXT_ENCODER and flattened:
            module = module.removeprefix("text_model.")
        if match["old_projection"]:
            module = f"{module}.{OLD_PROJECTIONS[part][match['old_projection']]}"
        factor = match["peft"] or DOWN_UP[match["diffusers"] or match["old"]]
        pair = factors.setdefault((part, module), {})
        if factor in pair:
            raise LoraMismatchError(lora.name, key, f"names the same weight as {pair[factor][0]!r} (the {part}'s "
                                                    f"{module!r}, {'down' if factor == 'A' else 'up'})")
        pair[factor] = (key, tensor)
    return factors


def _expected_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple, tuple]:
    """(lora_A, lora_B) weight shapes that PEFT's LoRA layers have on `module`: A = down, B = up."""
    if isinstance(module, torch.nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    kernel = tuple(module.weight.shape[2:])  # PEFT's conv lora_A has the module's kernel, lora_B is 1x1
    return (rank, module.weight.shape[1], *kernel), (module.out_channels, rank, 1, 1)


def _loader_key(part: str, module: str, factor: str) -> str:
    """A weight's name for diffusers' loaders, in a naming each reads without inferring it from the whole set: PEFT's
    for the UNet, diffusers' `lora_linear_layer` for the text encoder (which its loader converts to PEFT's)."""
    if part == UNET:
        return f"{UNET}.{module}.lora_{factor}.weight"
    return f"{TEXT_ENCODER}.{module}.lora_linear_layer.{'down' if factor == 'A' else 'up'}.weight"


def _adapter_metadata(factors: Factors, alphas: dict[tuple[str, str], float]) -> dict:
    """The LoraConfig arguments for diffusers' loaders, by part, from the checked tensors: every adapted module by
    its exact name, its rank and its alpha (rank where the file gives none), so PEFT scales each module by its own
    alpha / rank and adapts nothing else."""
    metadata = {}
    for part in (UNET, TEXT_ENCODER):
        ranks = {module: pair["A"][1].shape[0] for (of, module), pair in factors.items() if of == part}
        if ranks:
            alpha = {module: alphas.get((part, module), rank) for module, rank in ranks.items()}
            first = next(iter(ranks))
            metadata |= {f"{part}.target_modules": list(ranks), f"{part}.r": ranks[first],
                         f"{part}.lora_alpha": alpha[first], f"{part}.rank_pattern": ranks,
                         f"{part}.alpha_pattern": alpha}
    return metadata


def check_lora(lora: Lora, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> Lora:
    """The LoRA, checked, as diffusers' loaders take it: raises LoraMismatchError, naming the file and the first key
    as the file spells it, when a key is neither the UNet's nor the text encoder's, names a module the model does
    not have (or one LoRA cannot adapt), lacks its other half, names a weight another key names, or has a shape
    that does not fit; raises LoraError naming a header setting that does not fit (`_header_alphas`). Any subset of
    the modules may be adapted; every key is read on its own, never by what the other keys are.

    Diffusers itself only warns about keys it cannot place and drops them; here they refuse the file. Works on real
    modules or on `meta_modules` (it reads module names and shapes only), so a driver can run it before any worker
    starts."""
    parts = {UNET: unet, TEXT_ENCODER: text_encoder}
    if lora.kohya:
        factors, alphas = _kohya_factors(lora, parts)
    else:
        factors = _diffusers_factors(lora, parts)
    state_dict = {}
    for (part, module_name), pair in factors.items():
        first_key = next(iter(pair.values()))[0]
        try:
            module = parts[part].get_submodule(module_name)
        except AttributeError:
            raise LoraMismatchError(lora.name, first_key, f"the {part} has no module {module_name!r}") from None
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoraMismatchError(lora.name, first_key, f"{module_name!r} is a {type(module).__name__}, not a "
                                                          "Linear or Conv2d layer")
        if len(pair) != 2:
            raise LoraMismatchError(lora.name, first_key, "its other half is missing (down: lora_A or lora_down, "
                                                          "up: lora_B or lora_up)")
        down_key, down = pair["A"]
        if down.ndim < 2 or down.shape[0] < 1:
            raise LoraMismatchError(lora.name, down_key, f"shape {tuple(down.shape)}: a down weight is rank x inputs, "
                                                         "rank at least 1")
        for key, tensor in pair.values():
            if not torch.isfinite(tensor).all():
                raise LoraMismatchError(lora.name, key, "holds NaN or inf")
        want = dict(zip("AB", _expected_shapes(module, rank=down.shape[0])))
        for factor, (key, tensor) in pair.items():
            if tuple(tensor.shape) != want[factor]:
                raise LoraMismatchError(lora.name, key, f"shape {tuple(tensor.shape)}, the {part}'s "
                                                        f"{module_name!r} takes {want[factor]}")
            state_dict[_loader_key(part, module_name, factor)] = tensor
    if not lora.kohya:
        alphas = _header_alphas(lora, factors, text_encoder)
    return Lora(lora.name, state_dict, _adapter_metadata(factors, alphas))


# LoraConfig settings in a diffusers file's header that cannot change the fused weight, whatever their value (dropout
# is off when merging; the rest describe the training run). Every other setting but those checked against the tensors
# must have PEFT's default: DoRA, rsLoRA (alpha / sqrt(rank)), fan_in_fan_out, modules_to_save, another peft_type...
# would fuse something other than W + scale * alpha / rank * up @ down.
HEADER_INERT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                "lora_dropout"}
HEADER_MATCHING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")  # PEFT's matching
HEADER_CHECKED = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", *HEADER_MATCHING}
HEADER_PLAIN_INIT = (True, False, "gaussian")  # init_lora_weights that only initialise what the file then replaces


def _header_alphas(lora: Lora, factors: Factors, text_encoder: torch.nn.Module) -> dict[tuple[str, str], float]:
    """Each adapted module's alpha from the diffusers file's header (the LoraConfig arguments by part, `unet.r`,
    `text_encoder.lora_alpha`, ...), after checking every setting against the tensors: r and rank_pattern give each
    module the rank its tensors have, lora_alpha and alpha_pattern are finite numbers, target_modules (with
    exclude_modules, layers_to_transform, layers_pattern) take every adapted module, and no setting changes the
    formula. Raises LoraError naming the file and the setting (LoraMismatchError where a key contradicts it)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
    from peft.utils.other import get_pattern_key

    if lora.metadata is None:
        return {}

    def refuse(setting: str, value, why: str) -> LoraError:
        return LoraError(f"{lora.name}: LoRA header setting {setting!r} = {value!r}: {why}")

    if not isinstance(lora.metadata, dict):
        raise refuse("lora_adapter_metadata", lora.metadata, "not a mapping of LoraConfig settings")
    defaults = LoraConfig().to_dict()
    settings = {UNET: {}, TEXT_ENCODER: {}}
    for name, value in _fitting_metadata(lora.metadata, text_encoder).items():
        part, _, setting = name.partition(".")
        if part not in settings:
            raise refuse(name, value, "names neither the UNet (unet.) nor the text encoder (text_encoder.)")
        if setting not in defaults:
            raise refuse(name, value, "not a setting of PEFT's LoraConfig")
        plain = (setting in HEADER_INERT or setting in HEADER_CHECKED or value == defaults[setting]
                 or (setting == "init_lora_weights" and value in HEADER_PLAIN_INIT))
        if not plain:
            raise refuse(name, value, f"PEFT's default is {defaults[setting]!r}; this fuses something other than "
                                      "W + scale * alpha / rank * up @ down (not supported)")
        if setting in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            numbers = value if setting.endswith("_pattern") else {"": value}
            rank = setting in ("r", "rank_pattern")
            if not isinstance(numbers, dict) or not all(_is_number(number, rank) for number in numbers.values()):
                kind = "a positive whole number" if rank else "a finite number"
                raise refuse(name, value, f"not {kind} (by module name)" if setting.endswith("_pattern") else
                                          f"not {kind}")
            for pattern in numbers if setting.endswith("_pattern") else ():
                try:
                    re.compile(pattern)  # PEFT matches module names by it
                except re.error as exc:
                    raise refuse(name, value, f"{pattern!r} is not a pattern of module names ({exc})") from None
        settings[part][setting] = value

    alphas = {}
    for part, given in settings.items():
        modules = {module: pair for (of, module), pair in factors.items() if of == part}
        narrowing = {setting: given[setting] for setting in HEADER_MATCHING if given.get(setting) is not None}
        try:  # PEFT's own matching; without target_modules, every module the file adapts
            config = LoraConfig(**{"target_modules": list(modules), **narrowing})
            found = {module: check_target_module_exists(config, module) for module in modules}
            left_out = {module for module, match in found.items() if not match or isinstance(match, _ExcludedModule)}
        except (TypeError, ValueError, re.error) as exc:
            raise refuse(", ".join(f"{part}.{setting}" for setting in narrowing), list(narrowing.values()),
                         f"PEFT cannot match modules by it ({' '.join(str(exc).split())})") from None
        rank_pattern, alpha_pattern = given.get("rank_pattern", {}), given.get("alpha_pattern", {})
        for module, pair in modules.items():
            key, down = pair["A"]
            if module in left_out:
                raise LoraMismatchError(lora.name, key, f"the header's {part}.target_modules "
                                                        f"{given.get('target_modules')!r} (with exclude_modules, "
                                                        "layers_to_transform, layers_pattern) leave out its module")
            rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), given.get("r"))
            if rank is not None and rank != down.shape[0]:
                raise LoraMismatchError(lora.name, key, f"rank {down.shape[0]}, but the header's {part}.r / "
                                                        f"{part}.rank_pattern give its module rank {rank}")
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), given.get("lora_alpha"))
            if alpha is not None:
                alphas[part, module] = alpha
    return alphas


def _is_number(value, rank: bool) -> bool:
    """A rank: a whole number of at least 1; an alpha: a finite number (JSON's true and false are neither)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) and value >= 1 if rank else math.isfinite(value)


def fuse_loras(unet: torch.nn.Module, text_encoder: torch.nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """Fuses each (LoRA, scale) into `unet` and `text_encoder`, in place:
    W <- W + sum_i scale_i * alpha_i / rank_i * B_i @ A_i, for every module a LoRA adapts.

    Through diffusers' own path, as `pipe.load_lora_weights(...); pipe.set_adapters(...); pipe.fuse_lora();
    pipe.unload_lora_weights()` runs on a StableDiffusionPipeline: `load_lora_into_unet` /
    `load_lora_into_text_encoder` inject the adapters, `set_adapters` gives each its scale, `fuse_lora` merges
    them (PEFT's safe merge: a non-finite result is refused), and unloading puts the plain layers back.

    The modules must be uncompiled and this worker's own copies. All LoRAs are checked before any is loaded; an
    error while fusing leaves the modules half changed: discard them.
    """
    loras = [(check_lora(lora, unet, text_encoder), scale) for lora, scale in loras]
    with warnings.catch_warnings():
        # PEFT warns on a second adapter and on merging one while another is merged: both are the plan here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Already following adapters were merged")
        _load_and_fuse(unet, text_encoder, loras)


def _load_and_fuse(unet: torch.nn.Module, text_encoder: torch.nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """fuse_loras after its checks: load every adapter, give each its scale, fuse, unload."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as loader
    from diffusers.loaders.lora_base import (
        _remove_text_encoder_monkey_patch,  # what `unload_lora_weights` runs on a pipeline's text encoder
        fuse_text_encoder_lora,
        set_adapters_for_text_encoder,
    )

    adapters = {UNET: [], TEXT_ENCODER: []}  # part -> [(adapter name, lora, scale)]
    for i, (lora, scale) in enumerate(loras):
        name = f"lora_{i}"
        arguments = dict(state_dict=lora.state_dict, network_alphas=None, adapter_name=name, metadata=lora.metadata)
        if any(key.startswith(f"{UNET}.") for key in lora.state_dict):
            loader.load_lora_into_unet(unet=unet, **arguments)
            adapters[UNET].append((name, lora, scale))
        if any(key.startswith(f"{TEXT_ENCODER}.") for key in lora.state_dict):
            loader.load_lora_into_text_encoder(text_encoder=text_encoder, **arguments)
            adapters[TEXT_ENCODER].append((name, lora, scale))

    if adapters[UNET]:
        names, _, scales = zip(*adapters[UNET])
        unet.set_adapters(list(names), weights=list(scales))
        _fuse_one_by_one(adapters[UNET], UNET, unet.fuse_lora)
        unet.unload_lora()
    if adapters[TEXT_ENCODER]:
        names, _, scales = zip(*adapters[TEXT_ENCODER])
        set_adapters_for_text_encoder(list(names), text_encoder, list(scales))
        _fuse_one_by_one(adapters[TEXT_ENCODER], TEXT_ENCODER, functools.partial(fuse_text_encoder_lora, text_encoder))
        _remove_text_encoder_monkey_patch(text_encoder)


def _fitting_metadata(metadata: dict | None, text_encoder: torch.nn.Module) -> dict | None:
    """The file's adapter metadata with `text_model.` dropped from the text encoder's module names where the
    text encoder has none (transformers 5 flattens CLIPTextModel): diffusers drops it from the keys but not from
    the metadata, so a file written under transformers 4 would match no module."""
    if metadata is None or hasattr(text_encoder, "text_model"):
        return metadata

    def strip(name):
        return name.removeprefix("text_model.") if isinstance(name, str) else name

    fitted = dict(metadata)
    for setting in ("target_modules", "rank_pattern", "alpha_pattern"):
        value = metadata.get(f"{TEXT_ENCODER}.{setting}")
        if isinstance(value, dict):
            fitted[f"{TEXT_ENCODER}.{setting}"] = {strip(name): v for name, v in value.items()}
        elif isinstance(value, list):
            fitted[f"{TEXT_ENCODER}.{setting}"] = [strip(name) for name in value]
    return fitted


def _fuse_one_by_one(adapters: list[tuple[str, Lora, float]], part: str, fuse) -> None:
    """Fuses the adapters one at a time (the sum is the same), so the error names a LoRA that breaks the model."""
    for name, lora, scale in adapters:
        try:
            fuse(safe_fusing=True, adapter_names=[name])
        except ValueError as exc:  # PEFT's safe merge found NaN or inf
            raise LoraError(f"{lora.name}: fusing into the {part} at scale {scale} gives non-finite weights "
                            f"({exc})") from None


def merge_finetune(unet: torch.nn.Module, finetune_unet: torch.nn.Module, base_unet: torch.nn.Module,
                   scale: float) -> None:
    """W <- W + scale * (W_finetune - W_base) for every tensor of `unet`, in place: the InstaFlow repo's "hf" mode
    (`load_hf_hub_lora` + `merge_dW_to_unet` in code/rf_lora.py), which adds e.g. dreamshaper-7's difference from
    SD-1.5 to the InstaFlow UNet. (Taking the fine-tune's VAE and text encoder, the rest of that mode, is the
    caller's.)

    Differences from the repo: it walks the fine-tune's keys and loads with strict=False, so tensors of the student
    that the fine-tune lacks pass silently; here the three UNets must have the same tensor names and shapes, and the
    first that differs is named. It computes in the models' dtype (fp16 there); here the difference and the sum are
    in float32, rounded once to the student's dtype (at fp32, the same numbers).
    """
    check_merge(unet, finetune_unet, base_unet)
    target, finetune, base = unet.state_dict(), finetune_unet.state_dict(), base_unet.state_dict()
    with torch.no_grad():
        for name, weight in target.items():
            delta = finetune[name].to(weight.device, torch.float32) - base[name].to(weight.device, torch.float32)
            weight.copy_(weight.float() + scale * delta)


def check_merge(unet: torch.nn.Module, finetune_unet: torch.nn.Module, base_unet: torch.nn.Module) -> None:
    """Raises MergeMismatchError naming the first tensor that the three UNets do not share by name and shape.
    Works on `meta_modules` too, so a driver can run it before any worker starts."""
    target, finetune, base = unet.state_dict(), finetune_unet.state_dict(), base_unet.state_dict()
    for label, other in (("fine-tune", finetune), ("base", base)):
        for name in [*target, *other]:
            if name not in target or name not in other:
                where = "the student's UNet" if name not in target else f"the {label} UNet"
                raise MergeMismatchError(f"UNet tensor {name!r} is missing from {where}")
            if target[name].shape != other[name].shape:
                raise MergeMismatchError(f"UNet tensor {name!r}: shape {tuple(other[name].shape)} in the {label} "
                                         f"UNet, {tuple(target[name].shape)} in the student's")
