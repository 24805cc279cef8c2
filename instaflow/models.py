"""The student (InstaFlow, 2-Rectified Flow) and the teachers (SD-1.5 with DPM-Solver, 2-RF with Euler steps).

Both take a `PromptBatch`, which encodes its prompts once per text encoder: a student and a teacher sharing
SD-1.5's text encoder (the component cache gives them the same object) pay for one encoding per batch. Both have
`prepare(batch)` for the host work (tokens, noise), so that it can run while the device works on another batch.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from instaflow.loading import Components
from instaflow.sampling import (
    batch_noise,
    check_inputs,
    decode,
    dpm_solver_scheduler,
    dpm_solver_teacher,
    finite_per_sample,
    rectified_flow_euler,
    to_pixels,
    use_guidance,
)
from instaflow.text import Tokens, encode_tokens, tokenize_prompts

TWO_RECTIFIED_FLOW = re.compile(r"2[_-]?rectified|2rf", re.IGNORECASE)
TEACHER_KINDS = ("sd", "rf")
ONE_STEP_DEFAULTS = (1, 0.0)  # InstaFlow: one Euler step, no guidance
TWO_RF_DEFAULTS = (25, 1.5)  # 2-Rectified Flow: 25 Euler steps at guidance 1.5
# Written by training beside model_index.json: what the model is and how to sample it.
MODEL_RECORD = "instaflow_batch.json"


def student_defaults(model: str, record: str | None = None) -> tuple[int, float]:
    """(steps, guidance_scale): from the model's record when it has one (`record`, its text, as a caller read it
    from a store; else the record in a local model folder), else by name: InstaFlow is one step without guidance,
    2-RF models take Euler steps at 1.5."""
    where = f"{model.rstrip('/')}/{MODEL_RECORD}"
    if record is None and Path(where).expanduser().is_file():
        record = Path(where).expanduser().read_text()
    if record is not None:
        return parse_model_record(record, where)
    return TWO_RF_DEFAULTS if TWO_RECTIFIED_FLOW.search(model) else ONE_STEP_DEFAULTS


def parse_model_record(text: str, where: str) -> tuple[int, float]:
    """A model record's (default_steps, default_guidance_scale), checked; errors name `where`."""
    try:
        record = json.loads(text)
        steps, guidance = record["default_steps"], record["default_guidance_scale"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a valid model record ({exc!r})") from None
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: default_steps must be a positive integer, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"{where}: default_guidance_scale must be a number >= 0, got {guidance!r}")
    return steps, float(guidance)


