"""One validated job spec, built from flags; its identity decides whether a re-run may resume an output."""

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from instaflow.models import MODEL_RECORD, TEACHER_KINDS, student_defaults, teacher_defaults
from instaflow.sampling import MAX_GUIDANCE_SCALE, MAX_SIDE, MAX_STEPS, check_inputs, check_size
from pipeline.plan import SAMPLE_FIELDS
from pipeline.row_images import DEFAULT_IMAGE_READ_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES, allowed_image_sources
from pipeline.settings import MODEL, RUN, declared_settings, setting
from pipeline.stages import STAGES
from pipeline.storage import filesystem, get_bytes, normalize_location, normalize_model

TASKS = ("images", "pairs")
OUTPUT_FORMATS = ("webdataset", "parquet")
IMAGE_FORMATS = ("jpeg", "png", "webp")
DECODERS = ("full", "tiny")
TAESD = "madebyollin/taesd"  # TAESD, the tiny decoder of SD-1.5's latents
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the base a fine-tune's difference is taken from
# The --scores kinds, each declared by the stage that computes it, in one order (a job's scores are kept in it)
SCORES = {kind: help for stage in STAGES for kind, help in stage.scores.items()}
CONTROL_PREPROCESS = ("none", "canny")
ENCODE = "encode"  # the pairs' "teacher" kind of encode jobs: the model's VAE encodes each row's image, no sampler
PAIR_KINDS = (*TEACHER_KINDS, ENCODE)
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
DEVICE_CHOICES = ("auto", "gpu", "cpu")
MAX_SAMPLES_PER_PROMPT = 10_000


def _makes_images(spec) -> bool:
    return "images" in spec.tasks


def _makes_pairs(spec) -> bool:
    return "pairs" in spec.tasks


def _encodes_images(spec) -> bool:  # the student's, or the teacher's decoded into the pairs
    return "images" in spec.tasks or spec.teacher_images


def _merges(spec) -> bool:
    return bool(spec.merge_finetune)


def _scores(spec) -> bool:
    return bool(spec.scores)


def _controls(spec) -> bool:
    return bool(spec.controlnet)


def _canny(spec) -> bool:
    return bool(spec.controlnet) and spec.control_preprocess == "canny"


def _refines(spec) -> bool:
    return bool(spec.refiner)


def _encode_job(spec) -> bool:
    return spec.encodes


def _reads_row_images(spec) -> bool:
    return spec.reads_row_images


def _lora_scales(loras) -> dict:  # the files are models, recorded by what they are; their scales change outputs
    return {"lora_scales": [scale for _, scale in loras]} if loras else {}


def _with_stage_settings(cls):
    """Adds each stage's own settings (`Stage.settings`) to the spec's fields, after its own, so that they are
    declared in the stage's module and derived everywhere else as the spec's are."""
    declared_by: dict[str, str] = {}
    for stage in STAGES:
        for name, declared in stage.settings.items():
            if name in declared_by:
                raise TypeError(f"stages {declared_by[name]} and {stage.name} both declare the setting {name}")
            if name in cls.__annotations__ or hasattr(cls, name):
                raise TypeError(f"stage {stage.name}: its setting {name} is already a JobSpec field or attribute")
            declared_by[name] = stage.name
            cls.__annotations__[name] = Any
            setattr(cls, name, declared)
    return cls


