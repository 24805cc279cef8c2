"""The actor pool: one worker per GPU across the cluster, pulling work units until none are left.

Fault tolerance is Ray's: workers are restarted by Ray (`max_restarts=-1`) when their process or node dies, and
the units they held go back to the queue for any live worker. A unit that raises `max_unit_attempts` times is
reported failed; the rest of the job goes on. When Ray cannot tell whether a try ran, the unit is handed out
again at once, and the commit protocol (pipeline/commit.py) lets at most one try commit.

Every wait is bounded: a unit that runs past its deadline has its worker restarted; a job where no worker can
run for `start_timeout_s` stops (NoWorkersError, exit 3); a worker that keeps failing to start is given up.
"""

import collections
import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from instaflow.loading import ModelLoadError
from pipeline.lock import OutputLostError
from pipeline.plan import WorkUnit
from pipeline.spec import JobSpec
from pipeline.storage import redact_text, storage_env
from pipeline.worker import ShardWorker

logger = logging.getLogger(__name__)

UNITS_PER_WORKER = 2  # one generating, one being read or written: see pipeline/worker.py
CPU_PER_CPU_WORKER = 1.0
CPU_PER_GPU_FALLBACK = 1.0  # when no GPU node is up yet to say how many CPUs it has per GPU
_requested_bundles: list[dict] = []  # what this process asked the autoscaler for, until its job ends


class NoWorkersError(RuntimeError):
    """No worker could run for the allowed time: no capacity, or workers that keep failing to start (exit 3)."""


@dataclass(frozen=True)
class PoolLimits:
    """How long the pool waits, in one place. None for `unit_timeout_s` means: derived from measured speed."""

    start_timeout_s: float = 900.0  # no worker able to run for this long ends the job
    unit_timeout_s: float | None = None
    first_units_timeout_s: float = 1800.0  # until the pool has timed a few units (model compile, cold caches)
    startup_failures: int = 3  # a worker slot failing to start this often within the window is given up
    startup_window_s: float = 600.0
    units_to_measure: int = 3


def cpus_per_gpu(nodes: list[dict]) -> float | None:
    """The fewest CPUs per GPU on any live GPU node: what each GPU worker can reserve everywhere."""
    ratios = [
        node["Resources"].get("CPU", 0.0) / node["Resources"]["GPU"]
        for node in nodes
        if node.get("Alive") and node["Resources"].get("GPU")
    ]
    return min(ratios) if ratios else None


def worker_options(num_gpus: int, num_cpus: float) -> dict:
    """Ray's restart policy and resources for workers, in one place.

    Ray restarts a worker whose process or node dies, forever; units are not retried by Ray but by the pool,
    which counts the tries. Two concurrent calls per worker overlap I/O with generation (see the worker), and
    the CPUs it reserves run its image encoders. Only non-secret storage settings travel in the runtime
    environment, which Ray displays; credentials come from the nodes or from the spec (see storage_env).
    glibc's mmap threshold is fixed, as a user's own setting wins: by default it grows to the size of each
    batch buffer freed, so those buffers stay in arenas that are never returned and a worker's peak creeps up
    over a long run (BENCHMARKS.md, memory).
    """
    return {
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": UNITS_PER_WORKER,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                     **storage_env()}},
    }


def ray_worker_factory(spec: JobSpec, *worker_args) -> tuple[Callable[[int], object], int]:
    """Makes `ShardWorker` actors for `spec` (resolved: `spec.device` is gpu or cpu).

    GPU workers ask for a GPU each whether or not one is up yet, so an autoscaling cluster adds GPU nodes for
    them (and `request_resources` asks for all of them at once).
    """
    use_gpus = spec.device == "gpu"
    num_gpus_up = int(ray.cluster_resources().get("GPU", 0))
    num_workers = spec.num_workers or (max(num_gpus_up, 1) if use_gpus else 1)
    if spec.cpus_per_worker is None:
        cpus = (cpus_per_gpu(ray.nodes()) or CPU_PER_GPU_FALLBACK) if use_gpus else CPU_PER_CPU_WORKER
        spec = dataclasses.replace(spec, cpus_per_worker=cpus)
    if use_gpus and num_workers > num_gpus_up:
        logger.info("%d GPU workers asked for, %d GPUs up: asking the autoscaler for the rest", num_workers,
                    num_gpus_up)
        from ray.autoscaler.sdk import request_resources

        bundles = [{"GPU": 1, "CPU": spec.cpus_per_worker}] * num_workers
        request_resources(bundles=bundles)
        _requested_bundles[:] = bundles
    actor_class = ray.remote(ShardWorker).options(**worker_options(int(use_gpus), spec.cpus_per_worker))
    return (lambda index: actor_class.remote(spec, *worker_args)), num_workers


