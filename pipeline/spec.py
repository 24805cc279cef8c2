"""One validated job spec, built from flags; its identity decides whether a re-run may resume an output."""

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field

from instaflow.models import MODEL_RECORD, TEACHER_KINDS, student_defaults, teacher_defaults
from instaflow.sampling import MAX_GUIDANCE_SCALE, MAX_SIDE, MAX_STEPS, check_inputs, check_size
from pipeline.plan import SAMPLE_FIELDS
from pipeline.row_images import DEFAULT_IMAGE_READ_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES, allowed_image_sources
from pipeline.storage import filesystem, get_bytes, normalize_location, normalize_model

TASKS = ("images", "pairs")
OUTPUT_FORMATS = ("webdataset", "parquet")
IMAGE_FORMATS = ("jpeg", "png", "webp")
DECODERS = ("full", "tiny")
TAESD = "madebyollin/taesd"  # TAESD, the tiny decoder of SD-1.5's latents
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the base a fine-tune's difference is taken from
SCORES = ("nsfw", "clip")
SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"
CLIP_MODEL = "openai/clip-vit-large-patch14"
CONTROL_PREPROCESS = ("none", "canny")
ENCODE = "encode"  # the pairs' "teacher" kind of encode jobs: the model's VAE encodes each row's image, no sampler
PAIR_KINDS = (*TEACHER_KINDS, ENCODE)
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
DEVICE_CHOICES = ("auto", "gpu", "cpu")
MAX_SAMPLES_PER_PROMPT = 10_000
# Settings that change speed or where things are, not outputs: a resumed job may change them freely (each shard
# records the speed settings it ran with). Inputs are compared by their fingerprints, models by their sources.
RUN_ONLY_FIELDS = (
    "num_workers", "storage_options", "overwrite", "compile", "ray_address", "max_unit_attempts", "batch_size",
    "cpus_per_worker", "lock_lease_s", "start_timeout_s", "unit_timeout_s", "prompts", "output", "allow_pickle",
    "refiner_offload", "image_read_timeout_s",
)
ROW_IMAGE_FIELDS = ("allow_image_sources", "max_image_bytes")  # which rows' images can be read: outputs
# Where models are named: the job records each by what it is (its source: digest or hub revision), not by name.
MODEL_NAME_FIELDS = ("tiny_decoder", "loras", "merge_finetune", "merge_base", "safety_checker", "clip_model",
                     "controlnet", "refiner")
CONTROLNET_FIELDS = ("controlnet_scale", "control_column", "control_preprocess", "canny_low", "canny_high")
REFINER_FIELDS = ("refiner_strength", "refiner_steps", "refiner_guidance_scale", "refine_size", "aesthetic_score",
                  "negative_aesthetic_score", "keep_unrefined")


