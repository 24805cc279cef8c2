"""The chaos suite: one job of a few thousand prompts, run again and again under faults that a seed picks.

    PYTHONPATH=$PWD RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \\
        .venv/bin/python tests/chaos.py --runs 50 --seed 1 --out out/chaos/runs.jsonl

Everything listens on 127.0.0.1: moto's S3 server, and infra/local/fault_proxy.py in front of it. Every request
of the jobs goes through the proxy; the checks go to the server directly. Each run gets a fresh
`ray.cluster_utils.Cluster` (a head without GPUs, and nodes with one logical GPU each) and a fresh output, and
runs its drivers as subprocesses, as a user would (`python -m jobs.generate ...` or `python -m jobs.reflow_pairs
...`, `--lock-lease 2`, `--dtype float32`).

The seed of a run picks the job and its faults; each fault fires after the k-th committed shard (k and a further
delay picked by the seed), once the faulty leg has committed something of its own, so it lands mid-job:

- worker_kill: a `ray::ShardWorker` process of the cluster, one that is running a unit, gets SIGKILL (1 to 3 times);
- node_loss: the node of such a worker is removed (its processes killed, or stopped gracefully), and a new node
  is added a few seconds later;
- driver_kill: the driver gets SIGKILL, then the same command is run again;
- interrupt: the driver gets SIGINT or SIGTERM (exit 130), then the same command is run again;
- concurrent_start: the first leg starts two drivers on the same output at the same moment;
- storage: the proxy fails a fraction of the requests of some kinds (reads, writes, multipart parts, markers, the
  lock): 500, 503, SlowDown, a delay, or a reset, before forwarding or after (the write landed, its answer is lost);
- storage_outage (only when --faults names it): for 3 to 25 s, every request of some kinds gets one such fault (a
  delay holds them until the outage ends), longer than the S3 client's own retries last.

And the faults of issue 13, which do not wait for a commit:

- early: before the leg's first commit, 0 to 2.5 s after a live driver holds the lock (or a ShardWorker process
  runs, starting or warming up): a driver kill, an interrupt, a worker kill, or an outage of 0.5 to 1.8 s (shorter
  than the 2 s lease: the engine must ride it out);
- overwrite: a first leg runs the job with another --seed (to the end, or killed after k shards); the run's own
  command then gets --overwrite, and the moment its markers start to vanish (the removal of the old output; polled
  every 20 ms) the driver is killed or interrupted, or writes (and reads) fail for 0.5 to 1.8 s; the final checks
  compare with the reference of the run's own settings;
- local_output: the output is a folder of this machine, not S3 (storage faults then reach only the prompts);
- multipart: s3fs uploads in parts of 32 or 128 KiB (--part-sizes) (tests/chaos_site/sitecustomize.py in the jobs' processes;
  moto told to accept parts under S3's 5 MiB), so most shards are multipart uploads, and the proxy fails a fraction
  of the parts (a `part` rule, besides any the storage fault drew); each run's record counts its multipart requests
  by step, from the proxy.

And the faults of issue 28 (only when --faults names them; the encoder faults only in runs of a kind whose workers
encode images, generate), which reach a worker's image encoders (pipeline/encoders.py) and --overwrite's lease:

- encoder_kill: after the k-th shard, the image encoders of a ShardWorker running a unit (its children whose
  command line names pipeline.encoders) get SIGSTOP for 1 to 2 s, and longer (up to 8 s) until tasks wait unread
  in the input of the one picked, so that it holds tasks; then that one gets SIGKILL, as the kernel's OOM killer
  would, and the others SIGCONT: the unit's try fails and is retried, no row fails;
- memory_full: from the start of the run, no encoder block can be reserved (os.posix_fallocate on a memfd named
  instaflow-encode raises ENOSPC, through tests/chaos_site/sitecustomize.py while a flag file exists), so the
  workers encode in their own processes; turned off after the k-th shard, or (3 runs in 10) never;
- encoder_start_fails: after the k-th shard, an encoder of a worker running a unit gets SIGKILL while that worker
  cannot start another (subprocess.Popen of pipeline.encoders raises EMFILE, likewise) for 2 to 10 s: the worker
  encodes what is left itself;
- driver_pause (an --overwrite run, as `overwrite`, which it replaces when both are drawn): the moment the old
  output's first data file or marker vanishes (polled every 20 ms), the driver gets SIGSTOP; 0 to 1 s later a
  second driver runs the same command; once it holds the lock (the first's 2 s lease ran out), and 0 to 1.5 s
  more, the first gets SIGCONT. With a concurrent start in the leg, the other driver, watching the lock too, may
  take the output over instead: then the second refuses (exit 2, the output in use), and the taker stands for
  the second below. The first must exit 4 (output lost) and delete nothing that was in the output's root as it
  resumed, but for the moves back to the staging that it had under way when stopped (on an object store, at
  most 16, one per thread: pipeline/README.md leaves these open); judged while the second has no worker up (it
  deletes nothing before). The second must finish, and the final checks apply to its output. On a local disk, a
  first driver stopped in the middle of writing its lock or of a move or deletion (each is made holding the
  lock's guard) cannot be taken from, for its write lands when it wakes: the second must refuse (exit 2, naming
  it) instead, and the first, resumed, keeps the output.

After a leg that was cut short: what pipeline/README.md's readers see by globbing the output is committed data only, its
bytes are the reference's, and no key is seen twice. After the run: `instaflow-batch verify` passes, every prompt
appears exactly once, the readers see exactly the committed shards, every data file and every sample equals the
fault-free reference run (one per job kind and invocation), the output's lock is released, and `verify` passes
5 times in a row (each status recorded). After the run's cluster is shut down (after every run with a shared
cluster: the processes are checked once, after its shutdown): /dev/shm holds no psm_* entry that was not there
before the run, and no process of the cluster (its command line names the run's Ray temp dir, or an image encoder
whose environment does) is alive 10 s later.

Output: one JSON line per run (seed, faults with their times, exit statuses, resumes, checks), then a summary
line. A failed run keeps its driver logs, fault log and output listing under the work directory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from infra.local.cluster import _alive, _signal, free_ports, processes_naming, with_descendants  # noqa: E402
from infra.local.fault_proxy import ALL_FAULTS, CONTROL_PREFIX, KINDS  # noqa: E402
from infra.local.s3_server import CREDS, HOST  # noqa: E402

BUCKET = "chaos"
LOCK_LEASE_S = 2.0
JOB_SEED = 7
WORKER_TITLE = "ray::ShardWorker"
FAULT_TYPES = ("worker_kill", "node_loss", "driver_kill", "interrupt", "concurrent_start", "storage", "early",
               "overwrite", "local_output", "multipart", "storage_outage", "encoder_kill", "memory_full",
               "encoder_start_fails", "driver_pause")
# those of issues 7 and 13; outages longer than the lease, and the faults of issue 28, are asked for by name
DEFAULT_FAULTS = FAULT_TYPES[:10]
IMAGE_FAULTS = ("encoder_kill", "memory_full", "encoder_start_fails")  # only for kinds whose workers encode images
IMAGE_KINDS = ("generate",)
REMOVAL_FAULTS = ("overwrite", "driver_pause")  # land as an --overwrite leg removes the old output
ENCODER_COMMAND = "pipeline.encoders"  # in the command line of an image encoder process (a ShardWorker's child)
SHARD_WORKER_LINE = "(ShardWorker pid="  # how a driver's log shows the lines Ray forwards from its workers
# A driver_pause's second driver on a local disk, when the first was stopped holding the lock's guard (mid-write
# of the lock, or mid-change of the output: each move and deletion is made holding it): the takeover is refused
# (exit 2), as it must be, for the first's write lands when it wakes (pipeline/lock.py, OutputLock.fenced).
STOPPED_WRITER_LINE = "stopped or hung in the middle of writing its lock"
PAUSE_LIMIT_S = 180.0  # a paused driver is let go by then even if no second driver took the output over
STAGING_DIR = "_staging"  # pipeline/commit.py's, under the output's root
IN_FLIGHT_MOVES_LIMIT = 16  # moves a driver can have under way at once (one per thread; pipeline/README.md, issue 28)
HOLD_LIMIT_S = 8.0  # how long encoder_kill keeps a worker's encoders stopped waiting for a task to hold
VARIANTS = ("concurrent_start", "local_output", "multipart")  # set up as the run starts, not fired mid-job
OUTAGE_FAULTS = ("before:503", "before:slowdown", "before:reset", "before:delay", "after:reset")
DRIVER_FAULTS = ("driver_kill", "interrupt")
EARLY_ACTIONS = ("driver_kill", "interrupt", "worker_kill", "storage_outage")
SHORT_OUTAGE_S = (0.5, 1.8)  # shorter than the lease: the engine must ride these out
OLD_SEED = JOB_SEED + 1  # the settings an --overwrite run's first leg used
JOB_KINDS = ("generate", "reflow_pairs")
# The exit statuses every entry point documents; the suite holds the drivers to the table, not to the code.
EXIT_OK, EXIT_SHARDS_FAILED, EXIT_BAD_INPUT, EXIT_OUTPUT_LOST, EXIT_INTERRUPTED = 0, 1, 2, 4, 130
LEFTOVER_GRACE_S = 10.0  # after the cluster's shutdown, for its processes to end
VERIFY_TIMES = 5  # verify runs on the finished output, each of which must pass (--verify-times)
MAX_EXTRA_LEGS = 3  # resumes beyond those the faults make, before a run counts as not finishing
POLL_S = 0.2
_MARKER = re.compile(r"\d{5}\.stats\.json")
_DATA = re.compile(r"\d{5}\.(tar|parquet)")
# Lines of the drivers' logs (workers' lines included: Ray forwards them) that show which recovery paths ran.
ENGINE_EVENTS = {
    "storage_retry": re.compile(r"failed \(attempt \d+/\d+\).*retrying in"),
    "unit_try_failed": re.compile(r"unit \d+ failed on try"),
    "unit_requeued_worker_lost": re.compile(r"lost unit \d+"),
    "worker_replaced": re.compile(r"worker \d+ is dead, replacing it"),
    "unit_deadline_passed": re.compile(r"passed its deadline"),
    "lock_taken_over": re.compile(r"taking over \S*_job\.lock"),
    "lock_refused": re.compile(r"is in use by another job"),
    "lock_lost": re.compile(r"lost the lock on"),
    "commit_refused_not_owner": re.compile(r"not committed: .* is now held by"),
    "marker_replaced": re.compile(r"replacing marker"),
    "interrupted_moves_finished": re.compile(r"finished \d+ commits that a crash had interrupted"),
    "resumed": re.compile(r"resuming: \d+ of \d+ shards already committed"),
    "interrupted": re.compile(r"interrupted: committed shards stay"),
    "old_output_removed": re.compile(r"removed \d+ old output files from"),
    "encoder_lost_holding_tasks": re.compile(r"image encoder process exited with status \S+; the images of \d+ tasks"),
    "encoder_not_replaced": re.compile(r"none could be started in its place"),
    "encoded_in_worker_no_memory": re.compile(r"no shared memory for a batch's pixels"),
}
_SHARD_TAR = re.compile(r"\d{5}\.tar")  # what a webdataset brace pattern {00000..NNNNN}.tar names


# ---------------------------------------------------------------------------------------------------- services


class Services:
    """moto's S3 server and the fault proxy in front of it, each a subprocess on 127.0.0.1."""

    def __init__(self, workdir: Path):
        import s3fs

        s3_port, proxy_port = free_ports(2)
        self.logs = workdir / "services"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": str(REPO)}
        self.processes = []
        self.s3_url = f"http://{HOST}:{s3_port}"
        self.proxy_url = f"http://{HOST}:{proxy_port}"
        # moto refuses parts under S3's 5 MiB (and spills objects over it to disk); the multipart runs use less.
        self._start([sys.executable, "-m", "infra.local.s3_server", "--port", str(s3_port), "--bucket", BUCKET,
                     "--quiet"], "s3_server.log", "Serving",
                    env | {"S3_UPLOAD_PART_MIN_SIZE": "1", "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(16 << 20)})
        self.part_size_file = workdir / "part_size"  # read by tests/chaos_site/sitecustomize.py at each upload
        self.set_part_size(0)
        # while these exist, tests/chaos_site/sitecustomize.py fails encoder blocks (ENOSPC), encoder starts (EMFILE)
        self.memory_full_file = workdir / "memory_full"
        self.encoder_start_fails_file = workdir / "encoder_start_fails"
        self.clear_flags()
        self._start([sys.executable, "-m", "infra.local.fault_proxy", "--target", self.s3_url, "--port",
                     str(proxy_port)], "fault_proxy.log", "fault proxy", env)
        self.direct_options = {"key": CREDS["AWS_ACCESS_KEY_ID"], "secret": CREDS["AWS_SECRET_ACCESS_KEY"],
                               "client_kwargs": {"endpoint_url": self.s3_url,
                                                 "region_name": CREDS["AWS_DEFAULT_REGION"]}}
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.direct_options)  # the checks' own view

    def _start(self, command: list[str], log_name: str, ready_text: str, env: dict) -> None:
        log = open(self.logs / log_name, "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.processes.append(process)
        deadline = time.monotonic() + 60
        while ready_text not in (self.logs / log_name).read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[2]} did not start:\n{(self.logs / log_name).read_text()}")
            time.sleep(0.1)

    def set_part_size(self, size: int) -> None:
        """The multipart part size of the jobs' s3fs uploads from now on (0: s3fs's own)."""
        self.part_size_file.write_text(str(size))

    def clear_flags(self) -> None:
        for flag in (self.memory_full_file, self.encoder_start_fails_file):
            flag.unlink(missing_ok=True)

    def configure_faults(self, config: dict) -> None:
        self._control("config", json.dumps(config).encode())

    def start_outage(self, outage: dict) -> None:
        self._control("outage", json.dumps(outage).encode())

    def fault_stats(self) -> dict:
        return json.loads(self._control("stats"))

    def _control(self, name: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.proxy_url}{CONTROL_PREFIX}{name}", data=body,
                                         method="PUT" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def job_environment(services: Services, ray_tmpdir: Path) -> dict:
    """The environment of the cluster's processes and of every driver: S3 through the proxy, Ray on 127.0.0.1."""
    return os.environ | CREDS | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests" / "chaos_site"),
                                                    os.environ.get("PYTHONPATH")])),
        "CHAOS_PART_SIZE_FILE": str(services.part_size_file),
        "CHAOS_MEMORY_FULL_FILE": str(services.memory_full_file),
        "CHAOS_ENCODER_START_FAILS_FILE": str(services.encoder_start_fails_file),
        "AWS_ENDPOINT_URL": services.proxy_url,
        "RAY_TMPDIR": str(ray_tmpdir),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }


