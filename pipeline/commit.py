"""Shard commits with fencing, and the job manifest that says which commits count.

A try writes its shard's files under `_staging/{token}/{shard}-{try}/`, where readers that glob the output do
not look (Ray Data, pyarrow and `datasets` skip folders starting with `_`; webdataset patterns name shards). It
then checks that its job still holds the output lock, and creates the shard's marker `NNNNN.stats.json` only if
it is absent: of all tries of a unit, at most one creates it. The marker records the job's token, the spec
identity, the try and where its files are staged; the winner then moves them into place. Whoever sees a marker
whose files are still staged finishes the move (the worker that wrote it, or the next job at start), so a crash
between marker and move loses nothing.

A marker counts as committed only if its token is in the output's lineage (the tokens of the runs since the
last --overwrite, kept in `_job.json`) and its identity is the spec's. A try from before an --overwrite, or of
other settings, can never make a shard count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from pipeline.lock import OutputLostError, lock_holder
from pipeline.plan import shard_name
from pipeline.storage import (
    OutputError,
    PreconditionFailed,
    conditional_store,
    get_bytes,
    move,
    put_atomic,
    with_retries,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "_job.json"
STAGING_DIR = "_staging"
OUTPUT_DIRS = ("", "images", "pairs")  # root and the subfolders shards write to
_READ_THREADS = 16

_MARKER = re.compile(r"(\d{5,})\.stats\.json")
_DATA_FILE = re.compile(r"\d{5,}\.(tar|parquet)")
# leftovers of interrupted local writes (storage.put_atomic) and compare-and-replace guards
_LOCAL_EXTRA = r"(\.tmp-[0-9a-f]{32}|\.guard)?"
_SHARD_FILE = re.compile(rf"\d{{5,}}\.(tar|parquet|stats\.json){_LOCAL_EXTRA}")
_JOB_FILE = re.compile(rf"_job\.json{_LOCAL_EXTRA}|_job\.lock\.tmp-[0-9a-f]{{32}}")


class SpecMismatchError(OutputError):
    """The output holds a job with different settings or inputs."""


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


def identity_digest(identity: dict) -> str:
    """A short, stable name for a spec identity, recorded in every marker."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fence:
    """What a commit must match to count: this run's token, the output's lineage, the spec identity."""

    token: str
    lineage: tuple[str, ...]
    identity: str

    def accepts(self, marker: dict) -> bool:
        fence = marker.get("fence") or {}
        return fence.get("token") in self.lineage and fence.get("identity") == self.identity

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Fence":
        lineage = tuple(manifest.get("lineage", ()))
        return cls(token=lineage[-1] if lineage else "", lineage=lineage, identity=manifest.get("identity", ""))


