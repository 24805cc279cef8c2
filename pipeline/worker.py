"""The work on one GPU: a Ray actor that loads its models once and turns work units into committed shards.

An actor runs two units at a time (Ray `max_concurrency=2`) but only one holds the device: while unit N is
generated, unit N+1's prompts are read; while N+1 is generated, N's images are encoded and uploaded. So the
device never waits on storage, and at most two units are held in memory.
"""

import logging
import os
import sys
import threading
import time
from dataclasses import asdict

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch, Settings, Student, Teacher
from pipeline.commit import ShardStore
from pipeline.plan import WorkUnit
from pipeline.reader import Sample, read_unit
from pipeline.spec import JobSpec
from pipeline.storage import filesystem
from pipeline.writers import (
    IMAGE_EXTENSIONS,
    encode_image,
    image_parquet_shard,
    metadata_table,
    pairs_parquet_shard,
    webdataset_shard,
)

logger = logging.getLogger(__name__)

# Errors after which the CUDA context is unusable: the process exits so that Ray restarts it clean.
FATAL_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")
MAX_ERRORS_IN_STATS = 20


class ShardWorker:
    """Student and/or teacher on one device, sharing the components they have in common."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.runtime = Runtime.default(spec.dtype, spec.compile)
        cache = ComponentCache(self.runtime)
        size = dict(height=spec.height, width=spec.width)
        self.student = self.teacher = None
        if "images" in spec.tasks:
            self.student = Student(cache.load(spec.model), Settings(spec.steps, spec.guidance_scale, **size))
        if "pairs" in spec.tasks:
            settings = Settings(spec.teacher_steps, spec.teacher_guidance_scale, **size)
            self.teacher = Teacher(cache.load(spec.teacher), spec.teacher_kind, settings)
        self.input_fs, _ = filesystem(spec.prompts, spec.storage_options)
        output_fs, root = filesystem(spec.output, spec.storage_options)
        self.store = ShardStore(output_fs, root)
        self.device_lock = threading.Lock()

    def describe(self) -> dict:
        """Where this worker runs; the driver waits on it to know the models have loaded.

        Ray's placement is added when the worker runs as an actor; the GPU benchmark runs it without Ray.
        """
        where = {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.runtime.device),
        }
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            where["node_id"] = ray.get_runtime_context().get_node_id()
            where["gpu_ids"] = [str(gpu) for gpu in ray.get_gpu_ids()]
        return where

    def process(self, unit: WorkUnit, attempt: int = 1) -> dict:
        try:
            return self._process(unit, attempt)
        except Exception as exc:
            if any(marker in str(exc) for marker in FATAL_DEVICE_ERRORS):
                logger.error("unit %s: fatal device error, restarting this worker: %s", unit.unit_id, exc)
                os._exit(1)
            raise

    def _process(self, unit: WorkUnit, attempt: int) -> dict:
        started_at = time.time()
        clock = time.perf_counter()
        unit_input = read_unit(self.input_fs, unit, self.spec.prompt_column, self.spec.seed)
        read_s = time.perf_counter() - clock
        valid = [sample for sample in unit_input.samples if sample.error is None]

        with self.device_lock:
            clock = time.perf_counter()
            outputs = self._generate(valid)
            generate_s = time.perf_counter() - clock

        clock = time.perf_counter()
        files = self._shard_files(unit, unit_input.samples, unit_input.extra, outputs)
        errors = [sample.error for sample in unit_input.samples if sample.error]
        stats = {
            "shard": unit.shard,
            "unit": asdict(unit),
            "attempt": attempt,
            "count": len(unit_input.samples),
            "successes": len(valid),
            "failed": len(errors),
            "truncated": sum(outputs["truncated"].values()),
            "errors": errors[:MAX_ERRORS_IN_STATS],
            "files": sorted(files),
            "worker": self.describe(),
            "started_at": started_at,
        }
        stats["timings"] = {"read_s": read_s, "generate_s": generate_s, "encode_s": time.perf_counter() - clock}
        self.store.commit(unit.unit_id, files, stats)
        return stats

    def _generate(self, samples: list[Sample]) -> dict[str, dict]:
        """Runs the models batch by batch; results keyed by sample key, copied to the host once per batch."""
        outputs = {"pixels": {}, "noise": {}, "latent": {}, "truncated": {}}
        size = self.spec.batch_size
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            keys = [sample.key for sample in chunk]
            batch = PromptBatch(
                [s.prompt for s in chunk], [s.seed for s in chunk], [s.negative_prompt for s in chunk]
            )
            truncated = [False] * len(chunk)
            if self.student:
                out = self.student.generate(batch)
                outputs["pixels"].update(zip(keys, out.pixels.cpu().numpy()))
                truncated = out.truncated
            if self.teacher:
                pairs = self.teacher.pairs(batch)
                outputs["noise"].update(zip(keys, pairs.noise.float().cpu().numpy()))
                outputs["latent"].update(zip(keys, pairs.latents.float().cpu().numpy()))
                truncated = pairs.truncated
            outputs["truncated"].update(zip(keys, truncated))
        return outputs

    def _rows(self, samples: list[Sample], outputs: dict, model: str, steps: int, guidance_scale: float) -> list[dict]:
        return [
            {
                "key": s.key,
                "prompt": s.prompt,
                "seed": s.seed,
                "status": "failed" if s.error else "ok",
                "error_message": s.error,
                "model": model,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "height": self.spec.height,
                "width": self.spec.width,
                "truncated": outputs["truncated"].get(s.key, False),
                "negative_prompt": s.negative_prompt,
            }
            for s in samples
        ]

    def _shard_files(self, unit: WorkUnit, samples: list[Sample], extra, outputs: dict) -> dict[str, bytes]:
        spec, files = self.spec, {}
        if self.student:
            rows = self._rows(samples, outputs, spec.model, spec.steps, spec.guidance_scale)
            metadata = metadata_table(rows, extra)
            extension = IMAGE_EXTENSIONS[spec.image_format]
            images = {key: encode_image(pixels, spec.image_format) for key, pixels in outputs["pixels"].items()}
            prefix = f"{spec.image_dir}{unit.shard}"
            if spec.output_format == "webdataset":
                shard = webdataset_shard(metadata, images, extension)
                files[f"{prefix}.tar"], files[f"{prefix}.parquet"] = shard["tar"], shard["parquet"]
            else:
                files[f"{prefix}.parquet"] = image_parquet_shard(metadata, images, extension)
        if self.teacher:
            rows = self._rows(samples, outputs, spec.teacher, spec.teacher_steps, spec.teacher_guidance_scale)
            teacher = {
                "model": spec.teacher,
                "kind": spec.teacher_kind,
                "steps": spec.teacher_steps,
                "guidance_scale": spec.teacher_guidance_scale,
            }
            components = self.teacher.components
            factor = components.vae_scale_factor
            shape = (components.unet.config.in_channels, spec.height // factor, spec.width // factor)
            files[f"{spec.pair_dir}{unit.shard}.parquet"] = pairs_parquet_shard(
                metadata_table(rows, extra), outputs["noise"], outputs["latent"], teacher, shape
            )
        return files

