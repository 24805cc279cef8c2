"""Output commit protocol, job manifest and output lock.

A shard's files are written first and its marker NNNNN.stats.json last; a shard without a
marker does not exist, so a crash mid-shard leaves nothing a resumed job would trust.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from datetime import datetime, timezone

import fsspec

from pipeline.plan import shard_name
from pipeline.storage import get_bytes, put_atomic, with_retries

log = logging.getLogger(__name__)

MANIFEST_NAME = "_job.json"
LOCK_NAME = "_job.lock"
LOCK_LEASE_S = 120  # a lock whose heartbeat is older than this is stale
LOCK_SETTLE_S = 1.0  # wait after writing the lock before checking that we still hold it
OUTPUT_DIRS = ("", "images", "pairs")  # root and the subfolders shards write to

_MARKER = re.compile(r"(\d{5,})\.stats\.json")
_TMP = r"(\.tmp-[0-9a-f]{32})?"  # leftovers of interrupted local writes, see storage.put_atomic
_SHARD_FILE = re.compile(rf"\d{{5,}}\.(tar|parquet|stats\.json){_TMP}")
_JOB_FILE = re.compile(rf"_job\.json{_TMP}|_job\.lock\.tmp-[0-9a-f]{{32}}")
_LOCK_FIELDS = ("host", "pid", "token", "started", "heartbeat")


class OutputError(RuntimeError):
    """The output location cannot be used by this job."""


class SpecMismatchError(OutputError):
    """The output holds a job with different settings or inputs."""


class OutputLockedError(OutputError):
    """Another live job is writing to the output."""


def _join(root: str, name: str) -> str:
    return posixpath.join(root.rstrip("/"), name) if name else root


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=2).encode()


def _list(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    fs.invalidate_cache(folder)  # a cached listing would hide shards committed since
    try:
        return with_retries(fs.ls, folder, detail=False, what=f"list {folder}")
    except FileNotFoundError:
        return []


class ShardStore:
    """Committed shards under an output root."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.root = root

    def _marker(self, unit_id: int) -> str:
        return _join(self.root, f"{shard_name(unit_id)}.stats.json")

    def committed(self) -> set[int]:
        """Ids of units whose marker exists, from one listing of the root."""
        matches = (_MARKER.fullmatch(posixpath.basename(p)) for p in _list(self.fs, self.root))
        return {int(m.group(1)) for m in matches if m}

    def commit(self, unit_id: int, files: dict[str, bytes], stats: dict) -> None:
        """Write a shard's files (paths relative to the root), then its marker."""
        for name in sorted(files):
            put_atomic(self.fs, _join(self.root, name), files[name])
        put_atomic(self.fs, self._marker(unit_id), _json_bytes(stats))

    def read_stats(self, unit_id: int) -> dict:
        return json.loads(get_bytes(self.fs, self._marker(unit_id)))

    def remove_outputs(self) -> None:
        """Delete this engine's shard files and manifest, never other files (for --overwrite).

        Markers and the manifest go first, so an interrupted removal never leaves a marker
        whose data is gone. The lock stays: the caller holds it while starting over.
        """
        doomed = []
        for sub in OUTPUT_DIRS:
            for path in _list(self.fs, _join(self.root, sub)):
                name = posixpath.basename(path)
                if _SHARD_FILE.fullmatch(name) or (not sub and _JOB_FILE.fullmatch(name)):
                    doomed.append(path)
        first = [p for p in doomed if p.endswith((".stats.json", MANIFEST_NAME))]
        rest = [p for p in doomed if not p.endswith((".stats.json", MANIFEST_NAME))]
        for batch in (first, rest):
            if batch:
                with_retries(self.fs.rm, batch, what=f"delete {len(batch)} old output files in {self.root}")
        log.info("removed %d old output files from %s", len(doomed), self.root)