class ShardStore:
    """Committed shards under an output root."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.root = root
        self.store = conditional_store(fs)

    def _marker(self, unit_id: int) -> str:
        return _join(self.root, f"{shard_name(unit_id)}.stats.json")

    def marker_ids(self) -> list[int]:
        """Ids of units with a marker file, valid or not, from one listing of the root."""
        matches = (_MARKER.fullmatch(posixpath.basename(p)) for p in _list(self.fs, self.root))
        return sorted(int(m.group(1)) for m in matches if m)

    def read_markers(self, unit_ids: list[int]) -> dict[int, dict]:
        """Markers by unit id, read in parallel; one that vanished meanwhile is left out."""

        def read(unit_id: int) -> dict | None:
            try:
                return json.loads(get_bytes(self.fs, self._marker(unit_id)))
            except FileNotFoundError:
                return None
            except ValueError:
                return {"unreadable": True}  # not JSON: counts as no commit

        with ThreadPoolExecutor(_READ_THREADS) as pool:
            markers = dict(zip(unit_ids, pool.map(read, unit_ids)))
        return {unit_id: marker for unit_id, marker in markers.items() if marker is not None}

    def committed(self, fence: Fence) -> dict[int, dict]:
        """The markers that count for this fence, by unit id."""
        return {unit_id: m for unit_id, m in self.read_markers(self.marker_ids()).items() if fence.accepts(m)}

    def commit(self, unit_id: int, files: dict[str, bytes], stats: dict, fence: Fence) -> tuple[dict, bool]:
        """Stage a try's files, then make them the unit's shard unless another try already did.

        Returns the shard's marker and whether this try is the one that committed. Raises OutputLostError,
        writing no marker, if another job holds the output.
        """
        try_id = uuid.uuid4().hex
        staging = f"{STAGING_DIR}/{fence.token}/{shard_name(unit_id)}-{try_id}"
        for name in sorted(files):
            put_atomic(self.fs, _join(self.root, f"{staging}/{name}"), files[name])
        marker = stats | {
            "fence": {"token": fence.token, "identity": fence.identity, "try": try_id},
            "staging": staging,
            "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in sorted(files.items())},
        }
        holder = lock_holder(self.fs, self.root)
        if holder != fence.token:
            self._remove_staging(staging)
            raise OutputLostError(f"shard {shard_name(unit_id)} not committed: {self.root} is now held by "
                                  f"{'another job' if holder else 'no job'}, not by this one")
        winner = self._claim(unit_id, marker, fence)
        if winner["fence"]["try"] != try_id:
            self._remove_staging(staging)
            self.finish(winner)  # the winning try may have died before moving its files (idempotent)
            return winner, False
        self.finish(marker)
        return marker, True

    def _claim(self, unit_id: int, marker: dict, fence: Fence) -> dict:
        """Create the marker if absent; replace one that does not count. Returns the marker that holds."""
        path = self._marker(unit_id)
        data = _json_bytes(marker)
        while True:
            try:
                self.store.create(path, data)
                return marker
            except PreconditionFailed:
                pass
            try:
                existing_bytes, version = self.store.read(path)
            except FileNotFoundError:
                continue
            try:
                existing = json.loads(existing_bytes)
            except ValueError:
                existing = {}
            if existing.get("fence", {}).get("try") == marker["fence"]["try"] or fence.accepts(existing):
                return existing  # ours (an answer was lost), or another try of this lineage won
            log.warning("replacing marker %s of another lineage or settings (%s)", path, existing.get("fence"))
            try:
                self.store.replace(path, data, version)
                return marker
            except PreconditionFailed:
                continue

    def finish(self, marker: dict) -> None:
        """Move a committed try's staged files into place (idempotent: a move already done is skipped)."""
        staging = marker.get("staging")
        if not staging:
            return
        for name in sorted(marker["files"]):
            source, target = _join(self.root, f"{staging}/{name}"), _join(self.root, name)
            try:
                move(self.fs, source, target)
            except FileNotFoundError:
                if not self.fs.exists(target):
                    raise OutputError(f"{target}: committed but neither staged nor in place") from None
        self._remove_staging(staging)

    def staged_tries(self) -> set[str]:
        """`_staging/{token}/{try}` folders that exist now, relative to the root."""
        prefix = _join(self.root, STAGING_DIR)
        found = set()
        for token_dir in _list(self.fs, prefix):
            for try_dir in _list(self.fs, token_dir):
                found.add(f"{STAGING_DIR}/{posixpath.basename(token_dir)}/{posixpath.basename(try_dir)}")
        return found

    def recover(self, committed: dict[int, dict]) -> int:
        """At job start: finish the moves of committed shards that a crash interrupted, and delete every
        other staged try (losers, and tries that never committed). Returns the number of moves finished."""
        staged = self.staged_tries()
        pending = [m for m in committed.values() if m.get("staging") in staged]
        for marker in pending:
            self.finish(marker)
        for leftover in staged - {m["staging"] for m in pending}:
            self._remove_staging(leftover)
        return len(pending)

    def finish_interrupted(self, token: str) -> None:
        """When a run stops: finish the moves of its tries that won their marker, delete its other staged
        tries. Reads only its own staging and those few markers, so it fits in `ray job stop`'s grace time."""
        prefix = _join(self.root, f"{STAGING_DIR}/{token}")
        for try_dir in _list(self.fs, prefix):
            staging = f"{STAGING_DIR}/{token}/{posixpath.basename(try_dir)}"
            unit_id = int(posixpath.basename(try_dir).split("-")[0])
            marker = self.read_markers([unit_id]).get(unit_id, {})
            if marker.get("staging") == staging:
                self.finish(marker)
            else:
                self._remove_staging(staging)

    def _remove_staging(self, staging: str) -> None:
        path = _join(self.root, staging)
        try:
            with_retries(self.fs.rm, path, recursive=True, what=f"delete {path}")
        except FileNotFoundError:
            pass

    def data_files(self) -> list[str]:
        """Shard data files (NNNNN.tar, NNNNN.parquet) at the root and in images/ and pairs/, relative to the
        root: what a reader that globs the output sees, committed or not."""
        found = []
        for sub in OUTPUT_DIRS:
            for path in _list(self.fs, _join(self.root, sub)):
                name = posixpath.basename(path)
                if _DATA_FILE.fullmatch(name):
                    found.append(f"{sub}/{name}" if sub else name)
        return sorted(found)

    def remove_outputs(self) -> None:
        """Delete this engine's shard files, staging and manifest, never other files (for --overwrite).

        Markers and the manifest go first, so an interrupted removal never leaves a marker whose data is gone.
        The lock stays: the caller holds it while starting over.
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
        self._remove_staging(STAGING_DIR)
        log.info("removed %d old output files from %s", len(doomed), self.root)


def committed_shards(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """Every committed shard of an output, by unit id, with its marker (stats; `files` names its data files,
    relative to the root, with their sizes and digests). Readers of an output use this, never a glob."""
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise OutputError(f"{root} has no {MANIFEST_NAME}: not an output of this tool, or no job has started there")
    return ShardStore(fs, root).committed(Fence.from_manifest(manifest))


def job_manifest(spec_identity: dict, inputs: list[dict], lineage: list[str]) -> dict:
    """The manifest check_compatible compares against; callers may add informational keys."""
    return {"spec": spec_identity, "identity": identity_digest(spec_identity), "inputs": inputs, "lineage": lineage}


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
    changed = changed_inputs(existing.get("inputs", []), inputs)
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


def changed_inputs(old: list[dict], new: list[dict]) -> list[str]:
    """What differs between two input fingerprints, one line per file."""
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

