"""The output lock: at most one live job per output, built on the store's own conditional writes.

`_job.lock` holds the owner's token, host, pid and a sequence number that every heartbeat raises. It is
created only if absent, and replaced only if unchanged since it was read (ETag, generation or a digest of the
bytes), so two jobs that start at once cannot both win, a heartbeat cannot overwrite a takeover, and a release
cannot touch another job's lock. A lock is stale when its holder has not changed it for its lease, measured on
the reader's clock from the last change it saw; the writer's clock is never trusted. A released lock stays as a
file whose state is `released`, which the next job takes at once. A lock whose holder ran on this machine (same
boot, same PID namespace) and whose process is gone is watched only briefly: a driver killed and run again on
one host (a laptop, a Ray head) resumes after a short grace instead of the whole lease.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from contextlib import contextmanager
from typing import Callable, Iterator

import fsspec

from pipeline import storage
from pipeline.storage import ConditionalStore, GuardHeld, OutputError, PreconditionFailed, conditional_store, \
    is_transient

log = logging.getLogger(__name__)

LOCK_NAME = "_job.lock"
DEFAULT_LEASE_S = 120.0
REFRESHES_PER_LEASE = 8  # a live holder changes the lock this often per lease, so a watcher sees it quickly
# A holder that exited on this machine is taken over after this much instead of its lease: time for Ray to stop
# that driver's actors (3.4 s measured for a local Ray on a loaded 2-core machine); any try of theirs that still
# commits is fenced (same lineage and spec: the same bytes) and finished by the new job.
EXITED_HOLDER_GRACE_S = 15.0


class OutputLockedError(OutputError):
    """Another live job holds the output."""


class OutputLostError(OutputError):
    """This job no longer holds the output: another job took it over. The job stops at once (exit 4)."""


@dataclass
class LockRecord:
    token: str
    host: str
    pid: int
    started: str
    heartbeat: float  # the writer's clock: shown to people, never used to judge staleness
    seq: int
    lease_s: float
    state: str = "held"  # "held" or "released"
    machine: str = ""  # boot and PID namespace of the holder; "" where unknown (then only the lease decides)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=2).encode()

    @classmethod
    def parse(cls, data: bytes, path: str) -> "LockRecord":
        try:
            record = cls(**json.loads(data))
        except (ValueError, TypeError):  # not JSON, not UTF-8, or other fields
            raise OutputError(
                f"{path} is not a lock file written by this tool; delete it if no job is using the output"
            ) from None
        return record

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


class OutputLock:
    """One job's hold on an output: acquire, refresh within the lease, release."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if lease_s <= 0:
            raise ValueError(f"lock lease must be positive, got {lease_s!r}")
        self.path = posixpath.join(root.rstrip("/"), LOCK_NAME)
        self.root = root
        self.store: ConditionalStore = conditional_store(fs)
        self.lease_s = lease_s
        self.clock, self.sleep = clock, sleep
        now = time.time()
        self.record = LockRecord(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            heartbeat=now,
            seq=0,
            lease_s=lease_s,
            machine=machine_id(),
        )
        self._version: str | None = None
        self._writing = threading.Lock()  # the lease keeper's thread and the driver's both write it
        self.took_over = False  # acquired from a job that had stopped renewing it (the job's metrics count it)

    @property
    def token(self) -> str:
        return self.record.token

    @property
    def refresh_interval_s(self) -> float:
        return self.lease_s / REFRESHES_PER_LEASE

    def acquire(self) -> None:
        """Take the lock, or raise OutputLockedError if a live job holds it (seen changing within its lease)."""
        while True:
            try:
                self._version = self.store.create(self.path, self.record.to_bytes())
                return
            except PreconditionFailed:
                pass
            try:
                data, version = self.store.read(self.path)
            except FileNotFoundError:
                continue
            held = LockRecord.parse(data, self.path)
            if held.token == self.token:  # our create landed but its answer was lost
                self._version = version
                return
            if held.state != "released":
                exited = self._holder_gone(held)
                watch_s = min(held.lease_s, EXITED_HOLDER_GRACE_S) if exited else held.lease_s
                version = self._wait_until_stale(held, version, watch_s)
                if version is None:
                    continue  # it changed: look again (released, deleted or taken by someone else)
                log.warning("taking over %s: its holder (%s) %s", self.path, held.describe(),
                            "ran on this machine and has exited" if exited else
                            f"has not renewed it for {held.lease_s:.0f}s")
            try:
                self._version = self.store.replace(self.path, self.record.to_bytes(), version,
                                                   guard_wait_s=storage.GUARD_WAIT_S)
                self.took_over = held.state != "released"
                return
            except PreconditionFailed:
                continue  # another starter changed it first; judge again what is there now
            except GuardHeld:  # a process stopped holding the guard (a lock write, a fenced change): it lands on waking
                raise OutputLockedError(
                    f"{self.root} is in use: a process is stopped or hung in the middle of writing its lock or a "
                    f"change that the lock fences (the lock names {held.describe()}). Wait for it to finish, or use "
                    "another output."
                ) from None

    def _holder_gone(self, held: LockRecord) -> bool:
        """True only when the holder ran where its pid means the same process as here, and no such process
        lives (or it is a zombie); anything uncertain is left to the lease."""
        if not held.machine or held.machine != self.record.machine:
            return False
        try:
            with open(f"/proc/{held.pid}/stat") as stat:
                return stat.read().rpartition(")")[2].split()[0] == "Z"
        except FileNotFoundError:
            return True
        except (OSError, IndexError):
            return False

    def _wait_until_stale(self, held: LockRecord, version: str, watch_s: float) -> str | None:
        """Watches a held lock for watch_s. Returns its version if it never changed (stale), None if it
        changed to released or vanished; raises OutputLockedError if its holder renewed it (alive)."""
        log.info("%s is held by %s; watching it for up to %.0fs to see whether that job is alive",
                 self.root, held.describe(), watch_s)
        deadline = self.clock() + watch_s
        poll_s = min(1.0, watch_s / 20)
        while self.clock() < deadline:
            self.sleep(poll_s)
            try:
                data, now_version = self.store.read(self.path)
            except FileNotFoundError:
                return None
            if now_version == version:
                continue
            current = LockRecord.parse(data, self.path)
            if current.state == "released":
                return None
            raise OutputLockedError(
                f"{self.root} is in use by another job ({current.describe()}), which renewed its lock just now. "
                "Wait for it to finish, or use another output."
            )
        return version

    @contextmanager
    def fenced(self, read_again: Callable[[Exception], bool] = lambda exc: False) -> Iterator[None]:
        """`with lock.fenced(): change the output`: raises OutputLostError, before the change, unless the lock
        still names this job, and where the store has a guard (a local or shared disk) holds it through the
        change. No takeover lands meanwhile, so a change checked before this process was stopped (SIGSTOP, a
        suspended VM) cannot land after another job took the output over: that job's takeover waits
        GUARD_WAIT_S for the guard, then refuses. On an object store a request already sent still lands.
        `read_again(error)` says whether a failed read of the lock is tried again."""
        with self.store.guarded(self.path):
            while True:
                try:
                    data, _ = self.store.read(self.path)
                    break
                except FileNotFoundError:
                    raise OutputLostError(f"{self.path} was deleted while this job held it") from None
                except Exception as exc:
                    if not read_again(exc):
                        raise
            try:
                held = LockRecord.parse(data, self.path)
            except OutputError:  # not a lock of this tool any more: not this job's
                raise OutputLostError(self._lost_message(data)) from None
            if held.token != self.token or held.state == "released":
                raise OutputLostError(self._lost_message(data))
            yield

    def refresh(self) -> None:
        """Renew the lease; raises OutputLostError if another job took the lock."""
        self._write(self.record.state)

    def release(self) -> None:
        """Mark the lock released, if it is still ours; never touches another job's lock."""
        try:
            self._write("released")
        except OutputLostError as exc:
            log.warning("not releasing %s: %s", self.path, exc)

    def _write(self, state: str) -> None:
        with self._writing:
            self._write_unlocked(state)

    def _write_unlocked(self, state: str) -> None:
        if self._version is None:
            raise RuntimeError("the lock was never acquired")
        record = LockRecord(**{**asdict(self.record), "seq": self.record.seq + 1, "heartbeat": time.time(),
                               "state": state})
        try:
            try:
                self._version = self.store.replace(self.path, record.to_bytes(), self._version)
            except PreconditionFailed:
                data, version = self.store.read(self.path)  # was it our own write, whose answer was lost?
                if LockRecord.parse(data, self.path) != record:
                    raise OutputLostError(self._lost_message(data)) from None
                self._version = version
        except FileNotFoundError:
            raise OutputLostError(f"{self.path} was deleted while this job held it") from None
        self.record = record

    def _lost_message(self, data: bytes) -> str:
        try:
            other = LockRecord.parse(data, self.path).describe()
        except OutputError:
            other = "a file this tool did not write"
        return f"lost the lock on {self.root} to another job ({other}); this job stops without writing more"