def withdraw_resource_request() -> None:
    """Withdraws what ray_worker_factory asked the autoscaler for: a request stands until it is replaced, so a
    long-lived cluster would keep the job's GPU nodes after the job ends. Called once the job has ended, however
    it ended; never raises, so that it hides nothing the job raised."""
    if not _requested_bundles or not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
        _requested_bundles.clear()
    except Exception as exc:  # the cluster gone: its autoscaler has nothing left to keep
        logger.warning("could not withdraw the request for %d GPU workers from the autoscaler: %s",
                       len(_requested_bundles), exc)


@dataclass
class UnitResult:
    unit: WorkUnit
    stats: dict | None = None  # the committed shard's stats
    error: str | None = None  # why the unit failed, after its last try


class ActorPool:
    """Hands units to idle workers and collects every unit's outcome."""

    def __init__(
        self,
        make_worker: Callable[[int], object],
        num_workers: int,
        max_unit_attempts: int = 3,
        limits: PoolLimits = PoolLimits(),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.make_worker = make_worker
        self.num_workers = num_workers
        self.max_unit_attempts = max_unit_attempts
        self.limits = limits
        self.clock = clock
        self.workers: list = []
        self.worker_info: dict[int, dict] = {}  # index -> what the worker reported when it became ready
        self._probes: dict = {}  # ready ref -> worker index, for workers starting or restarting
        self._ready: set[int] = set()
        self._given_up: set[int] = set()
        self._startup_failures: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._last_startup_error = ""
        self._unit_seconds_per_row: collections.deque = collections.deque(maxlen=50)
        self._idle_since = clock()

    def start(self) -> None:
        if not self.workers:
            self.workers = [self.make_worker(i) for i in range(self.num_workers)]
            for index, worker in enumerate(self.workers):
                self._probes[worker.describe.remote()] = index
            self._idle_since = self.clock()

    def wait_until_ready(self, on_idle: Callable[[], None] = lambda: None, poll_s: float = 1.0) -> None:
        """Returns once a worker is ready; raises NoWorkersError after `start_timeout_s` without one."""
        self.start()
        while not self._ready:
            self._check_capacity(in_flight=False)
            done, _ = ray.wait(list(self._probes), num_returns=1, timeout=poll_s)
            if done:
                self._on_probe(done[0])
            else:
                on_idle()

    def run(
        self,
        units: list[WorkUnit],
        on_result: Callable[[UnitResult], None],
        on_idle: Callable[[], None] = lambda: None,
        poll_s: float = 1.0,
    ) -> None:
        """Runs every unit to commit or failure. `on_idle` is called every `poll_s` while waiting (progress,
        heartbeat); an exception it raises, like OutputLostError, stops the pool at once."""
        self.start()
        pending = collections.deque(units)
        attempts = collections.Counter()
        in_flight: dict = {}  # task ref -> (worker index, unit, started, deadline)
        load = collections.Counter()  # worker index -> units in flight
        timed_out: set = set()

        while pending or in_flight:
            for index in sorted(self._ready, key=lambda i: load[i]):
                while pending and load[index] < UNITS_PER_WORKER:
                    unit = pending.popleft()
                    attempts[unit.unit_id] += 1
                    ref = self.workers[index].process.remote(unit, attempts[unit.unit_id])
                    started = self.clock()
                    in_flight[ref] = (index, unit, started, started + self._unit_timeout_s(unit) * (load[index] + 1))
                    load[index] += 1
            self._check_capacity(in_flight=bool(in_flight))
            self._restart_overdue(in_flight, timed_out)
            done, _ = ray.wait([*in_flight, *self._probes], num_returns=1, timeout=poll_s)
            if not done:
                on_idle()
                continue
            ref = done[0]
            if ref in self._probes:
                self._on_probe(ref)
                continue
            index, unit, started, _ = in_flight.pop(ref)
            load[index] -= 1
            try:
                result = UnitResult(unit, stats=ray.get(ref))
            except RayActorError as exc:
                # The worker died with the unit (or Ray cannot tell whether the try ran): the unit goes to
                # whoever is free first; the commit protocol keeps a second try from committing twice.
                reason = f"timed out after {self.clock() - started:.0f}s" if ref in timed_out \
                    else redact_text(str(exc))
                logger.warning("worker %d lost unit %d (%s); unit requeued", index, unit.unit_id, reason)
                if index in self._ready:  # restarting or dead: ask it again before handing it more
                    self._ready.discard(index)
                    self._probes[self.workers[index].describe.remote()] = index
                self._retry_or_fail(unit, attempts, pending, on_result, f"worker lost: {reason}")
                continue
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc  # the worker's own exception, not Ray's wrapper
                if isinstance(cause, OutputLostError):
                    raise OutputLostError(redact_text(str(cause))) from None
                error = redact_text(f"{type(cause).__name__}: {cause}")
                logger.warning("unit %d failed on try %d: %s", unit.unit_id, attempts[unit.unit_id], error)
                self._retry_or_fail(unit, attempts, pending, on_result, error)
                continue
            self._unit_seconds_per_row.append((self.clock() - started) / max(unit.num_rows, 1))
            on_result(result)
            on_idle()

    def _unit_timeout_s(self, unit: WorkUnit) -> float:
        """A fixed limit if one is set; else ten times the median measured time for a unit of this size."""
        if self.limits.unit_timeout_s is not None:
            return self.limits.unit_timeout_s
        if len(self._unit_seconds_per_row) < self.limits.units_to_measure:
            return self.limits.first_units_timeout_s
        return 60.0 + 10 * statistics.median(self._unit_seconds_per_row) * unit.num_rows

    def _restart_overdue(self, in_flight: dict, timed_out: set) -> None:
        """Restarts a worker whose unit ran past its deadline (a hung kernel, a GPU that stopped answering);
        its units come back through the worker-lost path and are retried."""
        now = self.clock()
        for ref, (index, unit, started, deadline) in in_flight.items():
            if now > deadline and ref not in timed_out:
                logger.error("unit %d on worker %d passed its deadline (%.0fs): restarting the worker",
                             unit.unit_id, index, now - started)
                timed_out.update(r for r, entry in in_flight.items() if entry[0] == index)
                ray.kill(self.workers[index], no_restart=False)

    def _check_capacity(self, in_flight: bool) -> None:
        if self._ready or in_flight:
            self._idle_since = self.clock()
            return
        waited = self.clock() - self._idle_since
        if len(self._given_up) == len(self.workers):
            if "ModelLoadError" in self._last_startup_error:  # found by the driver, but its weights do not load
                raise ModelLoadError(self._last_startup_error.split("ModelLoadError: ", 1)[-1])
            raise NoWorkersError(f"every worker failed to start repeatedly; the last error: "
                                 f"{self._last_startup_error}")
        if waited > self.limits.start_timeout_s:
            raise NoWorkersError(
                f"no worker could start in {waited:.0f}s (start timeout {self.limits.start_timeout_s:.0f}s): "
                "the cluster has no room for them (GPUs, CPUs) or they keep failing"
                + (f"; the last start-up error: {self._last_startup_error}" if self._last_startup_error else "")
            )

    def _on_probe(self, ref) -> None:
        index = self._probes.pop(ref)
        try:
            self.worker_info[index] = ray.get(ref)
            self._ready.add(index)
        except ActorUnavailableError:
            self._probes[self.workers[index].describe.remote()] = index  # restarting: ask again
        except RayActorError as exc:
            # Dead for good: its constructor raised, or Ray gave up on it. A fresh worker takes its place,
            # unless this slot keeps failing (a bad node): then it is given up and the others go on.
            if exc.actor_init_failed:
                last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                self._last_startup_error = redact_text(last_line)[:500]  # cut after: a cut secret is not found
                failures = self._startup_failures[index]
                failures.append(self.clock())
                while failures and self.clock() - failures[0] > self.limits.startup_window_s:
                    failures.popleft()
                if len(failures) >= self.limits.startup_failures:
                    logger.error("worker %d failed to start %d times in %.0fs; giving it up: %s", index,
                                 len(failures), self.limits.startup_window_s, self._last_startup_error)
                    self._given_up.add(index)
                    return
            logger.warning("worker %d is dead, replacing it: %s", index, redact_text(str(exc)))
            self.workers[index] = self.make_worker(index)
            self._probes[self.workers[index].describe.remote()] = index

    def _retry_or_fail(self, unit, attempts, pending, on_result, error: str) -> None:
        if attempts[unit.unit_id] < self.max_unit_attempts:
            pending.append(unit)
        else:
            on_result(UnitResult(unit, error=error))

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Kills the workers and waits (bounded) until they are gone, so none commits after this returns."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        deadline = self.clock() + wait_s
        for worker in self.workers:
            try:
                ray.get(worker.describe.remote(), timeout=max(0.1, deadline - self.clock()))
            except Exception:  # RayActorError once it is dead; a timeout if Ray is slow to tell
                pass
        self.workers = []