def committed_shards(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """Every committed shard of an output, by unit id, with its marker (stats; `files` lists its data files
    relative to the root). Readers of an output use this instead of globbing its data files."""
    store = ShardStore(fs, root)
    return {unit_id: store.read_stats(unit_id) for unit_id in sorted(store.committed())}


def job_manifest(spec_identity: dict, inputs: list[dict]) -> dict:
    """The manifest check_compatible compares against; callers may add informational keys."""
    return {"spec": spec_identity, "inputs": inputs}


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    path = _join(root, MANIFEST_NAME)
    try:
        return json.loads(get_bytes(fs, path))
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or not UTF-8
        raise OutputError(f"{path} is not valid JSON ({e}); pass --overwrite to start over") from None


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> None:
    put_atomic(fs, _join(root, MANIFEST_NAME), _json_bytes(manifest))


def check_compatible(existing: dict, spec_identity: dict, inputs: list[dict]) -> None:
    """Raise SpecMismatchError unless resuming `existing` with this spec and these inputs is safe."""
    old = existing.get("spec", {})
    new = json.loads(json.dumps(spec_identity))  # compare as stored: tuples become lists
    problems = [
        f"  {field}: {_shown(old, field)} -> {_shown(new, field)}"
        for field in sorted(set(old) | set(new))
        if field not in old or field not in new or old[field] != new[field]
    ]
    changed = _changed_inputs(existing.get("inputs", []), inputs)
    if changed:
        shown = ", ".join(changed[:10]) + (f", and {len(changed) - 10} more" if len(changed) > 10 else "")
        problems.append(f"  input files changed since the job started: {shown}")
    if problems:
        raise SpecMismatchError(
            "the output holds a job with different settings:\n" + "\n".join(problems)
            + "\nPass --overwrite to start over there, or use another output location."
        )


def _shown(values: dict, field: str) -> str:
    return repr(values[field]) if field in values else "(unset)"


def _changed_inputs(old: list[dict], new: list[dict]) -> list[str]:
    before = {f["path"]: f for f in old}
    after = {f["path"]: f for f in new}
    changes = [f"{p} (removed)" for p in sorted(before.keys() - after.keys())]
    for path, f in sorted(after.items()):
        if path not in before:
            changes.append(f"{path} (added)")
            continue
        diffs = [f"{k} {before[path].get(k)} -> {f.get(k)}" for k in ("size", "etag", "mtime")
                 if before[path].get(k) != f.get(k)]
        if diffs:
            changes.append(f"{path} ({', '.join(diffs)})")
    return changes


def acquire_lock(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Take the output's lock, or raise OutputLockedError if a live job holds it. Returns our token."""
    path = _join(root, LOCK_NAME)
    held = _read_lock(fs, path)
    if held is not None:
        if not _is_stale(held):
            raise OutputLockedError(_locked_message(root, held))
        log.warning("taking over stale lock %s (host %s, pid %s, started %s)",
                    path, held["host"], held["pid"], held["started"])
    now = time.time()
    token = uuid.uuid4().hex
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": token,
        "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "heartbeat": now,
    }
    put_atomic(fs, path, _json_bytes(owner))
    # Object stores have no exclusive create: a job that raced us may overwrite the lock; the last writer wins.
    time.sleep(LOCK_SETTLE_S)
    held = _read_lock(fs, path)
    if held is None:
        raise OutputLockedError(f"{path} vanished right after we wrote it; is another job starting on {root}?")
    if held["token"] != token:
        raise OutputLockedError(_locked_message(root, held))
    return token


def refresh_lock(fs: fsspec.AbstractFileSystem, root: str, token: str) -> None:
    """Renew our lock's heartbeat; raise OutputLockedError if another job took it."""
    path = _join(root, LOCK_NAME)
    held = _read_lock(fs, path)
    if held is None or held["token"] != token:
        raise OutputLockedError(f"lost the lock on {root}; another job may be writing there")
    put_atomic(fs, path, _json_bytes({**held, "heartbeat": time.time()}))


def release_lock(fs: fsspec.AbstractFileSystem, root: str, token: str) -> None:
    """Delete the lock if it is still ours."""
    path = _join(root, LOCK_NAME)
    held = _read_lock(fs, path)
    if held is None or held["token"] != token:
        log.warning("not releasing %s: it is no longer ours", path)
        return
    with_retries(fs.rm, path, what=f"delete {path}")


def _read_lock(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        held = json.loads(get_bytes(fs, path))
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, or not UTF-8
        held = None
    if not isinstance(held, dict) or any(k not in held for k in _LOCK_FIELDS):
        raise OutputError(f"{path} is not a lock file written by this tool; delete it if no job is using the output")
    return held


def _is_stale(held: dict) -> bool:
    if held["host"] == socket.gethostname() and not _pid_alive(int(held["pid"])):
        return True
    return time.time() - float(held["heartbeat"]) > LOCK_LEASE_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _locked_message(root: str, held: dict) -> str:
    age = time.time() - float(held["heartbeat"])
    return (
        f"{root} is in use by another job (host {held['host']}, pid {held['pid']}, started {held['started']}, "
        f"last heartbeat {age:.0f}s ago). Wait for it to finish or use another output; a lock is taken "
        f"over once its heartbeat is {LOCK_LEASE_S}s old or its process on this host has exited."
    )