@dataclass
@_with_stage_settings
class JobSpec:
    """A job's settings, each declared once with `setting(...)` (pipeline/settings.py): its flag, its help, and
    whether it changes the outputs (the identity), only speed or place, or names a model."""

    # the job's inputs and outputs
    prompts: str = setting(help="Parquet file, folder or glob, on any fsspec filesystem", effect=RUN, required=True)
    output: str = setting(help="output folder URL (s3://, gs://, file://, a path, ...)", effect=RUN, required=True)
    tasks: tuple[str, ...] = setting(("images",), help="what the job writes: images, pairs or both", common=False)
    prompt_column: str = setting("prompt", help="column holding the prompt text")
    seed: int = setting(0, help="job seed; per-sample seeds derive from it and the key", type=int)
    samples_per_prompt: int = setting(1, help="K samples per input row (images per prompt, pairs per prompt or "
                                      "image), keyed {key}-{k}, seeded with the row's seed + k or derived from the "
                                      "job seed and that key", metavar="K")
    height: int = setting(512, help="image height, a multiple of 8 and of each model's VAE scale factor", type=int)
    width: int = setting(512, help="image width, a multiple of 8 and of each model's VAE scale factor", type=int)
    batch_size: int = setting(32, help="samples per forward pass", effect=RUN, type=int)  # the fastest on an H200
    rows_per_shard: int = setting(1000, help="target input rows per work unit and shard (a shard holds "
                                  "--samples-per-prompt times as many output rows)", type=int)
    output_format: str = setting("webdataset", help="image shards: webdataset tars, or Hugging Face image Parquet",
                                 used=_makes_images, flag="--format", choices=OUTPUT_FORMATS)
    image_format: str = setting("jpeg", help="image encoding", used=_encodes_images, choices=IMAGE_FORMATS)
    # the student, for images
    model: str | None = setting(None, help="the student: local diffusers folder, hub id or fsspec URL",
                                effect=MODEL, common=False)
    steps: int | None = setting(None, help="the student's Euler steps (None: 1 for InstaFlow, 25 for 2-RF)",
                                used=_makes_images, common=False)
    guidance_scale: float | None = setting(None, help="the student's guidance (None: 0 for InstaFlow, 1.5 for 2-RF)",
                                           used=_makes_images, common=False)
    decoder: str = setting("full", help="tiny: decode images with a tiny decoder (TAESD), far faster, lower quality",
                           used=_makes_images, choices=DECODERS)
    tiny_decoder: str = setting(TAESD, help="the tiny decoder for --decoder tiny: hub id, folder or URL of a "
                                "diffusers AutoencoderTiny", effect=MODEL)
    # the student's weights changed, once per worker: LoRA adapters, and a fine-tune's difference from its base
    loras: tuple = setting((), help="fuse a LoRA into the student (repeatable, in order): a .safetensors file (path, "
                           "URL or HUB_ID/FILE), diffusers or kohya format; SCALE default 1.0", effect=MODEL,
                           recorded=_lora_scales, flag="--lora", repeated=True, metavar="SRC[:SCALE]")
    merge_finetune: str | None = setting(None, help="add SCALE x (this fine-tune's UNet - --merge-base's) to the "
                                         "student's UNet and take its VAE and text encoder (InstaFlow's 'hf' LoRA "
                                         "mode); SCALE default 1.0", effect=MODEL, scaled=True,
                                         metavar="MODEL[:SCALE]")
    merge_scale: float = setting(1.0, help="the fine-tune's scale, from --merge-finetune MODEL[:SCALE]", used=_merges,
                                 common=False)
    merge_base: str = setting(SD15, help="the model --merge-finetune was fine-tuned from", effect=MODEL)
    # per-row scores of the images made (the student's; the teacher's with teacher_images)
    scores: tuple[str, ...] = setting((), help="per-row scores of the images made, comma-separated: " + "; ".join(
        f"{kind} ({help})" for kind, help in SCORES.items()), used=_scores, metavar=",".join(SCORES), flag_default="")
    # a ControlNet conditioning the student and the teacher on each row's control image
    controlnet: str | None = setting(None, help="condition the student and the teacher on each row's control image "
                                     "with this diffusers ControlNetModel (hub id, folder or fsspec URL)",
                                     effect=MODEL, metavar="MODEL")
    controlnet_scale: float = setting(1.0, help="scale of the ControlNet's residuals", used=_controls, type=float)
    control_column: str = setting("control_image", help="column of control images: encoded image bytes, or a path "
                                  "or URL (relative: to the prompts file's folder)", used=_controls)
    control_preprocess: str = setting("none", help="canny: OpenCV's Canny edges of each image; none: the column "
                                      "holds the condition", used=_controls, choices=CONTROL_PREPROCESS)
    canny_low: int = setting(100, help="Canny's lower threshold", used=_canny, type=int)
    canny_high: int = setting(200, help="Canny's upper threshold", used=_canny, type=int)
    # what rows may name as images (encode, --controlnet), beyond the prompts root; and each read's bounds
    allow_image_sources: tuple[str, ...] = setting(
        (), help="let rows name images below this folder (/data/images/) or URL prefix (https://, https://host/, "
        "s3://bucket/prefix/) as well as inside the prompts root (repeatable; encode and --controlnet); other stores "
        "get no storage options", used=_reads_row_images, flag="--allow-image-source", repeated=True,
        metavar="PREFIX")
    max_image_bytes: int = setting(DEFAULT_MAX_IMAGE_BYTES, help="bytes read at most per row's image; a larger one "
                                   "fails its row", used=_reads_row_images, type=int)
    image_read_timeout_s: float = setting(DEFAULT_IMAGE_READ_TIMEOUT_S, help="seconds one row's image may take to "
                                          "read (and each request to answer)", effect=RUN,
                                          flag="--image-read-timeout", type=float)
    # the SDXL refiner after the student: img2img from its image at refine_size (diffusers' defaults otherwise)
    refiner: str | None = setting(None, help="refine the student's images with this SDXL refiner pipeline (hub id "
                                  "such as stabilityai/stable-diffusion-xl-refiner-1.0, folder or fsspec URL)",
                                  effect=MODEL, metavar="MODEL")
    refiner_strength: float = setting(0.3, help="img2img strength of the refiner", used=_refines, type=float)
    refiner_steps: int = setting(50, help="refiner scheduler steps, of which strength x steps run", used=_refines,
                                 type=int)
    refiner_guidance_scale: float = setting(5.0, help="the refiner's guidance scale", used=_refines, type=float)
    refine_size: int = setting(1024, help="the refined image's longer side; the student's image is resized to it "
                               "first", used=_refines, type=int)
    aesthetic_score: float = setting(6.0, help="the refiner's aesthetic score", used=_refines, type=float)
    negative_aesthetic_score: float = setting(2.5, help="the refiner's negative aesthetic score", used=_refines,
                                              type=float)
    refiner_offload: bool = setting(False, help="keep the refiner in host memory and move each of its models to the "
                                    "GPU only while it runs (for GPUs too small for the student and the refiner "
                                    "together; slower)", effect=RUN, action="store_true")
    keep_unrefined: bool = setting(False, help="also store the student's image ({key}.unrefined.EXT in tars, "
                                   "unrefined_image in Parquet)", used=_refines, action="store_true")
    # the teacher, for pairs
    teacher: str | None = setting(None, help="the teacher: local diffusers folder, hub id or fsspec URL",
                                  effect=MODEL, common=False)
    teacher_kind: str = setting("sd", help="sd: SD-1.5 with DPM-Solver; rf: a rectified-flow model with Euler "
                                "steps; encode: the model's VAE encodes each row's image", used=_makes_pairs,
                                common=False)
    teacher_steps: int | None = setting(None, help="the teacher's steps (None: 25; 0 for encode)", used=_makes_pairs,
                                        common=False)
    teacher_guidance_scale: float | None = setting(None, help="the teacher's guidance (None: 5.0 sd, 1.5 rf)",
                                                   used=_makes_pairs, common=False)
    teacher_images: bool = setting(False, help="the decoded teacher latent as an `image` column of the pairs",
                                   used=_makes_pairs, common=False)
    image_column: str = setting("image", help="encode: the column of images (a Hugging Face image struct, bytes, or "
                                "a path/URL)", used=_encode_job, common=False)
    # running
    device: str = setting("auto", help="auto: GPUs on a cluster the job joins or a machine with a GPU, else the CPU",
                          choices=DEVICE_CHOICES)
    dtype: str | None = setting(None, help="default: fp16 on GPUs, fp32 on CPU", choices=DTYPE_CHOICES)
    compile: bool | None = setting(None, help="torch.compile the UNet and the VAE decoder (default: on with CUDA, off "
                                   "on the CPU)", effect=RUN, action=argparse.BooleanOptionalAction)
    cpus_per_worker: float | None = setting(None, help="CPUs reserved per worker, one image encoder each (default: a "
                                            "GPU node's CPUs per GPU)", effect=RUN, type=float)
    num_workers: int | None = setting(None, help="default: one per GPU in the cluster (1 without GPUs)", effect=RUN,
                                      type=int)
    max_unit_attempts: int = setting(3, help="tries per shard before it counts as failed", effect=RUN, type=int)
    start_timeout_s: float = setting(900.0, help="seconds without any worker able to run before the job stops "
                                     "(exit 3)", effect=RUN, flag="--start-timeout", type=float)
    unit_timeout_s: float | None = setting(None, help="seconds one unit may run before its worker is restarted "
                                           "(default: 10x the measured)", effect=RUN, flag="--unit-timeout",
                                           type=float)
    lock_lease_s: float = setting(120.0, help="seconds after which an output lock nobody renews is taken over",
                                  effect=RUN, flag="--lock-lease", type=float)
    allow_pickle: bool = setting(False, help="load .bin (pickle) weights of a model without safetensors; pickles can "
                                 "run code", effect=RUN, action="store_true")
    storage_options: dict = setting(help="JSON passed to fsspec, or @FILE to read it from a file on the machine that "
                                    "runs the driver (for submit: the cluster's)", effect=RUN, factory=dict)
    overwrite: bool = setting(False, help="delete this tool's outputs there and start over", effect=RUN,
                              action="store_true")
    ray_address: str | None = setting(None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)",
                                      effect=RUN)

    def __post_init__(self):
        self.prompts, self.output = normalize_location(self.prompts), normalize_location(self.output)
        self.model = normalize_model(self.model) if self.model else self.model
        self.teacher = normalize_model(self.teacher) if self.teacher else self.teacher
        self.tasks = tuple(self.tasks)
        if not self.tasks or any(task not in TASKS for task in self.tasks):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if "images" in self.tasks:
            if not self.model:
                raise ValueError("images need a student --model")
            record = model_record(self.model, self.storage_options)
            default_steps, default_guidance = student_defaults(self.model, record)
            self.steps = default_steps if self.steps is None else self.steps
            self.guidance_scale = default_guidance if self.guidance_scale is None else float(self.guidance_scale)
            check_inputs(self.height, self.width, self.steps, self.guidance_scale)
        if "pairs" in self.tasks:
            if not self.teacher:
                raise ValueError("pairs need a --teacher model")
            if self.teacher_kind not in PAIR_KINDS:
                raise ValueError(f"teacher kind must be one of {PAIR_KINDS}, got {self.teacher_kind!r}")
            if self.encodes:
                self._check_encode()
            else:
                default_steps, default_guidance = teacher_defaults(self.teacher_kind)
                self.teacher_steps = default_steps if self.teacher_steps is None else self.teacher_steps
                if self.teacher_guidance_scale is None:
                    self.teacher_guidance_scale = default_guidance
                check_inputs(self.height, self.width, self.teacher_steps, float(self.teacher_guidance_scale))
        self._check_adapters()
        self._check_scores()
        for stage in STAGES:
            stage.check_settings(self)
        self._check_controlnet()
        self._check_refiner()
        self._check_row_images()
        self._check_choice("output_format", OUTPUT_FORMATS)
        self._check_choice("decoder", DECODERS)
        self.tiny_decoder = normalize_model(self.tiny_decoder)
        self._check_choice("image_format", IMAGE_FORMATS)
        if self.dtype is not None:
            self._check_choice("dtype", DTYPE_CHOICES)
        self._check_choice("device", DEVICE_CHOICES)
        for name in ("lock_lease_s", "start_timeout_s", "unit_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.teacher_images and "pairs" not in self.tasks:
            raise ValueError("teacher_images needs pairs (a --teacher)")
        for name in ("batch_size", "rows_per_shard", "max_unit_attempts", "samples_per_prompt"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.samples_per_prompt > MAX_SAMPLES_PER_PROMPT:  # a unit holds rows x K samples at once
            raise ValueError(f"samples_per_prompt must be at most {MAX_SAMPLES_PER_PROMPT}, got "
                             f"{self.samples_per_prompt!r}")
        if self.cpus_per_worker is not None and not (
            isinstance(self.cpus_per_worker, (int, float)) and self.cpus_per_worker > 0
        ):
            raise ValueError(f"cpus_per_worker must be a positive number, got {self.cpus_per_worker!r}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer between 0 and 2**63-1, got {self.seed!r}")
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options must be a JSON object, got {self.storage_options!r}")

    @property
    def encodes(self) -> bool:
        """An encode job: pairs of each row's seed noise and its image's latent, with no sampler."""
        return "pairs" in self.tasks and self.teacher_kind == ENCODE

    def _check_encode(self) -> None:
        """No sampler runs, so the steps and guidance recorded are 0; the images come from `image_column`."""
        if self.teacher_steps not in (None, 0) or self.teacher_guidance_scale not in (None, 0):
            raise ValueError("an encode job runs no sampler: it takes no teacher steps or guidance scale")
        self.teacher_steps, self.teacher_guidance_scale = 0, 0.0
        check_size(self.height, self.width)
        if "images" in self.tasks or self.teacher_images or self.controlnet:
            raise ValueError("an encode job writes the latents of its input images: no student, --teacher-images "
                             "or --controlnet")
        if not isinstance(self.image_column, str) or not self.image_column:
            raise ValueError(f"image_column must be a column name, got {self.image_column!r}")
        if self.image_column in (self.prompt_column, *SAMPLE_FIELDS):
            raise ValueError(f"--image-column {self.image_column!r} is read as the prompt or a sample field; name "
                             "the column of images")

    def _check_adapters(self) -> None:
        """LoRAs as (source, scale) pairs of .safetensors files; the fine-tune split from its scale."""
        if isinstance(self.loras, str):
            raise ValueError(f"loras must be a list of SRC[:SCALE], got {self.loras!r}")
        self.loras = tuple(split_scale(lora, "--lora") if isinstance(lora, str) else tuple(lora)
                           for lora in self.loras)
        for source, scale in self.loras:
            if not source.endswith(".safetensors"):
                raise ValueError(f"--lora {source!r}: LoRA files must be .safetensors (pickle files can run code "
                                 "when loaded)")
            _check_scale(scale, f"--lora {source!r}")
        self.loras = tuple((normalize_model(source), float(scale)) for source, scale in self.loras)
        if self.merge_finetune:
            self.merge_finetune, scale = split_scale(self.merge_finetune, "--merge-finetune", default=None)
            self.merge_scale = self.merge_scale if scale is None else scale
            _check_scale(self.merge_scale, f"--merge-finetune {self.merge_finetune!r}")
            self.merge_scale = float(self.merge_scale)
            self.merge_finetune = normalize_model(self.merge_finetune)
        self.merge_base = normalize_model(self.merge_base)
        if (self.loras or self.merge_finetune) and "images" not in self.tasks:
            raise ValueError("--lora and --merge-finetune change the student: they need a student --model")

    def _check_scores(self) -> None:
        scores = self.scores.split(",") if isinstance(self.scores, str) else list(self.scores)
        scores = [score.strip() for score in scores if score.strip()]
        unknown = [score for score in scores if score not in SCORES]
        if unknown or len(set(scores)) != len(scores):
            raise ValueError(f"scores must be a comma-separated subset of {', '.join(SCORES)} (each once), got "
                             f"{','.join(scores)!r}")
        self.scores = tuple(score for score in SCORES if score in scores)  # one order: the same job, however named
        if self.scores and "images" not in self.tasks and not self.teacher_images:
            raise ValueError("--scores scores images: they need a student --model, or --teacher-images")

    def _check_controlnet(self) -> None:
        self.controlnet = normalize_model(self.controlnet) if self.controlnet else None
        _check_scale(self.controlnet_scale, "--controlnet-scale")
        self.controlnet_scale = float(self.controlnet_scale)
        self._check_choice("control_preprocess", CONTROL_PREPROCESS)
        if not isinstance(self.control_column, str) or not self.control_column:
            raise ValueError(f"control_column must be a column name, got {self.control_column!r}")
        if self.controlnet and self.control_column in (self.prompt_column, *SAMPLE_FIELDS):
            raise ValueError(f"--control-column {self.control_column!r} is read as the prompt or a sample field; "
                             "name the column of control images")
        for name in ("canny_low", "canny_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
                raise ValueError(f"{name} must be an integer between 0 and 10000, got {value!r}")
        if self.canny_low > self.canny_high:
            raise ValueError(f"canny_low ({self.canny_low}) must not be above canny_high ({self.canny_high})")

    @property
    def reads_row_images(self) -> bool:
        """Whether rows name images the job reads: an encode job's, a ControlNet's control images."""
        return self.encodes or bool(self.controlnet)

    def _check_row_images(self) -> None:
        self.allow_image_sources = allowed_image_sources(self.allow_image_sources)
        if self.allow_image_sources and not self.reads_row_images:
            raise ValueError("--allow-image-source allows images that rows name: it needs an encode job or "
                             "--controlnet")
        if isinstance(self.max_image_bytes, bool) or not isinstance(self.max_image_bytes, int) or \
                self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be a positive integer, got {self.max_image_bytes!r}")
        if isinstance(self.image_read_timeout_s, bool) or not isinstance(self.image_read_timeout_s, (int, float)) \
                or not self.image_read_timeout_s > 0:
            raise ValueError(f"image_read_timeout_s must be a positive number of seconds, got "
                             f"{self.image_read_timeout_s!r}")

    def _check_refiner(self) -> None:
        self.refiner = normalize_model(self.refiner) if self.refiner else None
        if self.refiner and "images" not in self.tasks:
            raise ValueError("--refiner refines the student's images: it needs a student --model")
        if self.refiner_offload and not self.refiner:
            raise ValueError("--refiner-offload keeps a refiner in host memory: it needs --refiner")
        if self.keep_unrefined and not self.refiner:
            raise ValueError("--keep-unrefined keeps the student's image beside the refined one: it needs --refiner")
        for name in ("refiner_strength", "refiner_guidance_scale", "aesthetic_score", "negative_aesthetic_score"):
            _check_scale(getattr(self, name), f"--{name.replace('_', '-')}")
            setattr(self, name, float(getattr(self, name)))
        if not 0 < self.refiner_strength <= 1:
            raise ValueError(f"--refiner-strength must be in (0, 1], got {self.refiner_strength!r}")
        if isinstance(self.refiner_steps, bool) or not isinstance(self.refiner_steps, int) or not \
                1 <= int(self.refiner_steps * self.refiner_strength) <= self.refiner_steps <= MAX_STEPS:
            raise ValueError(f"--refiner-steps ({self.refiner_steps!r}) x --refiner-strength "
                             f"({self.refiner_strength}) must run at least one of at most {MAX_STEPS} steps")
        if not 0 <= self.refiner_guidance_scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"--refiner-guidance-scale must be between 0 and {MAX_GUIDANCE_SCALE}, got "
                             f"{self.refiner_guidance_scale!r}")
        if isinstance(self.refine_size, bool) or not isinstance(self.refine_size, int) or self.refine_size % 8 or \
                not 8 <= self.refine_size <= MAX_SIDE:
            raise ValueError(f"--refine-size must be a multiple of 8 between 8 and {MAX_SIDE}, got "
                             f"{self.refine_size!r}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def resolve(self, has_gpus: bool) -> "JobSpec":
        """This spec with its device kind and dtype decided (auto: GPUs where there are some), as the driver
        decides them before any worker starts: fp16 on GPUs and fp32 on the CPU unless --dtype says."""
        device = ("gpu" if has_gpus else "cpu") if self.device == "auto" else self.device
        return dataclasses.replace(self, device=device, dtype=self.dtype or ("float16" if device == "gpu" else "float32"))

    def identity(self) -> dict:
        """Everything that decides the output bytes: each OUTPUT setting the job uses (pipeline/settings.py). Two
        specs with equal identities write equal shards.

        Call it on a resolved spec; the job adds each model as what was loaded (a hub revision or a digest of the
        files, pipeline/model_source.py), so another spelling of the same model is the same job.
        """
        if self.device == "auto":
            raise ValueError("identity() needs a resolved spec: the device kind decides the outputs")
        identity = {}
        for name, declared in SETTINGS.items():
            identity |= declared.identity_entries(name, self)
        return json.loads(json.dumps(identity))  # as the manifest stores it: tuples are lists

    @property
    def image_dir(self) -> str:
        """Shard folder for images: the output root, or images/ when pairs are written beside them."""
        return "images/" if len(self.tasks) > 1 else ""

    @property
    def pair_dir(self) -> str:
        return "pairs/" if len(self.tasks) > 1 else ""


SETTINGS = declared_settings(JobSpec)  # every field's declaration, by name, in field order


def split_scale(text: str, what: str, default: float | None = 1.0) -> tuple[str, float | None]:
    """"SRC[:SCALE]" -> (SRC, SCALE): a last ":NUMBER" is the scale, unless a local path has the whole text as its
    name (a URL's "s3:" is no number); without one, `default`."""
    source, colon, tail = text.rpartition(":")
    if not colon or os.path.exists(os.path.expanduser(text)):
        return text, default
    try:
        scale = float(tail)
    except ValueError:
        return text, default
    if not source:
        raise ValueError(f"{what} {text!r}: no file or model before the scale")
    return source, scale


def _check_scale(scale, what: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what}: the scale must be a finite number, got {scale!r}")


def model_record(model: str, storage_options: dict) -> str | None:
    """The record of a model at an fsspec URL (a trained model says what it is), or None; local folders are read
    by instaflow.models itself."""
    if "://" not in model:
        return None
    fs, path = filesystem(model, storage_options)
    try:
        return get_bytes(fs, f"{path.rstrip('/')}/{MODEL_RECORD}").decode()
    except FileNotFoundError:
        return None
