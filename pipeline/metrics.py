"""The job's metrics through ray.util.metrics, so that Ray's own Prometheus endpoint on each node exports them and
Ray's Grafana setup can chart them (infra/grafana/instaflow.json), on a laptop and on KubeRay.

Ray exports each as `ray_<name>`, and counters with `_total`: `instaflow_samples` is scraped as
`ray_instaflow_samples_total`. Every metric is tagged with the job's output (redacted); a worker's also with the
worker (its node and GPUs, or its process on the CPU), and counts by outcome with `status`. No key or prompt is
ever a tag. Outside Ray (the GPU benchmark runs the worker alone) nothing is recorded.
"""

from __future__ import annotations

import threading

from pipeline import storage
from pipeline.storage import redact_text

UNIT_SECONDS_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600]
# Every metric this project exports, as Prometheus names them once Ray has: the Grafana dashboard's queries may
# name only these (tests/test_metrics.py checks both against a scrape).
EXPORTED = (
    "ray_instaflow_samples_total", "ray_instaflow_shards_total", "ray_instaflow_unit_tries_total",
    "ray_instaflow_unit_retries_total", "ray_instaflow_worker_restarts_total", "ray_instaflow_lock_renewals_total",
    "ray_instaflow_lock_takeovers_total", "ray_instaflow_storage_retries_total", "ray_instaflow_units_done",
    "ray_instaflow_units_total", "ray_instaflow_samples_per_second", "ray_instaflow_eta_seconds",
    "ray_instaflow_device_busy_fraction", "ray_instaflow_encode_wait_seconds_total",
    "ray_instaflow_worker_samples_per_second", "ray_instaflow_unit_seconds_bucket", "ray_instaflow_unit_seconds_sum",
    "ray_instaflow_unit_seconds_count",
)

_lock = threading.Lock()
_metrics: dict[str, object] = {}  # one metric object per name, per process


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **options):
    """The process's one `kind` metric of this name (Ray keeps one per name and process)."""
    with _lock:
        if name not in _metrics:
            from ray.util import metrics

            _metrics[name] = getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **options)
        return _metrics[name]


class JobMetrics:
    """The driver's: outcomes of units and samples, tries, restarts, the lock, and the job's progress."""

    def __init__(self, output: str):
        self.enabled = _ray_running()
        self.tags = {"output": redact_text(output)}
        if self.enabled:
            count_storage_retries(output)

    def _count(self, name: str, description: str, value: float = 1.0, **tags) -> None:
        if self.enabled and value > 0:
            _metric("Counter", name, description, ("output", *tags)).inc(value, tags=self.tags | tags)

    def _set(self, name: str, description: str, value: float) -> None:
        if self.enabled:
            _metric("Gauge", name, description, ("output",)).set(value, tags=self.tags)

    def unit_done(self, stats: dict | None, progress) -> None:
        """A unit committed (its marker's stats) or failed for good (None); then the job's progress."""
        if stats is None:
            self._count("instaflow_shards", "shards committed or failed for good", status="failed")
        else:
            self._count("instaflow_shards", "shards committed or failed for good", status="committed")
            self._count("instaflow_samples", "samples made (ok) or failed", stats["successes"], status="ok")
            self._count("instaflow_samples", "samples made (ok) or failed", stats["failed"], status="failed")
        self.progress(progress)

    def progress(self, progress) -> None:
        done = progress.skipped_units + progress.committed_units + len(progress.failed_units)
        rate = progress.samples / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        left = progress.total_samples - progress.skipped_samples - progress.samples
        self._set("instaflow_units_done", "units committed or failed for good, this run and before", done)
        self._set("instaflow_units_total", "units the job has", progress.total_units)
        self._set("instaflow_samples_per_second", "samples per second of this run so far", rate)
        self._set("instaflow_eta_seconds", "seconds left at this run's rate so far (-1: no rate yet)",
                  left / rate if rate > 0 else -1.0)

    def unit_try(self) -> None:
        self._count("instaflow_unit_tries", "tries of units handed to workers")

    def unit_retry(self) -> None:
        self._count("instaflow_unit_retries", "tries that failed or were lost and are tried again")

    def worker_restart(self) -> None:
        self._count("instaflow_worker_restarts", "workers that died or were killed and came back or were replaced")

    def lock_renewed(self) -> None:
        self._count("instaflow_lock_renewals", "renewals of the output lock's lease")

    def lock_taken_over(self) -> None:
        self._count("instaflow_lock_takeovers", "output locks taken over from a job that had stopped renewing")


class WorkerMetrics:
    """A worker's: each unit's duration, how busy it kept the device, how long the device waited for encoders."""

    def __init__(self, output: str, worker: str):
        self.enabled = _ray_running()
        self.tags = {"output": redact_text(output), "worker": worker}
        if self.enabled:
            count_storage_retries(output)

    def unit(self, stats: dict, wall_s: float) -> None:
        if not self.enabled:
            return
        keys = ("output", "worker")
        timings = stats["timings"]
        _metric("Histogram", "instaflow_unit_seconds", "seconds a unit took on its worker, read to commit", keys,
                boundaries=UNIT_SECONDS_BOUNDARIES).observe(wall_s, tags=self.tags)
        busy = timings.get("generate_s", 0.0) / wall_s if wall_s > 0 else 0.0
        _metric("Gauge", "instaflow_device_busy_fraction", "share of the last unit's time spent generating", keys
                ).set(min(busy, 1.0), tags=self.tags)
        if timings.get("encode_wait_s", 0.0) > 0:
            _metric("Counter", "instaflow_encode_wait_seconds", "seconds the device waited for image encoders", keys
                    ).inc(timings["encode_wait_s"], tags=self.tags)
        _metric("Gauge", "instaflow_worker_samples_per_second", "samples per second of the last unit", keys
                ).set(stats["count"] / wall_s if wall_s > 0 else 0.0, tags=self.tags)


def count_storage_retries(output: str) -> None:
    """Counts this process's storage retries (pipeline.storage.with_retries) for the job's output."""
    tags = {"output": redact_text(output)}

    def on_retry() -> None:
        _metric("Counter", "instaflow_storage_retries", "storage requests retried after a transient error",
                ("output",)).inc(1.0, tags=tags)

    storage.retry_listeners[:] = [on_retry]
