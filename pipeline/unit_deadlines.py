"""When a unit's try is overdue, whom a kill charges, and when a killed worker is given up on (for the pool).

A try's deadline is the pool's unit timeout (fixed, or ten times the measured time per row) after the deadline of
the last try ahead of it on its worker, so that deadlines pass in the order the tries wait. A worker that has not
committed a unit since it (re)started gets a warm-up allowance on top: its first batches compile (torch.compile
took 61-77 s on an H200), which is no unit's fault, so that time is neither a reason to kill it nor part of what
is measured. A worker is killed for its oldest overdue try, and only that try is charged: the others were waiting
behind it. A killed worker whose calls have not ended `abandon_after_kill_s` later (a process stuck in
uninterruptible sleep does not die) is given up on: its calls count as lost, and the pool puts a fresh worker in
its place.
"""

import collections
import statistics
from dataclasses import dataclass
from typing import Callable

from pipeline.plan import WorkUnit


@dataclass
class Try:
    """One call of a worker's `process` for a unit."""

    index: int  # the worker
    unit: WorkUnit
    started: float
    deadline: float
    on_cold_worker: bool  # the worker had not committed a unit since it started: this try may hold its warm-up
    killed_at: float | None = None  # when its worker was killed for a deadline (its own or another try's)
    charged: bool = True  # False once its worker was killed for another try's deadline


class UnitDeadlines:
    """Deadlines of the tries in flight; `limits` is the pool's PoolLimits."""

    def __init__(self, limits, clock: Callable[[], float]):
        self.limits, self.clock = limits, clock
        self._seconds_per_row: collections.deque = collections.deque(maxlen=50)
        self._cold: set[int] = set()

    def on_worker_started(self, index: int) -> None:
        """A worker became ready (first start, restart or replacement): its first units include its warm-up."""
        self._cold.add(index)

    def start(self, index: int, unit: WorkUnit, ahead: list[Try]) -> Try:
        """A try handed to worker `index`, behind the tries `ahead` of it there."""
        now, cold = self.clock(), index in self._cold
        after = max([now + (self.limits.warmup_timeout_s if cold else 0.0), *(t.deadline for t in ahead)])
        return Try(index, unit, now, after + self.unit_timeout_s(unit), cold)

    def on_committed(self, attempt: Try) -> None:
        """Its worker is warm now; a try that held no warm-up is measured."""
        self._cold.discard(attempt.index)
        if not attempt.on_cold_worker:
            self._seconds_per_row.append((self.clock() - attempt.started) / max(attempt.unit.num_rows, 1))

    def unit_timeout_s(self, unit: WorkUnit) -> float:
        """A fixed limit if one is set; else ten times the median measured time for a unit of this size."""
        if self.limits.unit_timeout_s is not None:
            return self.limits.unit_timeout_s
        if len(self._seconds_per_row) < self.limits.units_to_measure:
            return self.limits.first_units_timeout_s
        return 60.0 + 10 * statistics.median(self._seconds_per_row) * unit.num_rows

    def overdue(self, in_flight: dict) -> list[tuple[int, Try]]:
        """(worker, its oldest overdue try) for each worker to kill now. Every try on such a worker is marked
        killed, and all but that one uncharged: they were waiting behind it."""
        now = self.clock()
        by_worker = collections.defaultdict(list)
        for attempt in in_flight.values():
            by_worker[attempt.index].append(attempt)
        kills = []
        for index, tries in by_worker.items():
            late = [t for t in tries if now > t.deadline]
            if not late or any(t.killed_at is not None for t in tries):
                continue
            culprit = min(late, key=lambda t: t.started)
            for attempt in tries:
                attempt.killed_at = now
                attempt.charged = attempt is culprit
            kills.append((index, culprit))
        return kills

    def abandoned(self, in_flight: dict) -> dict[int, list]:
        """Worker -> refs of its calls still unanswered `abandon_after_kill_s` after it was killed."""
        now, stuck = self.clock(), collections.defaultdict(list)
        for ref, attempt in in_flight.items():
            if attempt.killed_at is not None and now - attempt.killed_at > self.limits.abandon_after_kill_s:
                stuck[attempt.index].append(ref)
        return dict(stuck)
