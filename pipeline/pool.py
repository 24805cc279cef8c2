"""The actor pool: one worker per GPU across the cluster, pulling work units until none are left.

Fault tolerance is Ray's: workers are restarted by Ray (`max_restarts=-1`) when their process or node dies, and
the units they held go back to the queue for any live worker. A unit is handed out again only after its previous
try has failed, so at most one try of a unit runs at a time. A unit that raises `max_unit_attempts` times is
reported failed; the rest of the job goes on.
"""

import collections
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from pipeline.plan import WorkUnit
from pipeline.spec import JobSpec
from pipeline.storage import storage_env
from pipeline.worker import ShardWorker

logger = logging.getLogger(__name__)

UNITS_PER_WORKER = 2  # one generating, one being read or written: see pipeline/worker.py
CPU_PER_CPU_WORKER = 1.0


class WorkerStartupError(RuntimeError):
    """Workers could not start (a model that does not load, a bad storage URL): the job cannot run."""


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
    the CPUs it reserves run its image encoders.
    """
    return {
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": UNITS_PER_WORKER,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": storage_env()},
    }


def ray_worker_factory(spec: JobSpec) -> tuple[Callable[[int], object], int]:
    """Makes `ShardWorker` actors for `spec`: one per GPU in the cluster, or CPU workers where there are none."""
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpus = num_gpus > 0
    num_workers = spec.num_workers or (num_gpus if use_gpus else 1)
    if use_gpus and num_workers > num_gpus:
        logger.warning("%d workers asked for but the cluster has %d GPUs: the rest wait for GPUs", num_workers, num_gpus)
    if spec.cpus_per_worker is None:
        cpus = cpus_per_gpu(ray.nodes()) if use_gpus else CPU_PER_CPU_WORKER
        spec = dataclasses.replace(spec, cpus_per_worker=cpus)
    actor_class = ray.remote(ShardWorker).options(**worker_options(int(use_gpus), spec.cpus_per_worker))
    return (lambda index: actor_class.remote(spec)), num_workers


@dataclass
class UnitResult:
    unit: WorkUnit
    stats: dict | None = None  # the committed shard's stats
    error: str | None = None  # why the unit failed, after its last try


class ActorPool:
    """Hands units to idle workers and collects every unit's outcome."""

    def __init__(self, make_worker: Callable[[int], object], num_workers: int, max_unit_attempts: int = 3):
        self.make_worker = make_worker
        self.num_workers = num_workers
        self.max_unit_attempts = max_unit_attempts
        self.workers: list = []
        self.worker_info: dict[int, dict] = {}  # index -> what the worker reported when it became ready

    def run(
        self,
        units: list[WorkUnit],
        on_result: Callable[[UnitResult], None],
        on_idle: Callable[[], None] = lambda: None,
        poll_s: float = 1.0,
    ) -> None:
        """Runs every unit to commit or failure. `on_idle` is called every `poll_s` while waiting (progress)."""
        pending = collections.deque(units)
        attempts = collections.Counter()
        in_flight: dict = {}  # task ref -> (worker index, unit)
        probes: dict = {}  # ready ref -> worker index, for workers starting or restarting
        load = collections.Counter()  # worker index -> units in flight
        ready: set[int] = set()
        startup_failures = 0
        self.workers = [self.make_worker(i) for i in range(self.num_workers)]
        for index, worker in enumerate(self.workers):
            probes[worker.describe.remote()] = index

        while pending or in_flight:
            for index in sorted(ready, key=lambda i: load[i]):
                while pending and load[index] < UNITS_PER_WORKER:
                    unit = pending.popleft()
                    attempts[unit.unit_id] += 1
                    ref = self.workers[index].process.remote(unit, attempts[unit.unit_id])
                    in_flight[ref] = (index, unit)
                    load[index] += 1
            done, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=poll_s)
            if not done:
                on_idle()
                continue
            ref = done[0]
            if ref in probes:
                index = probes.pop(ref)
                try:
                    self.worker_info[index] = ray.get(ref)
                    ready.add(index)
                except ActorUnavailableError:
                    probes[self.workers[index].describe.remote()] = index  # restarting: ask again
                except RayActorError as exc:
                    # Dead for good: its constructor raised (counted, so a model that cannot load ends the
                    # job instead of looping), or Ray gave up on it. Either way a fresh worker takes its place.
                    if exc.actor_init_failed:
                        startup_failures += 1
                        if startup_failures >= self.num_workers:
                            raise WorkerStartupError(f"workers failed to start: {exc}") from None
                    logger.warning("worker %d is dead, replacing it: %s", index, exc)
                    self.workers[index] = self.make_worker(index)
                    probes[self.workers[index].describe.remote()] = index
                continue
            index, unit = in_flight.pop(ref)
            load[index] -= 1
            try:
                on_result(UnitResult(unit, stats=ray.get(ref)))
            except RayActorError as exc:
                # The worker died with the unit: Ray restarts it; the unit goes to whoever is free first.
                logger.warning("worker %d died during unit %d (%s); unit requeued", index, unit.unit_id, exc)
                if index in ready:
                    ready.discard(index)
                    probes[self.workers[index].describe.remote()] = index
                self._retry_or_fail(unit, attempts, pending, on_result, f"worker died: {exc}")
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc  # the worker's own exception, not Ray's wrapper
                error = f"{type(cause).__name__}: {cause}"
                logger.warning("unit %d failed on try %d: %s", unit.unit_id, attempts[unit.unit_id], error)
                self._retry_or_fail(unit, attempts, pending, on_result, error)

    def _retry_or_fail(self, unit, attempts, pending, on_result, error: str) -> None:
        if attempts[unit.unit_id] < self.max_unit_attempts:
            pending.append(unit)
        else:
            on_result(UnitResult(unit, error=error))

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
