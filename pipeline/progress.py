"""Driver-side progress: a bar while the job runs, a summary table at the end (as img2dataset users know), and,
where no terminal shows the bar (`ray job logs`, a log file), a log line at a bounded interval."""

import logging
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.display import safe_line
from pipeline.pool import UnitResult
from pipeline.storage import redact_text

logger = logging.getLogger(__name__)
LOG_EVERY_S = 60.0  # the progress line's interval when no terminal shows the bar


@dataclass
class JobProgress:
    """Counts of this run, from the stats of every unit committed or failed; `skipped` were committed before."""

    total_units: int
    total_samples: int  # output rows: input rows x samples_per_prompt
    samples_per_prompt: int = 1
    skipped_units: int = 0
    skipped_samples: int = 0
    committed_units: int = 0
    samples: int = 0
    successes: int = 0
    failed_samples: int = 0
    truncated: int = 0
    left_null: int = 0  # rows kept with a stage's columns null (a score that failed on them)
    generate_s: float = 0.0
    encode_wait_s: float = 0.0  # the device waited for image encoders: the host is short of cores
    failed_units: list[UnitResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    lost: bool = False  # another job took the output over
    manifest: dict | None = field(default=None, repr=False)  # _job.json once written (the job ran)
    bar: tqdm | None = field(default=None, repr=False)
    logged_at: float | None = field(default=None, repr=False)

    def skip(self, units: list, todo: list) -> None:
        """The units not in `todo` were committed before this run."""
        self.skipped_units = len(units) - len(todo)
        self.skipped_samples = self.total_samples - sum(unit.num_rows for unit in todo) * self.samples_per_prompt

    def start_bar(self, enabled: bool = True) -> None:
        done = self.skipped_samples
        self.bar = tqdm(total=self.total_samples, initial=done, unit="sample", disable=not enabled, smoothing=0.1)
        self._postfix()

    def record(self, result: UnitResult) -> None:
        if result.error is not None:
            self.failed_units.append(result)
            advanced = result.unit.num_rows * self.samples_per_prompt
        else:
            stats = result.stats
            self.committed_units += 1
            self.samples += stats["count"]
            self.successes += stats["successes"]
            self.failed_samples += stats["failed"]
            self.truncated += stats["truncated"]
            self.left_null += stats.get("left_null", 0)  # markers from before the failure policy lack it
            self.generate_s += stats["timings"]["generate_s"]
            self.encode_wait_s += stats["timings"].get("encode_wait_s", 0.0)
            advanced = stats["count"]
        if self.bar is not None:
            self.bar.update(advanced)
            self._postfix()
        self.log_line()

    def log_line(self, every_s: float = LOG_EVERY_S) -> None:
        """Logs where the job is, at most every `every_s` seconds, when no terminal shows the bar."""
        if self.bar is not None and not self.bar.disable and sys.stderr.isatty():
            return
        now = time.monotonic()
        if self.logged_at is not None and now - self.logged_at < every_s:
            return
        self.logged_at = now
        done = self.skipped_samples + self.samples
        rate = self.samples / self.elapsed_s if self.elapsed_s > 0 else 0.0
        eta = f"{(self.total_samples - done) / rate:.0f}s" if rate > 0 else "unknown"
        logger.info("progress: shards %d/%d (%d failed), samples %d/%d, %.2f samples/s, ETA %s",
                    self.skipped_units + self.committed_units, self.total_units, len(self.failed_units), done,
                    self.total_samples, rate, eta)

    def uncommit(self, unit, reason: str) -> None:
        """A unit recorded as committed whose commit did not hold at the end of the run: failed after all."""
        self.committed_units -= 1
        self.failed_units.append(UnitResult(unit, error=reason))

    def _postfix(self) -> None:
        done = self.skipped_units + self.committed_units
        self.bar.set_postfix_str(
            f"shards {done}/{self.total_units}, failed samples {self.failed_samples}, "
            f"failed shards {len(self.failed_units)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def complete(self) -> bool:
        return self.skipped_units + self.committed_units == self.total_units

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def status(self) -> str:
        if self.lost:
            return "lost"
        if self.interrupted:
            return "interrupted"
        return "complete" if self.complete else "incomplete"

    def summary(self) -> dict:
        return {
            "status": self.status,
            "shards_total": self.total_units,
            "shards_committed_before": self.skipped_units,
            "shards_committed_now": self.committed_units,
            "shards_failed": len(self.failed_units),
            "samples_total": self.total_samples,
            "samples_now": self.samples,
            "samples_ok_now": self.successes,
            "samples_failed_now": self.failed_samples,
            "prompts_truncated_now": self.truncated,
            "samples_left_null_now": self.left_null,
            "elapsed_s": round(self.elapsed_s, 3),
            "samples_per_s": round(self.samples / self.elapsed_s, 3) if self.elapsed_s else 0.0,
            # one worker's rate while it holds the device: start-up, reads and uploads excluded
            "worker_generate_samples_per_s": round(self.successes / self.generate_s, 3) if self.generate_s else 0.0,
            # above zero only when image encoding could not keep up: give workers more CPUs (--cpus-per-worker)
            "device_waited_for_encoders_s": round(self.encode_wait_s, 3),
            "failed_shards": [
                {"shard": result.unit.shard, "path": redact_text(result.unit.path),
                 "error": redact_text(result.error)[:2000]}
                for result in self.failed_units
            ],
        }

    def table(self) -> str:
        """The summary as the job prints it (print bypasses the redacting logger): each line redacted, with its
        control characters escaped, and bounded."""
        summary = self.summary()
        rows = [(name, value) for name, value in summary.items() if name != "failed_shards"]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
        for failure in summary["failed_shards"]:
            lines.append(f"FAILED shard {failure['shard']} ({failure['path']}): {failure['error'].splitlines()[0]}")
        return "\n".join(safe_line(line) for line in lines)
