"""The actor pool: one worker per GPU across the cluster, pulling work units until none are left.

Fault tolerance is Ray's: workers are restarted by Ray (`max_restarts=-1`) when their process or node dies, and
the units they held go back to the queue for any live worker. A unit that raises `max_unit_attempts` times is
reported failed; the rest of the job goes on. When Ray cannot tell whether a try ran, the unit is handed out
again at once, and the commit protocol (pipeline/commit.py) lets at most one try commit.

Every wait is bounded: a unit that runs past its deadline has its worker restarted, and a killed worker whose
calls never end is replaced (pipeline/unit_deadlines.py); a job where no worker can run for `start_timeout_s`
stops (NoWorkersError, exit 3); a worker that keeps failing to start is given up. A unit whose try fails in
generation as a whole (GenerationError) is retried on another worker; when the first units all fail so, the job
stops (SystematicFailureError) instead of running every unit into the same error.
"""

import collections
import dataclasses
import logging
import os
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
from pipeline.unit_deadlines import Try, UnitDeadlines
from pipeline.worker import GenerationError, ShardWorker

logger = logging.getLogger(__name__)

UNITS_PER_WORKER = 2  # one generating, one being read or written: see pipeline/worker.py
CPU_PER_CPU_WORKER = 1.0
CPU_PER_GPU_FALLBACK = 1.0  # when no GPU node is up yet to say how many CPUs it has per GPU
_requested_bundles: list[dict] = []  # what this process asked the autoscaler for, until its job ends


class NoWorkersError(RuntimeError):
    """No worker could run for the allowed time: no capacity, or workers that keep failing to start (exit 3)."""


class SystematicFailureError(RuntimeError):
    """The first units to finish all failed every try in generation and none committed: the models or the
    devices fail, not the rows, so the job stops rather than run every unit into the same error (exit 1)."""