# ---------------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Workload:
    """The input (uploaded once) and the command line of each job kind."""

    num_prompts: int
    rows_per_shard: int
    batch_size: int
    models: Path

    @property
    def prompts_url(self) -> str:
        return f"s3://{BUCKET}/prompts/"

    def upload(self, fs) -> tuple[dict[str, str], int]:
        """Two Parquet files with an `id` column, of row groups a quarter of a unit; returns the prompts by id
        and the number of units the engine plans for them."""
        import pyarrow as pa
        from jobhelpers import prompt_table, write_prompts
        from pipeline.plan import list_input_files, plan_units

        prompts = {}
        sizes = (self.num_prompts // 2, self.num_prompts - self.num_prompts // 2)
        for part, size in enumerate(sizes):
            start = sum(sizes[:part])
            table = prompt_table(size, start=start)
            ids = [f"p{start + i:06d}" for i in range(size)]
            table = table.append_column("id", pa.array(ids))
            prompts.update(zip(ids, table.column("prompt").to_pylist()))
            write_prompts(fs, f"{BUCKET}/prompts/part-{part}.parquet", table,
                          row_group_size=max(1, self.rows_per_shard // 4))
        return prompts, len(plan_units(list_input_files(fs, f"{BUCKET}/prompts/"), self.rows_per_shard))

    def command(self, kind: str, output: str, ray_address: str, seed: int = JOB_SEED) -> list[str]:
        common = ["--prompts", self.prompts_url, "--output", output, "--height", "64", "--width", "64",
                  "--batch-size", str(self.batch_size), "--rows-per-shard", str(self.rows_per_shard),
                  "--dtype", "float32", "--seed", str(seed), "--lock-lease", str(LOCK_LEASE_S),
                  "--no-progress", "--ray-address", ray_address]
        if kind == "generate":
            return [sys.executable, "-m", "jobs.generate", *common, "--model", str(self.models / "instaflow")]
        return [sys.executable, "-m", "jobs.reflow_pairs", *common, "--teacher", str(self.models / "sd15"),
                "--teacher-kind", "sd", "--steps", "4"]


# ---------------------------------------------------------------------------------------------------- the cluster


class ChaosCluster:
    """A `ray.cluster_utils.Cluster` on 127.0.0.1: a head without GPUs, and nodes with one logical GPU each."""

    def __init__(self, services: Services, num_gpu_nodes: int):
        from ray.cluster_utils import Cluster

        self.ray_tmpdir = Path(tempfile.mkdtemp(prefix="chaos-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.env = job_environment(services, self.ray_tmpdir)
        try:
            with self._environment():
                self.cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "node_ip_address": HOST})
            for _ in range(num_gpu_nodes):
                self.add_gpu_node()
            self.cluster.wait_for_nodes()
        except BaseException:
            self._kill_leftovers()
            raise

    @contextlib.contextmanager
    def _environment(self):
        """The nodes' processes inherit this process's environment: the jobs', while a node starts."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_gpu_node(self):
        with self._environment():
            return self.cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address=HOST)

    def workers(self) -> list[tuple[int, str, object]]:
        """(pid, process title, node) of every ShardWorker process of this cluster's GPU nodes."""
        found = []
        for node in list(self.cluster.worker_nodes):
            raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
            for pid in with_descendants(raylets):
                title = _cmdline(pid)
                if title.startswith(WORKER_TITLE):
                    found.append((pid, title, node))
        return found

    def remove_node(self, node, graceful: bool) -> None:
        self.cluster.remove_node(node, allow_graceful=graceful)

    def shutdown(self, keep_files: bool) -> list[str]:
        """Stops every node; returns the processes of the cluster still alive LEFTOVER_GRACE_S later (none is
        expected), then kills them. Ray's logs stay in `ray_tmpdir` if `keep_files` (a failed run's evidence)."""
        self.cluster.shutdown()
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (left := self.live_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"{pid} {_cmdline(pid)[:160]}" for pid in left]
        self._kill_leftovers()
        if not keep_files:
            shutil.rmtree(self.ray_tmpdir, ignore_errors=True)
        return left

    def live_processes(self) -> list[int]:
        """The cluster's processes alive now: those whose command line names its temp dir, and its image encoders
        (`python -m pipeline.encoders`: their environment names it, as every process of the cluster's does)."""
        named = set(processes_naming(str(self.ray_tmpdir)))
        encoders = {pid for pid in processes_naming(ENCODER_COMMAND) if _environment_names(pid, self.ray_tmpdir)}
        return sorted(pid for pid in named | encoders if _alive(pid))

    def _kill_leftovers(self) -> None:
        """Ends the cluster's processes, and theirs (none expected after Cluster.shutdown)."""
        for pid in with_descendants(self.live_processes()):
            _signal(pid, signal.SIGKILL)


def _ignored_signals(pid: int) -> set[signal.Signals]:
    """The signals process `pid` ignores (SigIgn in /proc: bit n-1 for signal n)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return {sig for sig in signal.Signals if mask >> (sig - 1) & 1}


def _environment_names(pid: int, ray_tmpdir: Path) -> bool:
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RAY_TMPDIR={ray_tmpdir}".encode() in environment


def _shard_files(names: list[str]) -> int:
    """How many markers and data files a listing of the output's root holds."""
    return sum(bool(_MARKER.fullmatch(name) or _DATA.fullmatch(name)) for name in names)


def _unread_input(pid: int) -> int:
    """Bytes written to process `pid`'s stdin pipe and not yet read (tasks an encoder holds unseen)."""
    try:
        fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)  # closed at once: the writer must not
    except OSError:                                                     # find a reader once the process is gone
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def encoders_of(worker_pid: int) -> list[int]:
    """The live image encoder processes below a ShardWorker process."""
    return [pid for pid in with_descendants([worker_pid])
            if pid != worker_pid and ENCODER_COMMAND in _cmdline(pid) and _alive(pid)]


def new_shared_memory(before: set[str]) -> list[str]:
    """Entries of /dev/shm named as Python's shared_memory names its blocks (psm_*), not in `before`."""
    return sorted(name for name in set(os.listdir("/dev/shm")) - before if name.startswith("psm_"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------- the faults


@dataclass
class Fault:
    type: str
    after_shards: int = 0  # fires once this many shards are committed (and the leg has committed one)
    delay_s: float = 0.0  # and then this long after
    params: dict = field(default_factory=dict)
    injected: bool = False
    t_s: float | None = None  # when it fired, seconds since the run started
    shards_at_fire: int | None = None  # shards committed when it fired
    leg: int | None = None
    detail: str = ""
    ended_t_s: float | None = None  # for a fault that lasts (memory_full): when it was turned off
    _due_since: float | None = None


def action(fault: Fault) -> str:
    """What a fault does: its type, or for `early` and `overwrite` faults the action the seed picked."""
    return fault.params.get("action", fault.type)


def short_outage(rng: random.Random, kinds: list[str]) -> dict:
    return dict(kinds=kinds, fault=rng.choice(OUTAGE_FAULTS), seconds=round(rng.uniform(*SHORT_OUTAGE_S), 1))


@dataclass
class Scenario:
    seed: int
    kind: str
    faults: list[Fault]
    storage: dict | None  # the proxy's config, or None for no storage faults

    @classmethod
    def from_seed(cls, seed: int, num_units: int, kinds: tuple[str, ...], menu: tuple[str, ...],
                  forced: tuple[str, ...] = (), storage_rules: dict | None = None,
                  part_sizes: tuple[int, ...] = (32 << 10, 128 << 10)) -> "Scenario":
        """A job kind and its faults: each of `menu` with probability 0.45 (at least one), plus `forced`.
        `storage_rules`, if given, replace the storage faults the seed would pick (the seed still drives them)."""
        rng = random.Random(f"chaos:{seed}")
        kind = rng.choice(kinds)
        if kind not in IMAGE_KINDS:  # its workers encode no image: the encoder faults would reach nothing
            menu = tuple(name for name in menu if name not in IMAGE_FAULTS)
            forced = tuple(name for name in forced if name not in IMAGE_FAULTS)
        chosen = [name for name in menu if rng.random() < 0.45]
        chosen = set(chosen or ([rng.choice(menu)] if menu else [])) | set(forced)
        if "driver_pause" in chosen:  # both land at the one moment an --overwrite run removes the old output
            chosen.discard("overwrite")
        chosen = sorted(chosen, key=FAULT_TYPES.index)
        latest = max(1, int(num_units * 0.6))

        def moment(**params) -> dict:
            return dict(after_shards=rng.randint(1, latest), delay_s=round(rng.uniform(0, 1.5), 2), params=params)

        faults = []
        for name in chosen:
            if name == "worker_kill":
                faults += [Fault("worker_kill", **moment()) for _ in range(rng.randint(1, 3))]
            elif name == "node_loss":
                faults.append(Fault("node_loss", **moment(graceful=rng.random() < 0.5,
                                                          back_after_s=round(rng.uniform(1, 6), 1))))
            elif name == "driver_kill":
                faults.append(Fault("driver_kill", **moment()))
            elif name == "interrupt":
                faults.append(Fault("interrupt", **moment(signal=rng.choice(["SIGINT", "SIGTERM"]))))
            elif name in ("concurrent_start", "local_output"):
                faults.append(Fault(name))
            elif name == "multipart":
                faults.append(Fault("multipart", params={"part_size": rng.choice(part_sizes)}))
            elif name == "early":  # once the lock is held (or a worker runs), before this leg's first commit
                act = rng.choice(EARLY_ACTIONS)
                params = {"action": act, "when": "workers" if act == "worker_kill" else rng.choice(["lock", "workers"])}
                if act == "interrupt":
                    params["signal"] = rng.choice(["SIGINT", "SIGTERM"])
                elif act == "storage_outage":
                    params.update(short_outage(rng, [k for k in KINDS if rng.random() < 0.5] or [rng.choice(KINDS)]))
                faults.append(Fault("early", delay_s=round(rng.uniform(0, 2.5), 2), params=params))
            elif name == "overwrite":  # lands as the --overwrite leg removes the old output
                act = rng.choice(["driver_kill", "interrupt", "storage_outage"])
                params = {"action": act, "old_cut_at": rng.choice([None, rng.randint(1, latest)])}
                if act == "interrupt":
                    params["signal"] = rng.choice(["SIGINT", "SIGTERM"])
                elif act == "storage_outage":
                    params.update(short_outage(rng, ["write"] + (["read"] if rng.random() < 0.5 else [])))
                faults.append(Fault("overwrite", params=params))
            elif name == "storage_outage":
                kinds = [kind for kind in KINDS if rng.random() < 0.5] or [rng.choice(KINDS)]
                faults.append(Fault("storage_outage", **moment(kinds=kinds, fault=rng.choice(OUTAGE_FAULTS),
                                                               seconds=round(rng.uniform(3, 25), 1))))
            elif name == "encoder_kill":  # its encoders stopped this long, so that they hold tasks, then one killed
                faults.append(Fault("encoder_kill", **moment(hold_s=round(rng.uniform(1, 2), 2))))
            elif name == "memory_full":  # on from the start; off once after_shards are committed, or never
                fault = Fault("memory_full", **moment())
                fault.params["to_the_end"] = rng.random() < 0.3
                faults.append(fault)
            elif name == "encoder_start_fails":  # on for flag_s from the moment an encoder is killed
                faults.append(Fault("encoder_start_fails", **moment(flag_s=round(rng.uniform(2, 10), 1))))
            elif name == "driver_pause":  # stopped as the old output goes; a second driver takes over meanwhile
                faults.append(Fault("driver_pause", params={
                    "old_cut_at": rng.choice([None, rng.randint(1, latest)]),
                    "second_after_s": round(rng.uniform(0, 1), 2),  # after the SIGSTOP, the second driver starts
                    "resume_after_s": round(rng.uniform(0, 1.5), 2)}))  # after the second's removal, SIGCONT
        storage = None
        if "storage" in chosen:
            storage = storage_config(rng, seed)
            if storage_rules is not None:
                storage["rules"] = storage_rules
        if "multipart" in chosen and storage_rules is None:  # the parts get faults too, so that `part` is exercised
            storage = storage or {"seed": seed, "rules": {}, "delay_s": [0.05, 1.0]}
            storage["rules"].setdefault("part", storage_rule(rng, "part"))
        return cls(seed, kind, sorted(faults, key=lambda f: f.after_shards), storage)


def storage_config(rng: random.Random, seed: int) -> dict:
    """Some request kinds (at least one), each failing a fraction of its requests (mostly a few percent, sometimes
    enough that boto's own retries run out) with faults from ALL_FAULTS. Kinds that write always include lost
    answers (after:reset), the fault that conditional writes must survive."""
    kinds = [kind for kind in KINDS if rng.random() < 0.6] or [rng.choice(KINDS)]
    return {"seed": seed, "rules": {kind: storage_rule(rng, kind) for kind in kinds}, "delay_s": [0.05, 1.0]}


def storage_rule(rng: random.Random, kind: str) -> dict:
    faults = sorted({fault for fault in ALL_FAULTS if rng.random() < 0.4} | (
        {"after:reset"} if kind != "read" else set()) or {rng.choice(ALL_FAULTS)})
    rate = rng.uniform(0.02, 0.1) if rng.random() < 0.7 else rng.uniform(0.2, 0.4)  # high: past boto's retries
    return {"rate": round(rate, 3), "faults": faults}


# ---------------------------------------------------------------------------------------------------- checks


def output_root(run_name: str) -> str:
    return f"{BUCKET}/runs/{run_name}"


def reader_view(fs, root: str) -> dict[str, list[str]]:
    """The data files each of pipeline/README.md's readers picks up by globbing the output, relative to the root."""
    import pyarrow.fs as pafs
    from ray.data.datasource.file_meta_provider import _expand_directory

    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{root}/*") if "/" in p)
    ray_data = [path[len(root) + 1:] for path, _ in _expand_directory(
        root, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), ignore_missing_path=True) if path.endswith(".parquet")]
    return {
        "datasets": [n for n in names if n.endswith(".parquet")],  # load_dataset("parquet", data_files="out/*.parquet")
        "webdataset": [n for n in names if _SHARD_TAR.fullmatch(n)],  # WebDataset("out/{00000..NNNNN}.tar")
        "ray_data": ray_data,  # ray.data.read_parquet("out/")
    }


def counted_markers(fs, root: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """The markers that count, as the engine sorts them: in place (what `committed_shards` gives readers), and
    pending (committed, their move into place not finished: a crash between marker and move, until a re-run)."""
    from pipeline.commit import Fence, ShardStore
    from pipeline.manifest import read_manifest

    manifest = read_manifest(fs, root)
    if not isinstance(manifest, dict):  # no _job.json yet: nothing is committed
        return {}, {}
    scan = ShardStore(fs, root).scan(Fence.from_manifest(manifest))
    return scan.in_place, scan.pending


def check_visible(fs, root: str, reference: dict[str, bytes] | None) -> tuple[list[str], dict]:
    """Problems with what readers see now, and what they see: only files of markers that count (listed before
    the markers are read, so a file moved in meanwhile still has its marker), each its marker's bytes and the
    reference's, and no key twice. A globbing reader also sees the files already moved of a shard whose move a
    crash cut short (`committed_shards` leaves such a shard out until a re-run finishes it); they are counted."""
    view = reader_view(fs, root)
    visible = sorted(set().union(*view.values()))
    committed, pending = counted_markers(fs, root)
    claimed = {name: meta for marker in [*committed.values(), *pending.values()]
               for name, meta in marker.get("files", {}).items()}
    pending_files = {name for marker in pending.values() for name in marker.get("files", {})}
    problems, keys = [], collections.Counter()
    for name in visible:
        readers = [reader for reader, names in view.items() if name in names]
        if name not in claimed:
            problems.append(f"{name} is visible to {'+'.join(readers)} but no committed marker claims it")
            continue
        data = fs.cat_file(f"{root}/{name}")
        if hashlib.sha256(data).hexdigest() != claimed[name]["sha256"]:
            problems.append(f"{name}: its bytes are not those its marker records")
        if reference is not None and data != reference.get(name):
            problems.append(f"{name}: {differing_samples(name, data, reference.get(name))}")
        if name.endswith(".parquet"):
            keys.update(metadata_keys(data))
    twice = sorted(key for key, count in keys.items() if count > 1)
    if twice:
        problems.append(f"{len(twice)} keys visible more than once: {twice[:10]}")
    return problems, {"visible_files": len(visible), "committed_shards": len(committed), "visible_keys": len(keys),
                      "pending_shards": len(pending), "visible_pending_files": len(pending_files & set(visible))}


def metadata_keys(parquet: bytes) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(parquet), columns=["key"]).column("key").to_pylist()


def samples(name: str, data: bytes) -> dict[str, object]:
    """A data file's samples: tar members by name, or Parquet rows by key."""
    import pyarrow.parquet as pq

    if name.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return {row["key"]: row for row in pq.read_table(io.BytesIO(data)).to_pylist()}


def differing_samples(name: str, data: bytes, expected: bytes | None) -> str:
    if expected is None:
        return "not in the reference run"
    ours, theirs = samples(name, data), samples(name, expected)
    differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    return (f"bytes differ from the reference run: {len(differ)} of {len(theirs)} samples differ "
            f"({differ[:5]})" if differ else "bytes differ from the reference run, though every sample is equal")


def check_final(services: Services, fs, url: str, root: str, prompts: dict[str, str],
                reference: dict[str, bytes] | None, log_dir: Path,
                verify_times: int = VERIFY_TIMES) -> tuple[list[str], dict, dict[str, bytes]]:
    """Problems with a finished output, what was checked, and its data files (the reference, for a clean run)."""
    from pipeline.lock import lock_holder

    problems, facts = [], {}
    options = ["--storage-options", json.dumps(services.direct_options)] if url.startswith("s3://") else []
    # verify re-plans from the prompts, on S3 even for a local output: it reads the server directly
    env = os.environ | CREDS | {"PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": services.s3_url}
    verifies = [subprocess.run([sys.executable, "-m", "jobs.main", "verify", url, *options], capture_output=True,
                               text=True, env=env, timeout=600) for _ in range(verify_times)]  # each must pass
    (log_dir / "verify.txt").write_text("".join(f"--- verify {i + 1}: exit {v.returncode}\n{v.stdout}{v.stderr}"
                                                for i, v in enumerate(verifies)))
    facts["verify_exits"] = [verify.returncode for verify in verifies]
    facts["verify_exit"] = next((status for status in facts["verify_exits"] if status != 0), 0)
    for verify in verifies:
        if verify.returncode != 0:
            problems.append(f"verify exited {verify.returncode} (statuses of its {verify_times} runs: "
                            f"{facts['verify_exits']}): "
                            + " | ".join(line.strip() for line in (verify.stdout + verify.stderr).splitlines()
                                         if "PROBLEM" in line or "error" in line.lower())[:2000])
            break
    visible_problems, seen = check_visible(fs, root, reference)
    problems += visible_problems
    facts.update(seen)
    if seen["pending_shards"]:
        problems.append(f"{seen['pending_shards']} committed shards are not in place after the job finished")
    view = reader_view(fs, root)
    files = {name: fs.cat_file(f"{root}/{name}") for name in sorted(set().union(*view.values()))}
    rows = collections.Counter()
    for name, data in files.items():
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data), columns=["key", "prompt", "status"])
            for row in table.to_pylist():
                rows[(row["key"], row["prompt"], row["status"])] += 1
    by_key = collections.Counter(key for key, _, _ in rows.elements())
    missing = sorted(set(prompts) - set(by_key))
    extra = sorted(set(by_key) - set(prompts))
    twice = sorted(key for key, count in by_key.items() if count > 1)
    wrong = sorted(key for key, prompt, _ in rows if key in prompts and prompts[key] != prompt)
    failed = sorted(key for key, _, status in rows if status != "ok")
    for what, keys in (("prompts missing", missing), ("keys not in the input", extra), ("prompts seen twice", twice),
                       ("keys with another prompt", wrong), ("rows not ok", failed)):
        if keys:
            problems.append(f"{len(keys)} {what}: {keys[:10]}")
    facts["prompts_once"] = not (missing or extra or twice or wrong)
    facts["samples"] = sum(by_key.values())
    if reference is not None:
        only_here, only_there = sorted(set(files) - set(reference)), sorted(set(reference) - set(files))
        if only_here or only_there:
            problems.append(f"data files differ from the reference run's: only here {only_here[:5]}, "
                            f"only there {only_there[:5]}")
        facts["bytes_equal_reference"] = files == reference
    holder = lock_holder(fs, root)
    if holder is not None:
        problems.append(f"the output is still locked by {holder} after the job finished")
    return problems, facts, files


# ---------------------------------------------------------------------------------------------------- one run


@dataclass
class Driver:
    process: subprocess.Popen
    log: Path
    started: float
    signalled: Fault | str | None = None  # the fault we sent it ("timeout" when the leg took too long)
    status: int | None = None


@dataclass
class Pause:
    """A driver_pause under way: the stopped driver, and the one started meanwhile."""

    fault: Fault
    first: Driver
    stopped_at: float  # monotonic
    second: Driver | None = None
    taker: Driver | None = None  # the driver seen holding the lock while the first was stopped: the second, or a
    # concurrent start's driver that was watching the lock as well
    ready_at: float | None = None  # when to resume the first (another driver has taken over)
    resumed_at: float | None = None
    names_at_resume: set[str] = field(default_factory=set)
    checked: bool = False
    refused: bool = False  # the second refused: the first was stopped mid-write to the lock, and keeps the output


@dataclass
class Suite:
    """What the runs of one invocation share."""

    services: Services
    workload: Workload
    workdir: Path
    prompts: dict[str, str]  # by id
    num_units: int
    num_gpu_nodes: int
    leg_timeout_s: float
    keep_files: bool = False  # keep passed runs' logs, outputs and Ray files too
    shared_cluster: ChaosCluster | None = None  # None: a fresh cluster for each run
    verify_times: int = VERIFY_TIMES


class Run:
    """One seeded run: legs of drivers until the job completes, the faults fired on the way, and the checks."""

    def __init__(self, index: int, scenario: Scenario, suite: Suite, reference: dict[str, bytes] | None,
                 name: str | None = None):
        self.index, self.scenario, self.suite, self.reference = index, scenario, suite, reference
        self.services = suite.services
        self.name = name or f"run-{index:03d}-seed-{scenario.seed}"
        self.dir = suite.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._has("local_output"):  # a folder of this machine: the cluster's nodes all run here
            from fsspec.implementations.local import LocalFileSystem

            self.fs, self.root = LocalFileSystem(), str(self.dir / "output")
            self.url = self.root
        else:
            self.fs, self.root = self.services.fs, output_root(self.name)
            self.url = f"s3://{self.root}"
        self.main_leg = 1  # the number of the first leg of the run's own command (after an old-settings leg)
        self.legs: list[dict] = []
        self.checks: dict[str, dict] = {}
        self.problems: list[str] = []
        self.files: dict[str, bytes] = {}
        self.started = time.monotonic()
        self.node_comebacks: list[float] = []  # when to add a node back, in monotonic time
        self.phases: dict[str, float] = {}  # where the run's time went, in seconds
        self.engine_events = collections.Counter()  # recovery paths the drivers' logs show
        self.flags_off: list[tuple[float, Path]] = []  # when to remove a sitecustomize flag file, in monotonic time
        self.pause: Pause | None = None  # a driver_pause under way

    def _removal_fault(self) -> Fault | None:
        """The fault that lands as the --overwrite leg removes the old output: the run has an old-settings leg."""
        return next((f for f in self.scenario.faults if f.type in REMOVAL_FAULTS), None)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def _has(self, fault_type: str) -> Fault | None:
        return next((f for f in self.scenario.faults if f.type == fault_type), None)

    def execute(self) -> dict:
        """Runs the scenario on a fresh cluster (or the suite's shared one), then checks the output."""
        self.services.configure_faults(self.scenario.storage or {"seed": 0, "rules": {}})
        multipart = self._has("multipart")
        self.services.set_part_size(multipart.params["part_size"] if multipart else 0)
        for variant in VARIANTS[1:]:
            if self._has(variant):
                fault = self._has(variant)
                fault.injected, fault.t_s, fault.leg = True, 0.0, 1
                fault.detail = (f"output in {self.root}" if variant == "local_output" else
                                f"s3fs uploads in parts of {multipart.params['part_size']} bytes")
        shared_memory_before = set(os.listdir("/dev/shm"))
        memory_full = self._has("memory_full")
        if memory_full:  # before any worker makes its first block
            self.services.memory_full_file.touch()
            memory_full.injected, memory_full.t_s, memory_full.leg = True, 0.0, 1
            memory_full.detail = (f"encoder blocks cannot be reserved (ENOSPC) from the start"
                                  f"{' to the end' if memory_full.params['to_the_end'] else ''}")
        cluster = self.suite.shared_cluster
        leftovers = None
        try:
            if cluster is None:
                cluster = ChaosCluster(self.services, self.suite.num_gpu_nodes)
                self.phases["cluster_start_s"] = self.now()
            command = self.suite.workload.command(self.scenario.kind, self.url, cluster.address)
            if self._removal_fault():
                self._old_settings_leg(cluster)
                command.append("--overwrite")
            self.main_leg = len(self.legs) + 1
            planned_legs = len(self.legs) + 1 + sum(action(f) in DRIVER_FAULTS for f in self.scenario.faults)
            while True:
                complete = self._leg(cluster, command, cluster.env, self.scenario.faults)
                if complete:
                    break
                if len(self.legs) >= planned_legs + MAX_EXTRA_LEGS:
                    self.problems.append(f"the job did not complete in {len(self.legs)} legs")
                    break
                # Until an --overwrite leg has removed the old output, readers may see the old settings' files.
                old_gone = not self._removal_fault() or self.engine_events["old_output_removed"]
                problems, seen = check_visible(self.fs, self.root, self.reference if old_gone else None)
                self.checks[f"after_leg_{len(self.legs)}"] = {"problems": problems, **seen}
                self.problems += [f"after leg {len(self.legs)}: {p}" for p in problems]
            storage_stats = self.services.fault_stats()
            self.services.configure_faults({"seed": 0, "rules": {}})
            if self.scenario.storage:
                (self.dir / "storage_faults.json").write_text(json.dumps(storage_stats["events"], indent=1))
            if not any("did not complete" in p for p in self.problems):
                checks_started = self.now()
                problems, facts, self.files = check_final(self.services, self.fs, self.url, self.root,
                                                          self.suite.prompts, self.reference, self.dir,
                                                          self.suite.verify_times)
                self.phases["final_checks_s"] = round(self.now() - checks_started, 2)
                self.checks["final"] = {"problems": problems, **facts}
                self.problems += problems
        except Exception as exc:  # the harness itself failed: a failed run, with the reason
            self.problems.append(f"harness error: {type(exc).__name__}: {exc}")
            storage_stats = {}
        finally:
            self.services.clear_flags()
            if self.pause is not None and self.pause.resumed_at is None:  # the harness failed mid-pause
                _signal(self.pause.first.process.pid, signal.SIGCONT)
            if cluster is not None and cluster is not self.suite.shared_cluster:
                shutdown_started = self.now()
                leftovers = cluster.shutdown(keep_files=self.suite.keep_files or bool(self.problems))
                self.phases["cluster_shutdown_s"] = round(self.now() - shutdown_started, 2)
        self._check_nothing_left(shared_memory_before, leftovers)
        if self.problems:
            self._keep_evidence()
        return {
            "run": self.index, "seed": self.scenario.seed, "kind": self.scenario.kind, "output": self.url,
            "faults": [_fault_record(f) for f in self.scenario.faults],
            "storage": None if not self.scenario.storage else {
                "config": self.scenario.storage, "requests": storage_stats.get("requests"),
                "faults": storage_stats.get("faults"), "num_faults": len(storage_stats.get("events", []))},
            "multipart": storage_stats.get("multipart"),  # multipart requests of the run, by step
            "legs": self.legs, "resumes": len(self.legs) - self.main_leg, "checks": self.checks,
            "engine_events": dict(sorted(self.engine_events.items())),
            "ok": not self.problems, "problems": self.problems, "duration_s": self.now(), "phases": self.phases,
            "ray_tmpdir": str(cluster.ray_tmpdir) if cluster else None,
        }

    def _check_nothing_left(self, shared_memory_before: set[str], leftovers: list[str] | None) -> None:
        """No new psm_* block in /dev/shm (encoder blocks are memory files without a name there), and, once the
        run's own cluster is shut down, none of its processes (encoders included)."""
        shared_memory = new_shared_memory(shared_memory_before)
        self.checks["after_shutdown"] = {"new_shared_memory": shared_memory, "leftover_processes": leftovers}
        if shared_memory:
            self.problems.append(f"new entries in /dev/shm after the run: {shared_memory[:10]}")
        if leftovers:
            self.problems.append(f"{len(leftovers)} processes of the cluster outlived its shutdown by "
                                 f"{LEFTOVER_GRACE_S:.0f}s: {leftovers[:5]}")

    # ----------------------------------------------------------------------------------------------- legs

    def _old_settings_leg(self, cluster: ChaosCluster) -> None:
        """The first leg of an --overwrite run: the job with another --seed, complete or killed after some shards
        (the seed says), checked as a cut-short leg with no reference; the next legs overwrite it."""
        fault = self._removal_fault()
        old = self.suite.workload.command(self.scenario.kind, self.url, cluster.address, seed=OLD_SEED)
        cut = fault.params["old_cut_at"]
        self._leg(cluster, old, cluster.env, [Fault("driver_kill", after_shards=cut)] if cut else [],
                  kind="old settings")
        problems, seen = check_visible(self.fs, self.root, None)
        self.checks["after_old_settings"] = {"problems": problems, **seen}
        self.problems += [f"after the old-settings leg: {p}" for p in problems]

    def _leg(self, cluster: ChaosCluster, command: list[str], env: dict, faults: list[Fault],
             kind: str | None = None) -> bool:
        """Runs one leg: its driver (two at once for a concurrent start), firing the faults that fall due. Returns
        whether the job completed."""
        number = len(self.legs) + 1
        concurrent = number == self.main_leg and kind is None and self._has("concurrent_start") is not None
        drivers = [self._start_driver(command, env, number, i) for i in range(2 if concurrent else 1)]
        if concurrent:
            fault = next(f for f in self.scenario.faults if f.type == "concurrent_start")
            fault.injected, fault.t_s, fault.leg = True, self.now(), number
            fault.detail = f"drivers {drivers[0].process.pid} and {drivers[1].process.pid} started together"
        shards_at_start = low = self._count_markers()  # low: the fewest seen (an --overwrite removes markers)
        files_at_start = _shard_files(self._listing())
        removal_fault = self._removal_fault()
        removal = removal_fault if kind is None and removal_fault and not removal_fault.injected else None
        deadline = time.monotonic() + self.suite.leg_timeout_s
        while any(d.process.poll() is None for d in drivers):
            if time.monotonic() > deadline:
                for driver in drivers:
                    if driver.process.poll() is None:
                        driver.signalled = "timeout"
                        driver.process.kill()
                self.problems.append(f"leg {number} did not end within {self.suite.leg_timeout_s:.0f}s (a hang)")
                break
            names = self._listing()
            shards = sum(bool(_MARKER.fullmatch(name)) for name in names)
            low = min(low, shards)
            for fault in faults:
                if fault.type == "memory_full":
                    self._maybe_end_memory_full(fault, shards, shards > low)
                if fault.injected or fault.type in VARIANTS:
                    continue
                if fault.type in REMOVAL_FAULTS:
                    # overwrite: once markers vanish; driver_pause: once any shard file does (the data files
                    # leave first, moved back to their staging), so that most of the removal is still to come
                    started = shards < shards_at_start if fault.type == "overwrite" else \
                        _shard_files(names) < files_at_start
                    if removal and started:
                        self._fire(fault, cluster, drivers, number, shards, names)
                elif fault.type == "early":
                    if shards == low:  # this leg has committed nothing yet
                        self._maybe_fire_early(fault, shards, cluster, drivers, number)
                else:
                    self._maybe_fire(fault, shards, shards > low, cluster, drivers, number)
            self._bring_nodes_back(cluster)
            self._clear_due_flags()
            if self.pause is not None and self.pause.first in drivers:
                self._advance_pause(command, env, number, drivers)
            time.sleep(0.02 if removal and not removal.injected else POLL_S)  # removal takes a fraction of a second
        for driver in drivers:
            driver.status = driver.process.wait()
        if self.pause is not None and self.pause.first in drivers and self.pause.resumed_at is not None:
            self._advance_pause(command, env, number, drivers)  # both ended within one poll: check the first
        self._bring_nodes_back(cluster, wait=True)
        record = {"leg": number, "kind": kind or ("concurrent start" if concurrent else (
                      "start" if number == self.main_leg else "resume")) + (" --overwrite" if "--overwrite" in command else ""),
                  "shards_at_start": shards_at_start, "shards_at_end": self._count_markers(), "drivers": []}
        for driver in drivers:
            self.engine_events.update(engine_events(driver.log))
            expected = self._expected_statuses(driver, concurrent, number)
            signalled = driver.signalled.type if isinstance(driver.signalled, Fault) else driver.signalled
            record["drivers"].append({"pid": driver.process.pid, "status": driver.status, "expected": expected,
                                      "signalled": signalled, "log": driver.log.name,
                                      "seconds": round(time.monotonic() - driver.started, 1)})
            if driver.status not in expected:
                self.problems.append(f"leg {number}: driver {driver.process.pid} exited {driver.status}, expected "
                                     f"one of {expected}: {_tail(driver.log)}")
            elif driver.status == EXIT_SHARDS_FAILED and not failed_shards_reported(driver.log):
                self.problems.append(f"leg {number}: driver {driver.process.pid} exited 1 without reporting a failed "
                                     f"shard (a crash?): {_tail(driver.log)}")
        if concurrent and all(d.status == EXIT_BAD_INPUT for d in drivers):
            self.problems.append(f"leg {number}: both concurrent drivers were refused; neither ran")
        self.legs.append(record)
        return any(d.status == EXIT_OK for d in drivers)

    def _start_driver(self, command: list[str], env: dict, leg: int, index: int) -> Driver:
        log = self.dir / f"leg{leg}-driver{index}.log"
        handle = open(log, "wb")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=REPO)
        handle.close()
        return Driver(process, log, time.monotonic())

    def _expected_statuses(self, driver: Driver, concurrent: bool, leg: int) -> list[int]:
        if driver.signalled == "timeout":
            return []
        if self.pause is not None and self.pause.refused and driver is self.pause.second:
            return [EXIT_BAD_INPUT]  # it found the first stopped mid-write to the lock, and refused
        if isinstance(driver.signalled, Fault) and action(driver.signalled) == "driver_kill":
            return [-signal.SIGKILL]
        if isinstance(driver.signalled, Fault) and action(driver.signalled) == "driver_pause":
            return [EXIT_OUTPUT_LOST]  # another driver took the output over while it was stopped
        if isinstance(driver.signalled, Fault):  # an interrupt: 0 only if every shard was committed already
            all_committed = driver.signalled.shards_at_fire >= self.suite.num_units
            return [EXIT_INTERRUPTED, EXIT_OK] if all_committed else [EXIT_INTERRUPTED]
        # A try lost to a worker or a storage fault counts against --max-unit-attempts; a unit can run out of
        # them and fail (exit 1), and the next leg redoes it.
        may_fail_tries = self.scenario.storage is not None or any(
            f.injected and f.leg == leg and action(f) in ("worker_kill", "node_loss", "storage_outage",
                                                          "encoder_kill", "encoder_start_fails")
            for f in self.scenario.faults)
        expected = [EXIT_OK, EXIT_SHARDS_FAILED] if may_fail_tries else [EXIT_OK]
        if concurrent:
            expected += [EXIT_BAD_INPUT, EXIT_OUTPUT_LOST]  # refused (locked), or taken over at start-up
        return expected

    def _listing(self) -> list[str]:
        """The names in the output's root now."""
        self.fs.invalidate_cache(self.root)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def _find(self, path: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return self.fs.find(path)
        except FileNotFoundError:
            return []

    def _count_markers(self) -> int:
        return sum(bool(_MARKER.fullmatch(name)) for name in self._listing())

    # ----------------------------------------------------------------------------------------------- faults

    def _maybe_fire(self, fault: Fault, shards: int, leg_progressed: bool, cluster: ChaosCluster,
                    drivers: list[Driver], leg: int) -> None:
        if shards < fault.after_shards or not leg_progressed:
            return
        if fault._due_since is None:
            fault._due_since = time.monotonic()
        if time.monotonic() - fault._due_since < fault.delay_s:
            return
        self._fire(fault, cluster, drivers, leg, shards)

    def _maybe_fire_early(self, fault: Fault, shards: int, cluster: ChaosCluster, drivers: list[Driver],
                          leg: int) -> None:
        """An `early` fault: `delay_s` after a live driver holds the lock (or a worker process runs), while this
        leg has committed nothing yet."""
        if fault._due_since is None:
            started = (any(title.startswith(WORKER_TITLE) for _, title, _ in cluster.workers())
                       if fault.params["when"] == "workers" else self._lock_holder(drivers, by_record=True))
            if not started:
                return
            fault._due_since = time.monotonic()
        if time.monotonic() - fault._due_since >= fault.delay_s:
            self._fire(fault, cluster, drivers, leg, shards)

    def _fire(self, fault: Fault, cluster: ChaosCluster, drivers: list[Driver], leg: int, shards: int,
              names: list[str] | None = None) -> None:
        """Acts the fault out now (unless its target is not there yet: then it stays due)."""
        act = action(fault)
        if act == "storage_outage":
            outage = {key: fault.params[key] for key in ("kinds", "fault", "seconds")}
            self.services.start_outage(outage)
            fault.detail = f"{outage['fault']} on every {'/'.join(outage['kinds'])} request for {outage['seconds']}s"
        elif act in ("encoder_kill", "encoder_start_fails"):
            if not self._kill_an_encoder(fault, cluster):
                return
        elif act == "driver_pause":
            driver = self._lock_holder(drivers)
            if driver is None or not _signal(driver.process.pid, signal.SIGSTOP):
                return
            driver.signalled = fault
            self.pause = Pause(fault, driver, time.monotonic())
            fault.detail = f"SIGSTOP to driver {driver.process.pid}"
        elif act in DRIVER_FAULTS:
            if self.pause is not None and self.pause.resumed_at is None:
                return  # a driver_pause is under way: the second driver must take over before anything hits it
            driver = self._lock_holder(drivers)
            if driver is None:
                return
            sig = signal.SIGKILL if act == "driver_kill" else getattr(signal, fault.params["signal"])
            if sig in _ignored_signals(driver.process.pid):
                raise RuntimeError(f"driver {driver.process.pid} ignores {sig.name}: the harness cannot test it "
                                   "(started from a shell that ignores it, as `nohup ... &` does?)")
            if not _signal(driver.process.pid, sig):
                return
            driver.signalled = fault
            fault.detail = f"{sig.name} to driver {driver.process.pid}"
        else:  # before the first commit, any worker (starting, warming up); later one running a unit
            busy = [(pid, title, node) for pid, title, node in cluster.workers()
                    if ".process" in title or fault.type == "early"]
            if not busy:
                return  # no worker is running a unit now: wait for one
            pid, title, node = random.Random(f"{self.scenario.seed}:{fault.type}:{fault.after_shards}").choice(busy)
            if act == "worker_kill":
                if not _signal(pid, signal.SIGKILL):
                    return
                fault.detail = f"SIGKILL to {title} (pid {pid}) on node {node.node_id[:8]}"
            else:
                graceful = fault.params["graceful"]
                cluster.remove_node(node, graceful=graceful)
                self.node_comebacks.append(time.monotonic() + fault.params["back_after_s"])
                fault.detail = (f"node {node.node_id[:8]} removed ({'graceful' if graceful else 'killed'}) while "
                                f"{title} (pid {pid}) ran on it; a node is added back after "
                                f"{fault.params['back_after_s']}s")
        if names is not None:  # where the removal of the old output was when the fault fired
            fault.detail += (f"; the output had {sum(bool(_MARKER.fullmatch(n)) for n in names)} markers, "
                             f"{sum(bool(_DATA.fullmatch(n)) for n in names)} data files"
                             f"{', _job.json' if '_job.json' in names else ''} left")
        fault.injected, fault.t_s, fault.leg, fault.shards_at_fire = True, self.now(), leg, shards

    def _kill_an_encoder(self, fault: Fault, cluster: ChaosCluster) -> bool:
        """SIGKILL to an image encoder of a worker running a unit, as the OOM killer would. encoder_kill first
        stops the worker's encoders for hold_s, so that they hold tasks when one dies (and resumes the others);
        encoder_start_fails first makes that worker unable to start another (EMFILE) for flag_s."""
        busy = [(pid, title, encoders) for pid, title, _ in cluster.workers()
                if ".process" in title and (encoders := encoders_of(pid))]
        if not busy:
            return False  # no worker is running a unit now, or its encoders are gone: wait
        rng = random.Random(f"{self.scenario.seed}:{fault.type}:{fault.after_shards}")
        pid, title, encoders = rng.choice(busy)
        victim = rng.choice(encoders)
        if fault.type == "encoder_kill":
            stopped = [encoder for encoder in encoders if _signal(encoder, signal.SIGSTOP)]
            started = time.monotonic()
            try:  # hold_s, and longer (up to HOLD_LIMIT_S) until tasks wait unread in the victim's input
                time.sleep(fault.params["hold_s"])
                while not (unread := _unread_input(victim)) and time.monotonic() - started < HOLD_LIMIT_S:
                    time.sleep(0.05)
                killed = _signal(victim, signal.SIGKILL)
            finally:
                for encoder in stopped:
                    if encoder != victim:
                        _signal(encoder, signal.SIGCONT)
            if killed:
                fault.detail = (f"{len(stopped)} encoders of {title} (pid {pid}) stopped for "
                                f"{time.monotonic() - started:.1f}s, then encoder {victim} got SIGKILL with {unread} "
                                f"bytes of tasks unread in its input")
            return killed
        flag = self.services.encoder_start_fails_file
        flag.write_text(str(pid))
        if not _signal(victim, signal.SIGKILL):
            flag.unlink(missing_ok=True)
            return False
        self.flags_off.append((time.monotonic() + fault.params["flag_s"], flag))
        fault.detail = (f"encoder {victim} of {title} (pid {pid}) got SIGKILL; that worker could start no encoder "
                        f"(EMFILE) for {fault.params['flag_s']}s")
        return True

    def _maybe_end_memory_full(self, fault: Fault, shards: int, leg_progressed: bool) -> None:
        """Turns memory_full off once after_shards are committed (and delay_s more), unless it lasts to the end."""
        if fault.params["to_the_end"] or fault.ended_t_s is not None or shards < fault.after_shards \
                or not leg_progressed:
            return
        if fault._due_since is None:
            fault._due_since = time.monotonic()
        if time.monotonic() - fault._due_since >= fault.delay_s:
            self.services.memory_full_file.unlink(missing_ok=True)
            fault.ended_t_s = self.now()
            fault.detail += f"; turned off at {fault.ended_t_s}s, {shards} shards committed"

    def _clear_due_flags(self) -> None:
        for when, flag in list(self.flags_off):
            if time.monotonic() >= when:
                flag.unlink(missing_ok=True)
                self.flags_off.remove((when, flag))

    def _advance_pause(self, command: list[str], env: dict, leg: int, drivers: list[Driver]) -> None:
        """A driver_pause's next step: the second driver starts (second_after_s after the SIGSTOP); once it holds
        the lock, resume_after_s later, the first gets SIGCONT; when the first has exited, nothing that was in the
        output's root as it resumed may be gone: the first must delete nothing more, and the second deletes
        nothing before a worker of its own is up (which the first's workers, holding the GPUs, mostly prevent
        until the first exits; if one was up, what is gone is recorded, not judged)."""
        pause, fault, now = self.pause, self.pause.fault, time.monotonic()
        if pause.second is None:
            if now - pause.stopped_at >= fault.params["second_after_s"]:
                pause.second = self._start_driver(command, env, leg, len(drivers))
                drivers.append(pause.second)
                fault.detail += f"; driver {pause.second.process.pid} started {self.now()}s into the run"
            return
        if pause.resumed_at is None:
            holder = self._lock_holder(drivers, by_record=True)
            if holder is not None and holder is not pause.first and pause.taker is None:
                pause.taker, pause.ready_at = holder, now + fault.params["resume_after_s"]
                if holder is not pause.second:
                    fault.detail += f"; driver {holder.process.pid} (a concurrent start's) took the output over"
            given_up = now - pause.stopped_at > PAUSE_LIMIT_S or (pause.taker is None and
                                                                  pause.second.process.poll() is not None)
            if not (given_up or (pause.ready_at is not None and now >= pause.ready_at)):
                return
            pause.refused = pause.second.process.poll() == EXIT_BAD_INPUT and STOPPED_WRITER_LINE in \
                pause.second.log.read_text(errors="replace")
            if pause.refused:  # the first was stopped holding the lock's guard (local disk): it keeps the output
                pause.first.signalled = None
                fault.detail += "; the second refused: the first was stopped holding the lock's guard"
            elif pause.ready_at is None:
                self.problems.append(f"driver_pause: the second driver {pause.second.process.pid} had not taken "
                                     f"the output over when the first was resumed, "
                                     f"{now - pause.stopped_at:.0f}s after its SIGSTOP")
            pause.names_at_resume = set(self._listing())
            _signal(pause.first.process.pid, signal.SIGCONT)
            pause.resumed_at = now
            fault.detail += (f"; SIGCONT after {now - pause.stopped_at:.1f}s stopped "
                             f"({'the second had taken over' if pause.ready_at else 'no takeover seen'})")
            return
        if not pause.checked and pause.first.process.poll() is not None:
            pause.checked = True
            gone = sorted(name for name in pause.names_at_resume - set(self._listing())
                          if _MARKER.fullmatch(name) or _DATA.fullmatch(name) or name == "_job.json")
            # A move back to the staging that was under way when the driver stopped (copied, not yet deleted)
            # ends on waking: pipeline/README.md leaves these open, one per thread; any other file gone is a deletion.
            staged = {path.rsplit("/", 1)[-1] for path in self._find(f"{self.root}/{STAGING_DIR}")}
            moved = [name for name in gone if name in staged]
            deleted = [name for name in gone if name not in staged]
            taker_has_workers = SHARD_WORKER_LINE in (pause.taker or pause.second).log.read_text(errors="replace")
            fault.detail += (f"; the first exited {now - pause.resumed_at:.1f}s after it resumed; meanwhile "
                             f"{len(moved)} moves to the staging ended, {len(deleted)} files were deleted"
                             f"{' (the taker had workers up: not judged)' if taker_has_workers and gone else ''}")
            if taker_has_workers or pause.refused:  # the first goes on with its own removal: nothing to judge
                return
            if deleted:
                self.problems.append(f"driver_pause: after driver {pause.first.process.pid} resumed, {len(deleted)} "
                                     f"files of the output were deleted before it exited: {deleted[:10]}")
            if len(moved) > IN_FLIGHT_MOVES_LIMIT:
                self.problems.append(f"driver_pause: after driver {pause.first.process.pid} resumed, {len(moved)} "
                                     f"files were moved to the staging, more than the {IN_FLIGHT_MOVES_LIMIT} "
                                     f"moves that can have been under way: {moved[:10]}")

    def _lock_holder(self, drivers: list[Driver], by_record: bool = False) -> Driver | None:
        """The live driver that holds the output's lock (or the only live one, unless `by_record`)."""
        alive = [d for d in drivers if d.process.poll() is None and d.signalled is None]
        if len(alive) <= 1 and not by_record:
            return alive[0] if alive else None
        try:
            self.fs.invalidate_cache(self.root)
            record = json.loads(self.fs.cat_file(f"{self.root}/_job.lock"))
        except (FileNotFoundError, ValueError):
            return None
        if record.get("state") == "released":
            return None
        return next((d for d in alive if d.process.pid == record.get("pid")), None)

    def _bring_nodes_back(self, cluster: ChaosCluster, wait: bool = False) -> None:
        for when in sorted(self.node_comebacks):
            if wait or time.monotonic() >= when:
                cluster.add_gpu_node()
                self.node_comebacks.remove(when)

    def _keep_evidence(self) -> None:
        """The output's listing and every marker and lock, beside the driver logs, for the diagnosis."""
        fs = self.fs
        try:
            fs.invalidate_cache()
            listing = sorted(fs.find(self.root))
            (self.dir / "listing.txt").write_text("\n".join(listing) + "\n")
            for path in listing:
                if path.endswith((".stats.json", "_job.json", "_job.lock")):
                    target = self.dir / "output" / path[len(self.root) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(fs.cat_file(path))
        except Exception as exc:
            (self.dir / "listing.txt").write_text(f"could not list the output: {exc}\n")

    def clean_up(self) -> None:
        """A passed run leaves nothing: its output in the S3 server's memory, its logs."""
        if self.suite.keep_files:
            return
        try:
            self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _fault_record(fault: Fault) -> dict:
    record = {k: v for k, v in asdict(fault).items() if not k.startswith("_")}
    if fault.type in VARIANTS or fault.type in REMOVAL_FAULTS:
        record.pop("after_shards"), record.pop("delay_s")
    return record


def failed_shards_reported(log: Path) -> bool:
    """Whether the driver's summary table lists failed shards: what exit status 1 must mean, not a crash."""
    found = re.search(r"^shards_failed\s+(\d+)\s*$", log.read_text(errors="replace"), re.MULTILINE)
    return bool(found and int(found.group(1)) > 0)


def engine_events(log: Path) -> collections.Counter:
    counts = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        counts.update(name for name, pattern in ENGINE_EVENTS.items() if pattern.search(line))
    return counts


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])[-1500:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------- the suite


def reference_run(kind: str, suite: Suite) -> tuple[dict, dict[str, bytes]]:
    """The fault-free run of `kind` that every faulty run is compared with; it must pass every other check."""
    run = Run(-1, Scenario(seed=0, kind=kind, faults=[], storage=None), suite, None, name=f"reference-{kind}")
    record = run.execute()
    record["run"] = f"reference-{kind}"
    if not record["ok"]:
        raise SystemExit(f"the fault-free reference run of {kind} failed: {record['problems']}; see {run.dir}")
    run.clean_up()
    return record, run.files


def summarize(records: list[dict], started: float, shared_leftovers: list[str] | None = None) -> dict:
    injected = collections.Counter(f["type"] for r in records for f in r["faults"] if f["injected"])
    planned = collections.Counter(f["type"] for r in records for f in r["faults"])
    storage = collections.Counter()
    for record in records:
        if record["storage"]:
            storage.update(record["storage"]["faults"] or {})
    statuses = collections.Counter(str(d["status"]) for r in records for leg in r["legs"] for d in leg["drivers"])
    events = collections.Counter()
    for record in records:
        events.update(record["engine_events"])
    return {
        "summary": True, "runs": len(records), "passed": sum(r["ok"] for r in records),
        "failed": [{"run": r["run"], "seed": r["seed"], "problems": r["problems"]} for r in records if not r["ok"]],
        "faults_planned": dict(planned), "faults_injected": dict(injected),
        "faults_not_injected": dict(planned - injected),  # the job ended before their moment came
        "runs_with_storage_faults": sum(bool(r["storage"]) for r in records),
        "storage_faults_injected": dict(sorted(storage.items())), "storage_faults_total": sum(storage.values()),
        "driver_exit_statuses": dict(statuses), "resumes": sum(r["resumes"] for r in records),
        "multipart_requests": dict(sum((collections.Counter(r["multipart"] or {}) for r in records),
                                       collections.Counter())),
        "runs_with_multipart_uploads": sum(bool((r["multipart"] or {}).get("complete")) for r in records),
        "engine_events": dict(sorted(events.items())),
        "verify_exit_statuses": dict(collections.Counter(
            str(status) for r in records for status in r["checks"].get("final", {}).get("verify_exits", []))),
        "runs_with_new_shared_memory": sum(bool(r["checks"]["after_shutdown"]["new_shared_memory"]) for r in records),
        "runs_with_leftover_processes": sum(bool(r["checks"]["after_shutdown"]["leftover_processes"])
                                            for r in records),
        "leftover_processes_after_shared_cluster": shared_leftovers,
        "runs_with_engine_event": dict(sorted(collections.Counter(
            name for r in records for name in r["engine_events"]).items())),
        "duration_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="faulty runs")
    parser.add_argument("--seed", type=int, default=1, help="run i gets the seed (seed * 1000 + i)")
    parser.add_argument("--prompts", type=int, default=2000, help="prompts in the job (two input files)")
    parser.add_argument("--rows-per-shard", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpu-nodes", type=int, default=2, help="cluster nodes with one logical GPU each")
    parser.add_argument("--kinds", default=",".join(JOB_KINDS), help="job kinds the seeds choose from")
    parser.add_argument("--faults", default=",".join(DEFAULT_FAULTS), help=f"fault types the seeds choose from, "
                        f"of {', '.join(FAULT_TYPES)}")
    parser.add_argument("--always", default="", help="fault types every run injects (besides those chosen)")
    parser.add_argument("--part-sizes", default="32768,131072",
                        help="part sizes in bytes that `multipart` runs choose from (s3fs uploads in parts above twice)")
    parser.add_argument("--storage-rules", dest="storage_config", type=json.loads,
                        help="the proxy's rules for runs with storage faults, as JSON, instead of the seed's choice")
    parser.add_argument("--verify-times", type=int, default=VERIFY_TIMES,
                        help="verify runs on each finished output, each of which must pass")
    parser.add_argument("--leg-timeout", type=float, default=900.0, help="seconds a leg may take (more is a hang)")
    parser.add_argument("--workdir", help="logs, models and Ray's files (default: a new folder under /tmp)")
    parser.add_argument("--out", default="out/chaos/runs.jsonl", help="JSON lines: one per run, then a summary")
    parser.add_argument("--keep", action="store_true", help="keep passed runs' logs, outputs and Ray files too")
    parser.add_argument("--shared-cluster", action="store_true",
                        help="one cluster for every run (faster; the default gives each run a fresh one)")
    args = parser.parse_args(argv)
    for name in ("kinds", "faults", "always"):
        values = tuple(v for v in getattr(args, name).split(",") if v)
        allowed = JOB_KINDS if name == "kinds" else FAULT_TYPES
        if any(v not in allowed for v in values) or (name != "always" and not values):
            parser.error(f"--{name} takes a comma-separated list of {allowed}")
        setattr(args, name, values)
    try:
        args.part_sizes = tuple(int(size) for size in args.part_sizes.split(","))
    except ValueError:
        parser.error("--part-sizes takes a comma-separated list of byte counts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A shell's `cmd &` (and nohup) starts us ignoring SIGINT, and the drivers would inherit that and ignore the
    # interrupts the suite sends them. A handled signal is reset to the default at exec: the drivers get Python's.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jobs.tiny import build_tiny_models

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.prompts, args.rows_per_shard, args.batch_size, workdir / "models")
    build_tiny_models(workload.models)
    services = Services(workdir)
    records, suite = [], None
    try:
        prompts, num_units = workload.upload(services.fs)
        suite = Suite(services, workload, workdir, prompts, num_units, args.gpu_nodes, args.leg_timeout, args.keep,
                      ChaosCluster(services, args.gpu_nodes) if args.shared_cluster else None, args.verify_times)
        scenarios = [Scenario.from_seed(args.seed * 1000 + i, num_units, args.kinds, args.faults, args.always,
                                        args.storage_config, args.part_sizes) for i in range(args.runs)]
        with out.open("a") as sink:
            header = {"invocation": " ".join([Path(sys.executable).name, *sys.argv]),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "workdir": str(workdir),
                      "prompts": args.prompts, "units": num_units, "gpu_nodes": args.gpu_nodes}
            sink.write(json.dumps(header) + "\n")
            references = {}
            for kind in sorted({scenario.kind for scenario in scenarios}):
                record, references[kind] = reference_run(kind, suite)
                print(f"reference {kind}: {record['duration_s']}s, {record['checks']['final']['samples']} samples",
                      flush=True)
                sink.write(json.dumps(record) + "\n")
            for i, scenario in enumerate(scenarios):
                run = Run(i, scenario, suite, references[scenario.kind])
                record = run.execute()
                records.append(record)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                fired = ", ".join(f"{f['type']}@{f['t_s']}s" for f in record["faults"] if f["injected"])
                storage = record["storage"]["num_faults"] if record["storage"] else 0
                print(f"run {i} seed {scenario.seed} {scenario.kind}: {'ok' if record['ok'] else 'FAILED'} in "
                      f"{record['duration_s']}s; faults: {fired or 'none fired'}; storage faults: {storage}; "
                      f"exits: {[[d['status'] for d in leg['drivers']] for leg in record['legs']]}", flush=True)
                for problem in record["problems"]:
                    print(f"    PROBLEM {problem}", flush=True)
                if record["ok"]:
                    run.clean_up()
            shared_leftovers = None  # a shared cluster's processes are checked once, after its shutdown
            if suite.shared_cluster is not None:
                cluster, suite.shared_cluster = suite.shared_cluster, None
                shared_leftovers = cluster.shutdown(keep_files=args.keep or any(not r["ok"] for r in records))
            summary = summarize(records, started, shared_leftovers)
            sink.write(json.dumps(summary) + "\n")
    finally:
        if suite is not None and suite.shared_cluster is not None:
            suite.shared_cluster.shutdown(keep_files=True)
        services.stop()
    print(json.dumps(summary, indent=1))
    return 0 if summary["passed"] == summary["runs"] and not shared_leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