def teacher_defaults(kind: str) -> tuple[int, float]:
    """(steps, guidance_scale): SD-1.5 with DPM-Solver 25 steps at 5.0, a 2-RF teacher 25 Euler steps at 1.5."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    return (25, 5.0) if kind == "sd" else (25, 1.5)


@dataclass
class PromptBatch:
    """One batch of samples; negative prompts of None mean the empty prompt, as in diffusers.

    Host work (tokens, the seed noise) and device work (embeddings, noise on the device) are cached apart, so a
    worker can `prepare` the next batch outside its device lock, and a student and a teacher that share a
    tokenizer and text encoder share the work.
    """

    prompts: list[str]
    seeds: list[int]
    negative_prompts: list[str | None]
    stage_inputs: dict = field(default_factory=dict, repr=False)  # what other stages prepare on the host, by stage
    # what conditions the samplers (instaflow/conditioning.py), put here by the stages that own them
    conditioners: list = field(default_factory=list, repr=False)
    row_inputs: list[dict] = field(default_factory=list, repr=False)  # each row's input columns that stages read
    _tokens: dict = field(default_factory=dict, repr=False)
    _encoded: dict = field(default_factory=dict, repr=False)
    _host_noise: dict = field(default_factory=dict, repr=False)
    _device: dict = field(default_factory=dict, repr=False)  # noise on the device

    def __post_init__(self):
        if not (len(self.prompts) == len(self.seeds) == len(self.negative_prompts)):
            raise ValueError("prompts, seeds and negative_prompts must have the same length")

    def prepare(self, components: Components, height: int, width: int, guidance_scale: float) -> None:
        """The host work a sampler will need, done now: tokens, and the seed noise in page-locked memory."""
        self.tokens(components, negative=False)
        if use_guidance(guidance_scale):
            self.tokens(components, negative=True)
        self.host_noise(components, height, width)

    def tokens(self, components: Components, negative: bool) -> Tokens:
        key = (id(components.tokenizer), negative)
        if key not in self._tokens:
            texts = [text or "" for text in self.negative_prompts] if negative else self.prompts
            pin = components.runtime.device.type == "cuda"
            self._tokens[key] = tokenize_prompts(components.tokenizer, texts, pin_memory=pin)
        return self._tokens[key]

    def encode(self, components: Components, negative: bool = False) -> torch.Tensor:
        """Prompt embeddings on the device, computed once per text encoder."""
        key = (id(components.tokenizer), id(components.text_encoder), negative)
        if key not in self._encoded:
            self._encoded[key] = encode_tokens(components.text_encoder, self.tokens(components, negative))
        return self._encoded[key]

    def truncated(self, components: Components) -> list[bool]:
        return self.tokens(components, negative=False).truncated

    def host_noise(self, components: Components, height: int, width: int) -> torch.Tensor:
        """The seed contract's float32 noise at the model's latent shape (its VAE's channels and scale factor), on
        the host (page-locked when a GPU will copy it)."""
        latent = components.latent
        key = latent.shape(height, width)
        if key not in self._host_noise:
            noise = batch_noise(self.seeds, height, width, latent.channels, latent.scale_factor)
            self._host_noise[key] = noise.pin_memory() if components.runtime.device.type == "cuda" else noise
        return self._host_noise[key]

    def noise(self, components: Components, height: int, width: int) -> torch.Tensor:
        """The noise on the device in the model dtype, made once per batch even when a student and a teacher
        both start from it."""
        runtime = components.runtime
        key = (components.latent.shape(height, width), runtime.dtype, runtime.device)
        if key not in self._device:
            host = self.host_noise(components, height, width)
            self._device[key] = host.to(device=runtime.device, non_blocking=True).to(runtime.dtype)
        return self._device[key]


@dataclass
class Settings:
    """What a sampler was run with; recorded beside every output."""

    steps: int
    guidance_scale: float
    height: int
    width: int

    def check(self, components: Components) -> None:
        check_inputs(self.height, self.width, self.steps, self.guidance_scale, multiple=components.latent.scale_factor)


def _embeddings(components: Components, batch: PromptBatch, guidance_scale: float):
    negative = batch.encode(components, negative=True) if use_guidance(guidance_scale) else None
    return batch.encode(components), negative


@dataclass
class StudentOutput:
    pixels: torch.Tensor  # (N, H, W, 3) uint8, on the device until the caller needs it
    truncated: list[bool]
    finite: torch.Tensor  # (N,) bool on the device: False where the latent or the image holds NaN or inf


class Student:
    """Image generation with InstaFlow (one Euler step) or a 2-RF model (N Euler steps), under the batch's
    conditioners (a ControlNet)."""

    def __init__(self, components: Components, settings: Settings):
        settings.check(components)
        self.components = components
        self.settings = settings

    def prepare(self, batch: PromptBatch) -> None:
        """Host work for `generate`, to run ahead of the device (see PromptBatch.prepare)."""
        s = self.settings
        batch.prepare(self.components, s.height, s.width, s.guidance_scale)

    def sample_latents(self, batch: PromptBatch) -> tuple[torch.Tensor, list[bool]]:
        c, s = self.components, self.settings
        embeds, negative = _embeddings(c, batch, s.guidance_scale)
        noise = batch.noise(c, s.height, s.width)
        latents = rectified_flow_euler(c.unet, noise, embeds, negative, s.steps, s.guidance_scale,
                                       batch.conditioners)
        return latents, batch.truncated(c)

    def generate(self, batch: PromptBatch) -> StudentOutput:
        latents, truncated = self.sample_latents(batch)
        images = decode(self.components.vae, latents)
        return StudentOutput(pixels=to_pixels(images), truncated=truncated, finite=finite_per_sample(latents, images))


@dataclass
class TeacherOutput:
    noise: torch.Tensor  # the noise the teacher started from, in the model dtype
    latents: torch.Tensor  # the teacher's final latent, not decoded
    truncated: list[bool]
    finite: torch.Tensor  # (N,) bool on the device: False where the latent holds NaN or inf


class Teacher:
    """Reflow pairs: noise from the seed contract, and where the teacher's ODE takes it (under the batch's
    conditioners)."""

    def __init__(self, components: Components, kind: str, settings: Settings, scheduler_options: dict | None = None):
        teacher_defaults(kind)  # validates the kind
        settings.check(components)
        self.components = components
        self.kind = kind
        self.settings = settings
        self.scheduler_options = dict(scheduler_options or {})

    def prepare(self, batch: PromptBatch) -> None:
        """Host work for `pairs`, to run ahead of the device (see PromptBatch.prepare)."""
        s = self.settings
        batch.prepare(self.components, s.height, s.width, s.guidance_scale)

    def pairs(self, batch: PromptBatch) -> TeacherOutput:
        c, s = self.components, self.settings
        embeds, negative = _embeddings(c, batch, s.guidance_scale)
        noise = batch.noise(c, s.height, s.width)
        if self.kind == "sd":
            scheduler = dpm_solver_scheduler(c.scheduler_config, **self.scheduler_options)
            latents = dpm_solver_teacher(c.unet, scheduler, noise, embeds, negative, s.steps, s.guidance_scale,
                                         batch.conditioners)
        else:
            latents = rectified_flow_euler(c.unet, noise, embeds, negative, s.steps, s.guidance_scale,
                                           batch.conditioners)
        return TeacherOutput(noise=noise, latents=latents, truncated=batch.truncated(c),
                             finite=finite_per_sample(latents))