@dataclass(frozen=True)
class PoolLimits:
    """How long the pool waits, in one place. None for `unit_timeout_s` means: derived from measured speed."""

    start_timeout_s: float = 900.0  # no worker able to run for this long ends the job
    unit_timeout_s: float | None = None
    first_units_timeout_s: float = 1800.0  # until the pool has timed a few units (model compile, cold caches)
    warmup_timeout_s: float = 600.0  # more for the units of a worker that has not committed one since it started
    abandon_after_kill_s: float = 60.0  # a killed worker whose calls have not ended by then is replaced
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
    """
    return {
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": UNITS_PER_WORKER,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": {**host_settings(num_gpus), **storage_env()}},
    }


def host_settings(num_gpus: int) -> dict[str, str]:
    """The workers' malloc setting; the user's own (MALLOC_MMAP_THRESHOLD_ in the driver's environment) wins.

    GPU workers fix glibc's mmap threshold at 1 MB: by default it grows to the size of each batch buffer freed,
    so those buffers stay in arenas that are never returned and a worker's peak creeps up over a long run
    (tests/bench/README.md, memory). A CPU-device worker keeps glibc's default, as any process running a model on the
    CPU does: fixed at 1 MB, every intermediate tensor of the model above it is a fresh mapping, page-faulted
    and unmapped on every batch (tests/bench/README.md, against a plain loop).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return {"MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"]}
    return {"MALLOC_MMAP_THRESHOLD_": "1048576"} if num_gpus else {}


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
    it ended; never raises, so that it hides nothing the job raised. Ray keeps one request per cluster (a key of
    the GCS, or the v2 autoscaler's cluster request), not per job, with no way to withdraw a part of it: this also
    clears another job's request on the same cluster, whose pending workers then still ask for their GPUs one by
    one (jobs/README.md says so)."""
    if not _requested_bundles or not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
        _requested_bundles.clear()
    except Exception as exc:  # the cluster gone: its autoscaler has nothing left to keep
        logger.warning("could not withdraw the request for %d GPU workers from the autoscaler: %s",
                       len(_requested_bundles), exc)


class PoolEvents:
    """What the pool tells whoever watches it (pipeline.metrics.JobMetrics): nothing, by default."""

    def unit_try(self) -> None:
        pass

    def unit_retry(self) -> None:
        pass

    def worker_restart(self) -> None:
        pass


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
        self.deadlines = UnitDeadlines(limits, clock)
        self._idle_since = clock()
        self.events = PoolEvents()  # the job's metrics replace it

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
        heartbeat); an exception it raises, like OutputLostError, stops the pool at once. Raises
        SystematicFailureError once `min(workers + 1, units)` units have failed every try in generation and none
        has committed: more units than workers (each retried on other workers), so no one bad device explains it."""
        self.start()
        pending = collections.deque(units)
        charged = collections.Counter()  # unit id -> tries that count against max_unit_attempts
        failed_on = collections.defaultdict(set)  # unit id -> workers on which a try of it raised
        in_flight: dict = {}  # task ref -> Try
        systematic: list[str] = []  # errors of the units that failed for good in generation
        committed = False
        stop_after = min(self.num_workers + 1, len(units))

        def lost(attempt: Try, reason: str) -> None:
            """A try whose worker died or was given up on: charged, unless it waited behind a try that hung."""
            if not attempt.charged:
                logger.warning("worker %d lost unit %d with the try it waited behind; requeued, no try charged",
                               attempt.index, attempt.unit.unit_id)
                charged[attempt.unit.unit_id] -= 1
                pending.appendleft(attempt.unit)
                self.events.unit_retry()
                return
            logger.warning("worker %d lost unit %d (%s); unit requeued", attempt.index, attempt.unit.unit_id, reason)
            self._retry_or_fail(attempt.unit, charged, pending, on_result, f"worker lost: {reason}")

        while pending or in_flight:
            load = collections.Counter(attempt.index for attempt in in_flight.values())
            killed = {attempt.index for attempt in in_flight.values() if attempt.killed_at is not None}
            for index in sorted(self._ready - killed, key=lambda i: load[i]):
                while load[index] < UNITS_PER_WORKER and (unit := self._next_unit(pending, index, failed_on)):
                    charged[unit.unit_id] += 1
                    ref = self.workers[index].process.remote(unit, charged[unit.unit_id])
                    self.events.unit_try()
                    ahead = [attempt for attempt in in_flight.values() if attempt.index == index]
                    in_flight[ref] = self.deadlines.start(index, unit, ahead)
                    load[index] += 1
            self._check_capacity(in_flight=bool(in_flight))
            for index, culprit in self.deadlines.overdue(in_flight):
                logger.error("unit %d on worker %d passed its deadline (%.0fs): restarting the worker",
                             culprit.unit.unit_id, index, self.clock() - culprit.started)
                ray.kill(self.workers[index], no_restart=False)
            for index, refs in self.deadlines.abandoned(in_flight).items():
                logger.error("worker %d did not end %.0fs after it was killed: replacing it", index,
                             self.limits.abandon_after_kill_s)
                for ref in refs:
                    attempt = in_flight.pop(ref)
                    lost(attempt, f"timed out after {attempt.killed_at - attempt.started:.0f}s; the worker did "
                                  "not end when killed")
                self._replace(index)
            done, _ = ray.wait([*in_flight, *self._probes], num_returns=1, timeout=poll_s)
            if not done:
                on_idle()
                continue
            ref = done[0]
            if ref in self._probes:
                self._on_probe(ref)
                continue
            attempt = in_flight.pop(ref)
            index, unit = attempt.index, attempt.unit
            try:
                result = UnitResult(unit, stats=ray.get(ref))
            except RayActorError as exc:
                # The worker died with the unit (or Ray cannot tell whether the try ran): the unit goes to
                # whoever is free first; the commit protocol keeps a second try from committing twice.
                timed_out = attempt.killed_at is not None
                reason = f"timed out after {attempt.killed_at - attempt.started:.0f}s" if timed_out \
                    else redact_text(str(exc))
                if index in self._ready:  # restarting or dead: ask it again before handing it more
                    self.events.worker_restart()
                    self._ready.discard(index)
                    self._probes[self.workers[index].describe.remote()] = index
                lost(attempt, reason)
                continue
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc  # the worker's own exception, not Ray's wrapper
                if isinstance(cause, OutputLostError):
                    raise OutputLostError(redact_text(str(cause))) from None
                error = redact_text(f"{type(cause).__name__}: {cause}")
                logger.warning("unit %d failed on try %d: %s", unit.unit_id, charged[unit.unit_id], error)
                failed_on[unit.unit_id].add(index)
                failed = self._retry_or_fail(unit, charged, pending, on_result, error)
                if failed and isinstance(cause, GenerationError):
                    systematic.append(error)
                    if not committed and len(systematic) >= stop_after and (pending or in_flight):
                        raise SystematicFailureError(
                            f"stopped early: {len(systematic)} shards failed every try ({self.max_unit_attempts}) "
                            f"in generation and none committed, so the models or the devices fail, not the rows: "
                            f"{error.removeprefix('GenerationError: ')}")
                continue
            self.deadlines.on_committed(attempt)
            committed = True  # the generation works: later failures are the units' own
            on_result(result)
            on_idle()

    def _next_unit(self, pending: collections.deque, index: int, failed_on: dict) -> WorkUnit | None:
        """The first pending unit that has not raised on worker `index` (a bad GPU fails whatever it takes), or
        that has raised on every ready worker."""
        for position, unit in enumerate(pending):
            tried = failed_on.get(unit.unit_id)
            if not tried or index not in tried or self._ready <= tried:
                del pending[position]
                return unit
        return None

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
            self.deadlines.on_worker_started(index)
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
            self._new_worker(index)

    def _replace(self, index: int) -> None:
        """Gives up on a worker that did not end when killed (stuck in the kernel): it may not restart, and a
        fresh one takes its place; answers still due from it are not waited for."""
        ray.kill(self.workers[index], no_restart=True)
        self.events.worker_restart()
        self._ready.discard(index)
        for ref in [ref for ref, probed in self._probes.items() if probed == index]:
            del self._probes[ref]
        self._new_worker(index)

    def _new_worker(self, index: int) -> None:
        self.workers[index] = self.make_worker(index)
        self._probes[self.workers[index].describe.remote()] = index

    def _retry_or_fail(self, unit, attempts, pending, on_result, error: str) -> bool:
        """Requeues `unit`, or reports it failed once its tries are used up; returns whether it failed."""
        if attempts[unit.unit_id] < self.max_unit_attempts:
            pending.append(unit)
            self.events.unit_retry()
            return False
        on_result(UnitResult(unit, error=error))
        return True

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
