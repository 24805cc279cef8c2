"""What the CPU benchmarks share: figures on disk, a local S3 server, prompts, a private Ray, CPU accounting, and
a pool that times each unit's completion.

Every server listens on 127.0.0.1. The machine these run on is shared, so each figure comes with the CPU that
other jobs used meanwhile (`CpuMeter`): a figure taken while others ran says so.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray listens on 127.0.0.1 only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmarks use the tiny offline models

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.pool import ActorPool, PoolLimits, ray_worker_factory, worker_options  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "tests" / "bench" / "results"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a snowy mountain", "a busy city street",
            "a sleeping cat", "a wooden boat", "a glass greenhouse", "an ancient castle", "a field of sunflowers")
STYLES = ("photo, 35mm lens, golden hour", "oil painting, highly detailed", "watercolor, soft pastel colors",
          "pencil drawing", "digital art, cinematic lighting, 8k")


class Figures:
    """Prints each figure as one JSON line and appends it to OUT/{bench}.jsonl."""

    def __init__(self, bench: str, out: Path):
        self.bench = bench
        self.path = out / f"{bench}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, **values) -> None:
        line = json.dumps({"bench": self.bench, "name": name, **values}, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def machine(self, argv: list[str]) -> None:
        """The first line of a run: its command, the date and the machine."""
        self.add("machine", command=" ".join(["python", f"tests/bench/{self.bench}.py", *argv]),
                 date=datetime.date.today().isoformat(), cpus=os.cpu_count(),
                 memory_gib=round(psutil.virtual_memory().total / 2**30, 1), python=platform.python_version(),
                 load_1min=os.getloadavg()[0])


def default_out() -> Path:
    """tests/bench/results/cpu-DATE/: each benchmark appends its figures to its own file there."""
    return RESULTS_DIR / f"cpu-{datetime.date.today().isoformat()}"


# ------------------------------------------------------------------------------------------------------ prompts


def prompt_table(first: int, num_rows: int) -> pa.Table:
    """Prompts of realistic length (12 to 20 words) with a unique `id`, the key of every output row."""
    rows = range(first, first + num_rows)
    return pa.table({
        "id": [f"p{i:09d}" for i in rows],
        "prompt": [f"{SUBJECTS[i % 10]} under a {('stormy', 'clear', 'misty')[i % 3]} sky, {STYLES[(i // 10) % 5]}, "
                   f"number {i}" for i in rows],
    })


def write_prompt_files(fs, folder: str, num_files: int, rows_per_file: int, row_group_rows: int) -> list[str]:
    """`num_files` Parquet files of prompts under `folder` (a path of `fs`), ids numbered across files."""
    fs.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(num_files):
        buf = io.BytesIO()
        pq.write_table(prompt_table(index * rows_per_file, rows_per_file), buf, row_group_size=row_group_rows)
        path = f"{folder.rstrip('/')}/prompts-{index:05d}.parquet"
        fs.pipe_file(path, buf.getvalue())
        paths.append(path)
    return paths


def build_tiny_models(workdir: Path) -> dict[str, Path]:
    from jobs.tiny import build_tiny_models as build

    return build(workdir / "models")


# --------------------------------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """moto's S3 server in its own process (its CPU is then not the driver's), on 127.0.0.1."""

    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        return s3_storage_options(self.endpoint_url)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def s3_storage_options(endpoint_url: str) -> dict:
    """fsspec (s3fs) settings for the local server, as a job's --storage-options."""
    return {"key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": endpoint_url, "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}}


def pyarrow_s3(endpoint_url: str):
    """The local server for pyarrow (Ray Data reads and writes through it)."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                   region=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                                   endpoint_override=endpoint_url.removeprefix("http://"), scheme="http")


@contextlib.contextmanager
def s3_server(bucket: str = "bench"):
    """Starts infra/local/s3_server.py on a free port and sets the AWS_* variables that workers inherit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.local.s3_server", "--port", "0", "--quiet", "--bucket", bucket],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONPATH": checkout_pythonpath()},
    )
    try:
        endpoint = None
        for line in process.stdout:
            match = re.search(r"S3 endpoint: (http://127\.0\.0\.1:\d+)", line)
            if match:
                endpoint = match.group(1)
                break
        if endpoint is None:
            raise RuntimeError("the S3 server did not start (infra/local/s3_server.py)")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
        saved = {name: os.environ.get(name) for name in S3_CREDENTIALS}
        os.environ.update(S3_CREDENTIALS)
        try:
            yield S3Server(endpoint, bucket)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        process.terminate()
        process.wait(timeout=30)