class LeaseKeeper:
    """Renews a held lock from a thread of its own, from acquire to release, whatever the driver is doing
    (listing a large output, starting Ray, recovering, deleting for --overwrite, stopping workers).

    A storage outage is ridden out: failed renewals are retried until the lease would run out, counted from the
    last renewal that landed (no other job can judge the lock stale before then). Only then, or when another
    job has taken the lock, is the output given up: `error` is set, `on_lost` is called, and `check()` raises
    the error in the driver.

    `check()` does not trust the thread alone: a driver paused past its lease (a long GC, a suspended VM) may
    wake and go on deleting before that thread runs again. When the last renewal that landed is older than two
    renewal intervals on the monotonic clock, `check()` renews the lease itself first; if the store says another
    job holds the lock, or the renewal fails once the lease would run out, the output is given up there and then.
    A renewal counts from when it was sent, not from its answer: a pause between the two (the answer read after
    the driver woke) must not make an old renewal look new.
    """

    def __init__(self, lock: OutputLock, clock: Callable[[], float] = time.monotonic, retry_s: float = 1.0,
                 on_lost: Callable[[], None] = lambda: None):
        self.lock, self.clock, self.retry_s, self.on_lost = lock, clock, retry_s, on_lost
        self.on_renewed: Callable[[], None] = lambda: None  # after each renewal that landed (the job's metrics)
        self.error: OutputLostError | None = None
        self.renewed_at = clock()
        self._confirming = threading.Lock()  # several of the driver's threads may check at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> "LeaseKeeper":
        """Renews once before the thread starts, so that the lease is dated from a renewal sent now: a driver
        paused between acquire's answer and this call must not take an old acquire for a fresh lease."""
        self.renewed_at = self.clock()
        self._renew_now()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lock.lease_s)

    def check(self) -> None:
        """Raises OutputLostError once the lock is lost or could not be renewed within its lease, renewing it
        first where the thread has not done so for two intervals (this process was paused, or storage is down)."""
        if self.error is None and self._unrenewed_s() >= 2 * self.lock.refresh_interval_s:
            with self._confirming:
                if self.error is None and self._unrenewed_s() >= 2 * self.lock.refresh_interval_s:
                    self._renew_now()
        if self.error is not None:
            raise self.error

    @contextmanager
    def holding(self) -> Iterator[None]:
        """`with keeper.holding(): change the output`: `check()`, then the change under the lock's fence
        (`OutputLock.fenced`). A lock found taken there is given up as the thread would give it up."""
        self.check()
        try:
            with self.lock.fenced(self._read_again):
                yield
        except OutputLostError as exc:
            if self.error is None:
                self.error = exc
            raise

    def _read_again(self, exc: Exception) -> bool:
        """After a failed read of the lock by `holding`: a storage outage is ridden out as the renewals ride it out,
        until the lease would run out (then the output is given up, OutputLostError)."""
        if is_transient(exc) and not self._give_up_unless_time_left(exc):
            time.sleep(self.retry_s)
            return True
        if self.error is not None:
            raise self.error from None
        return False

    def _unrenewed_s(self) -> float:
        return self.clock() - self.renewed_at

    def _renew_now(self) -> None:
        sent_at = self.clock()
        try:
            self.lock.refresh()
        except OutputLostError as exc:
            self.error = exc
            return
        except Exception as exc:
            self._give_up_unless_time_left(exc)
            return
        self.renewed_at = sent_at
        self.on_renewed()

    def _run(self) -> None:
        self._renew()
        if self.error is not None:
            log.error("%s", self.error)
            self.on_lost()  # e.g. interrupt a main thread that never looks at check()

    def _renew(self) -> None:
        wait_s = self.lock.refresh_interval_s
        while not self._stop.wait(wait_s):
            try:
                sent_at = self.clock()
                self.lock.refresh()
                self.renewed_at, wait_s = sent_at, self.lock.refresh_interval_s
                self.on_renewed()
            except OutputLostError as exc:
                self.error = exc
                return
            except Exception as exc:  # storage unreachable: try again until the lease would run out
                if self._give_up_unless_time_left(exc):
                    return
                log.warning("renewing the lock on %s failed (%s: %s); retrying, %.0fs of its lease left",
                            self.lock.root, type(exc).__name__, exc, self.lock.lease_s - self._unrenewed_s())
                wait_s = self.retry_s

    def _give_up_unless_time_left(self, exc: Exception) -> bool:
        """After a failed renewal: gives the output up (sets `error`, returns True) unless the failure is transient
        and the lease leaves time for another try before any other job may judge the lock stale."""
        unrenewed_s = self._unrenewed_s()
        if is_transient(exc) and unrenewed_s + self.retry_s < self.lock.lease_s - self.lock.refresh_interval_s:
            return False
        self.error = OutputLostError(
            f"could not renew the lock on {self.lock.root} for {unrenewed_s:.0f}s "
            f"({type(exc).__name__}: {exc}); stopping before another job may take the output over")
        return True


def machine_id() -> str:
    """This machine's boot id and PID namespace: two processes that share both see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def lock_holder(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The token of the job holding the output now, or None: what a worker checks before it commits."""
    path = posixpath.join(root.rstrip("/"), LOCK_NAME)
    try:
        data, _ = conditional_store(fs).read(path)
    except FileNotFoundError:
        return None
    record = LockRecord.parse(data, path)
    return record.token if record.state == "held" else None
