"""One validated training spec; its identity decides whether a re-run may resume an output's checkpoints."""

from dataclasses import asdict, dataclass, field

from instaflow.training import LOSSES
from pipeline.storage import normalize_location, normalize_model

DEVICES = ("auto", "gpu", "cpu")
# Settings a resumed run may change: they change speed, how far to train or where, not the trained weights.
# (num_workers and loader_workers set the number of data readers, which orders the data: a resume that changes
# them goes on with a different order, and says so.)
RUN_ONLY_FIELDS = (
    "output", "steps", "micro_batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "device",
    "loader_workers", "cache_text_embeddings", "cpus_per_worker", "max_failures", "lock_lease_s", "storage_options",
    "overwrite", "ray_address",
)


@dataclass
class TrainSpec:
    pairs: str  # a pairs output root or its pairs/ folder
    init: str  # diffusers folder, hub id or fsspec URL: its UNet is trained, the rest frozen
    output: str
    loss: str = "reflow"
    steps: int = 1000
    batch_size: int = 64  # global, over all workers and accumulation
    micro_batch_size: int | None = None  # samples per forward pass on a worker; None: its whole share
    learning_rate: float = 1e-5  # diffusers' SD fine-tuning default
    warmup_steps: int = 500
    weight_decay: float = 1e-2  # AdamW's, as diffusers' training scripts
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = None  # None: all, so straightness can be measured on each
    log_every: int = 10
    seed: int = 0
    num_workers: int | None = None  # None: one per GPU in the cluster, or 1 on the CPU
    device: str = "auto"
    loader_workers: int = 2  # data-loader processes per worker; 0 reads in the training process
    cache_text_embeddings: bool = False
    cpus_per_worker: float | None = None  # None: Ray Train's default (1 CPU)
    max_failures: int = 3  # worker-group restarts Ray Train may make, each from the last checkpoint
    lock_lease_s: float = 120.0  # a lock unchanged for this long, on the reader's clock, is stale
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    ray_address: str | None = None

    def __post_init__(self):
        for name in ("pairs", "output"):
            if isinstance(getattr(self, name), str) and getattr(self, name):
                setattr(self, name, normalize_location(getattr(self, name)))
        if isinstance(self.init, str) and self.init:
            self.init = normalize_model(self.init)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("pairs", "init", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty URL or path, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "loader_workers", "max_failures"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("micro_batch_size", "keep_checkpoints", "num_workers"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.cpus_per_worker is not None and (
                isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, (int, float))
                or not 0 < self.cpus_per_worker < 1e6):
            raise ValueError(f"cpus_per_worker must be a positive number, got {self.cpus_per_worker!r}")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be below 2**63, got {self.seed!r}")
        if not isinstance(self.lock_lease_s, (int, float)) or self.lock_lease_s <= 0:
            raise ValueError(f"lock_lease_s must be a positive number of seconds, got {self.lock_lease_s!r}")
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"storage_options must be a JSON object, got {self.storage_options!r}")

    def identity(self) -> dict:
        """Everything that decides the trained weights, step by step."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY_FIELDS}

    def layout(self, world_size: int) -> "BatchLayout":
        """How a step's global batch splits over workers, forward passes and data readers, or an error naming the
        flags that do not fit."""
        readers_per_worker = max(1, self.loader_workers)
        if self.batch_size % (world_size * readers_per_worker):
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by the {world_size} workers x {readers_per_worker} "
                "data readers each (--loader-workers)"
            )
        local = self.batch_size // world_size
        micro = self.micro_batch_size or local
        if local % micro:
            raise ValueError(f"each worker's {local} samples per step are not divisible by micro_batch_size {micro}")
        return BatchLayout(local, micro, world_size * readers_per_worker, readers_per_worker)


@dataclass(frozen=True)
class BatchLayout:
    """A step's samples on one worker: `local` in all, in forward passes of `micro`, drawn from the worker's
    `readers_per_worker` data readers (of `num_readers` in all), `reader_batch` from each."""

    local: int
    micro: int
    num_readers: int
    readers_per_worker: int

    @property
    def accumulation(self) -> int:
        return self.local // self.micro

    @property
    def reader_batch(self) -> int:
        return self.local // self.readers_per_worker


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