def checkout_pythonpath() -> str:
    """This checkout first on the path, so that Ray workers and child processes import it, not another copy."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return os.pathsep.join([str(REPO), *rest])


# -------------------------------------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def local_ray(num_cpus: float, num_gpus: int, workdir: Path | None, address: str | None = None):
    """A private Ray on 127.0.0.1 with logical GPUs, its session in a new folder of `workdir` (None: in
    RAY_TMPDIR as set, for a child process); or the Ray at `address`; or the one already up in this process."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ["PYTHONPATH"] = checkout_pythonpath()  # workers import this checkout
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp_dir = os.environ["RAY_TMPDIR"] if workdir is None else tempfile.mkdtemp(prefix="r", dir=workdir)
        os.environ["RAY_TMPDIR"] = temp_dir  # short: Ray's socket paths must fit in 107 bytes
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ CPU accounting


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _role(process: psutil.Process, driver_pid: int) -> str:
    """Which part of a benchmark a process of its tree is, for the split of CPU time."""
    if process.pid == driver_pid:
        return "driver"
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    if "s3_server" in cmdline:
        return "s3"
    if "pipeline.encoders" in cmdline:
        return "workers"  # a worker's image encoders (pipeline/encoders.py)
    if re.search(r"tests/bench/\w+\.py child", cmdline):
        return "driver"  # a benchmark step in its own process
    if cmdline.startswith("ray::") and "IDLE" not in cmdline and "Worker" in cmdline.split()[0]:
        return "workers"
    if cmdline.startswith("ray::"):
        return "ray_tasks"  # Ray Data's operators and other actors
    return "ray_system"  # raylet, GCS, agents, idle workers