@dataclass
class JobSpec:
    prompts: str
    output: str
    tasks: tuple[str, ...] = ("images",)
    # student, for images
    model: str | None = None
    steps: int | None = None  # None: the model's default (InstaFlow 1, 2-RF 25)
    guidance_scale: float | None = None  # None: the model's default (InstaFlow 0, 2-RF 1.5)
    decoder: str = "full"  # "tiny": a tiny decoder in place of the VAE (changes the images: part of the identity)
    tiny_decoder: str = TAESD
    # the student's weights changed, once per worker: LoRA adapters, and a fine-tune's difference from its base
    loras: tuple = ()  # (source, scale) pairs in order, or "SRC[:SCALE]" texts (a .safetensors file)
    merge_finetune: str | None = None  # a model, or "MODEL[:SCALE]"
    merge_scale: float = 1.0
    merge_base: str = SD15
    # per-row scores of the images made (the student's; the teacher's with teacher_images)
    scores: tuple[str, ...] = ()
    safety_checker: str = SAFETY_CHECKER
    clip_model: str = CLIP_MODEL
    # a ControlNet conditioning the student and the teacher on each row's control image
    controlnet: str | None = None
    controlnet_scale: float = 1.0
    control_column: str = "control_image"  # encoded image bytes, or a path/URL (relative: to the prompts file)
    control_preprocess: str = "none"  # "canny": OpenCV's edge map of the image; "none": it is the condition
    canny_low: int = 100
    canny_high: int = 200
    # the SDXL refiner after the student: img2img from its image at refine_size (diffusers' defaults otherwise)
    refiner: str | None = None
    refiner_strength: float = 0.3  # as the InstaFlow demo; strength x steps steps run
    refiner_steps: int = 50
    refiner_guidance_scale: float = 5.0
    refine_size: int = 1024  # the refined image's longer side
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    keep_unrefined: bool = False  # also store the student's image
    refiner_offload: bool = False  # the refiner's modules in host memory, each on the device only while it runs
    # teacher, for pairs
    teacher: str | None = None
    teacher_kind: str = "sd"
    teacher_steps: int | None = None
    teacher_guidance_scale: float | None = None
    teacher_images: bool = False  # the decoded teacher latent as an `image` column of the pairs
    image_column: str = "image"  # encode: the images (a Hugging Face image struct, bytes, or a path/URL)
    # what rows may name as images (encode, --controlnet), beyond the prompts root; and each read's bounds
    allow_image_sources: tuple[str, ...] = ()  # folders and URL prefixes (pipeline/row_images.py)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_read_timeout_s: float = DEFAULT_IMAGE_READ_TIMEOUT_S
    samples_per_prompt: int = 1  # rows per input row: keys {key}-{k}, seeds the row's seed + k or derived
    # sampling shared by both
    seed: int = 0
    height: int = 512
    width: int = 512
    batch_size: int = 32  # the fastest measured on an H200 for both samplers (BENCHMARKS.md)
    device: str = "auto"  # auto: GPUs on a cluster the job joins or a machine with GPUs, else the CPU
    dtype: str | None = None  # None: float16 on GPUs, float32 on the CPU
    # input and output
    prompt_column: str = "prompt"
    rows_per_shard: int = 1000
    output_format: str = "webdataset"
    image_format: str = "jpeg"
    storage_options: dict = field(default_factory=dict)
    # running
    num_workers: int | None = None  # None: one per GPU in the cluster, or one CPU worker without GPUs
    max_unit_attempts: int = 3
    lock_lease_s: float = 120.0  # a lock unchanged for this long, on the reader's clock, is stale
    start_timeout_s: float = 900.0  # no worker able to run for this long ends the job (exit 3)
    unit_timeout_s: float | None = None  # None: ten times the measured time of a unit
    compile: bool | None = None  # None: on with CUDA, off on the CPU
    allow_pickle: bool = False  # load .bin (pickle) weights when a model has no safetensors
    cpus_per_worker: float | None = None  # None: a GPU node's CPUs per GPU; image encoders run on these
    overwrite: bool = False
    ray_address: str | None = None

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
        self.safety_checker, self.clip_model = normalize_model(self.safety_checker), normalize_model(self.clip_model)

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
        """Everything that decides the output bytes. Two specs with equal identities write equal shards.

        Call it on a resolved spec; the job replaces `model` and `teacher` by what was loaded (a hub revision or
        a digest of the files), so another spelling of the same model is the same job.
        """
        if self.device == "auto":
            raise ValueError("identity() needs a resolved spec: the device kind decides the outputs")
        identity = {k: v for k, v in asdict(self).items() if k not in RUN_ONLY_FIELDS}
        if "images" not in self.tasks:
            for name in ("model", "steps", "guidance_scale", "output_format", "decoder"):
                identity.pop(name)
            if not self.teacher_images:  # the pairs' teacher images are encoded in it too
                identity.pop("image_format")
        for name in MODEL_NAME_FIELDS:  # when used, the job records each model by what it is (its source)
            identity.pop(name)
        # Settings a job without them does not have, so that adding them kept the identity of older jobs.
        if self.loras:
            identity["lora_scales"] = [scale for _, scale in self.loras]
        if not self.merge_finetune:
            identity.pop("merge_scale")
        if not self.scores:
            identity.pop("scores")
        if not self.controlnet:
            for name in CONTROLNET_FIELDS:
                identity.pop(name)
        elif self.control_preprocess != "canny":
            identity.pop("canny_low"), identity.pop("canny_high")
        if not self.refiner:
            for name in REFINER_FIELDS:
                identity.pop(name)
        if not self.encodes:
            identity.pop("image_column")
        if not self.reads_row_images:
            for name in ROW_IMAGE_FIELDS:
                identity.pop(name)
        else:
            identity["allow_image_sources"] = list(self.allow_image_sources)
        if "pairs" not in self.tasks:
            for name in ("teacher", "teacher_kind", "teacher_steps", "teacher_guidance_scale", "teacher_images"):
                identity.pop(name)
        identity["tasks"] = list(self.tasks)
        return identity

    @property
    def image_dir(self) -> str:
        """Shard folder for images: the output root, or images/ when pairs are written beside them."""
        return "images/" if len(self.tasks) > 1 else ""

    @property
    def pair_dir(self) -> str:
        return "pairs/" if len(self.tasks) > 1 else ""


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