class CpuMeter:
    """CPU used during a window by this process tree (by role) and by the rest of the machine (other jobs).

    Samples every `interval_s`, so a process that ends inside the window still counts up to its last sample.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._own_cpu_s = 0.0  # the sampling itself, which runs in the driver's process: not the driver's work
        self.result: dict = {}

    def _sample(self) -> None:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            cpu = times.user + times.system
            if process.pid not in self._first:
                # a process that started inside the window counts from zero
                started_before = process.create_time() < self._started_at
                self._first[process.pid] = cpu if started_before else 0.0
            self._last[process.pid] = cpu
            if self._roles.get(process.pid) != "workers":  # an idle Ray process may become a worker later
                self._roles[process.pid] = _role(process, me.pid)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.thread_time()
            self._sample()
            self._own_cpu_s += time.thread_time() - started

    def __enter__(self) -> "CpuMeter":
        self._started_at = time.time()
        self._clock = time.perf_counter()
        self._busy = _busy_jiffies()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._clock
        busy_s = (_busy_jiffies() - self._busy) / os.sysconf("SC_CLK_TCK")
        by_role: dict[str, float] = {}
        for pid, last in self._last.items():
            role = self._roles[pid]
            by_role[role] = by_role.get(role, 0.0) + last - self._first[pid]
        by_role["driver"] = by_role.get("driver", 0.0) - self._own_cpu_s
        busy_s -= self._own_cpu_s
        mine = sum(by_role.values())
        self.result = {
            "wall_s": wall,
            "machine_busy_cores": busy_s / wall,
            "ours_cores": mine / wall,
            "other_jobs_cores": max(0.0, busy_s - mine) / wall,
            **{f"cpu_s_{role}": seconds for role, seconds in sorted(by_role.items())},
        }


# --------------------------------------------------------------------------------------------------- timed pool


class TimedPool(ActorPool):
    """The engine's pool, noting when each unit's result arrives, which worker sent it (for steady-state rates)
    and that worker's memory, and asking each worker for its counters when the units are done, before the job
    shuts them down. With `all_ready_first`, units are handed out only once every worker has started (bounded by
    the start timeout): a scaling figure needs every worker in it, and on a loaded machine one worker can start
    seconds after another and find the queue empty."""

    def __init__(self, *args, all_ready_first: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.all_ready_first = all_ready_first
        self.completions: list[tuple[float, int, int]] = []  # (seconds since run() began, rows, worker pid)
        self.worker_rss_mib: list[float] = []  # the sending worker's resident memory as each unit completes
        self.worker_counters: list[dict] = []

    def run(self, units, on_result, on_idle=lambda: None, poll_s: float = 1.0) -> None:
        import ray

        started = time.perf_counter()

        def timed(result) -> None:
            if result.stats is not None:
                pid = result.stats["worker"]["pid"]
                self.completions.append((time.perf_counter() - started, result.unit.num_rows, pid))
                with contextlib.suppress(psutil.Error):  # a worker on another machine is not measured
                    self.worker_rss_mib.append(psutil.Process(pid).memory_info().rss / 2**20)
            on_result(result)

        if self.all_ready_first:
            self._wait_for_every_worker(on_idle, poll_s)
        super().run(units, timed, on_idle, poll_s)
        if all(hasattr(worker, "counters") for worker in self.workers):
            self.worker_counters = ray.get([worker.counters.remote() for worker in self.workers])

    def _wait_for_every_worker(self, on_idle, poll_s: float) -> None:
        import ray

        self.start()
        deadline = time.monotonic() + self.limits.start_timeout_s
        while len(self._ready) < self.num_workers and self._probes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self._ready)} of {self.num_workers} workers started in "
                                   f"{self.limits.start_timeout_s:.0f}s")
            done, _ = ray.wait(list(self._probes), num_returns=1, timeout=poll_s)
            if done:
                self._on_probe(done[0])
            else:
                on_idle()

    def steady_rate(self) -> dict:
        """Rows per second in the steady state, summed over the workers: for each worker, the least-squares
        slope of its rows done against time, from its first completion to its second-to-last. Start-up (Ray,
        model load, the first unit's unoverlapped read) and the tail are left out; the slope evens out units
        that finish in pairs (a worker runs two at a time). A worker with fewer than 3 units counts its whole
        run from the pool's start."""
        by_worker: dict[int, list[tuple[float, int]]] = {}
        for t, rows, pid in self.completions:
            by_worker.setdefault(pid, []).append((t, rows))
        total = 0.0
        for done in by_worker.values():
            if len(done) < 3:
                total += sum(rows for _, rows in done) / done[-1][0]
                continue
            times = [t for t, _ in done[:-1]]
            cumulative = list(itertools.accumulate(rows for _, rows in done[:-1]))
            total += statistics.linear_regression(times, cumulative).slope
        return {"samples_per_s": total, "workers_seen": len(by_worker),
                "units_per_worker": [len(done) for done in by_worker.values()]}


def timed_pools(pools: list, worker_class=None, *extra_args, all_ready_first: bool = False):
    """A pool factory for `run_job` that makes TimedPools and keeps them in `pools` (`all_ready_first`: see
    TimedPool).

    Without `worker_class`, the engine's own ShardWorker actors (`ray_worker_factory`); with one, actors of
    that class with the same options (resources, restarts, concurrency), given `extra_args` after the usual.
    """

    def make_pool(spec, sources, fence, num_units):
        if worker_class is None:
            make_worker, num_workers = ray_worker_factory(spec, sources, fence)
        else:
            import ray

            actor = ray.remote(worker_class).options(**worker_options(1, spec.cpus_per_worker))
            num_workers = spec.num_workers

            def make_worker(index):
                return actor.remote(spec, sources, fence, *extra_args)

        limits = PoolLimits(start_timeout_s=spec.start_timeout_s, unit_timeout_s=spec.unit_timeout_s)
        pools.append(TimedPool(make_worker, min(num_workers, num_units), spec.max_unit_attempts, limits,
                               all_ready_first=all_ready_first))
        return pools[-1]

    return make_pool


# ------------------------------------------------------------------------------------------------ child runs


@dataclass
class Child:
    """A benchmark step in its own process (and its own Ray), so that it can be killed like a real job."""

    process: subprocess.Popen
    started: float
    result_path: Path

    def wait(self, timeout_s: float) -> dict:
        """Its result (the JSON it wrote) and its wall time seen from outside, imports and Ray start included."""
        status = self.process.wait(timeout=timeout_s)
        wall = time.perf_counter() - self.started
        if status != 0:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{' '.join(map(str, self.process.args[:4]))}... exited {status}:\n{tail}")
        return json.loads(self.result_path.read_text()) | {"wall_s": wall}

    @property
    def log_path(self) -> Path:
        return self.result_path.with_suffix(".log")

    def kill(self) -> float:
        """SIGKILLs it and every process it started (its Ray too), by id; returns seconds since it started."""
        try:
            tree = [self.process, *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        killed_at = time.perf_counter() - self.started
        for process in tree:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                process.kill()
        self.process.wait()
        psutil.wait_procs([p for p in tree if isinstance(p, psutil.Process)], timeout=10)
        return killed_at


def start_child(script: Path, args: list[str], workdir: Path, name: str) -> Child:
    """Runs `python script args --result FILE` with this checkout first on the path and a private Ray folder."""
    result = workdir / f"{name}.json"
    result.unlink(missing_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir=workdir))
    log = open(result.with_suffix(".log"), "w")
    env = os.environ | {"PYTHONPATH": checkout_pythonpath(), "RAY_TMPDIR": str(ray_tmp)}
    process = subprocess.Popen([sys.executable, str(script), *args, "--result", str(result)], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return Child(process, time.perf_counter(), result)


def write_result(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result))
