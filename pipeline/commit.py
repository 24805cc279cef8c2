"""Shard commits with fencing, and the job manifest that says which commits count.

A try writes its shard's files under `_staging/{token}/{shard}-{try}/`, where readers that glob the output do
not look (Ray Data, pyarrow and `datasets` skip folders starting with `_`; webdataset patterns name shards). It
then checks that its job still holds the output lock, and creates the shard's marker `NNNNN.stats.json` only if
it is absent: of all tries of a unit, at most one creates it. The marker records the job's token, the spec
identity, the try and where its files are staged; the winner then moves them into place. Whoever sees a marker
whose files are still staged finishes the move (the worker that wrote it, or the next job at start), so a crash
between marker and move loses nothing.

A marker counts as committed only if its token is in the output's lineage (the tokens of the runs since the
last --overwrite, kept in `_job.json`), its identity is the spec's, its paths are the ones a try of its unit
writes, and its files exist (staged or in place). A try from before an --overwrite, or of other settings, can
never make a shard count; nor can a marker whose staged files were deleted before it was created (a straggler of
an old run whose staging the next run cleaned up): the next try of its unit replaces it, conditionally. Readers
see a shard only once its files are in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Callable, ContextManager

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.lock import OutputLostError, lock_holder
from pipeline.manifest import MANIFEST_NAME, json_kind, read_manifest
from pipeline.plan import shard_name
from pipeline.storage import (
    OutputError,
    PreconditionFailed,
    conditional_store,
    get_bytes,
    move,
    put_atomic,
    redact,
    with_retries,
)

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
OUTPUT_DIRS = ("", "images", "pairs")  # root and the subfolders shards write to
_READ_THREADS = 16
# Files per delete request. A driver's destructive phase makes each request and each move under its lease
# (`still_held`): on a local or shared disk nothing lands after another job took the output over; on an object
# store a driver paused past its lease still sends, on waking, the one request it had checked.
DELETE_BATCH = 64

_MARKER = re.compile(r"(\d{5,})\.stats\.json")
_NAME = re.compile(r"[0-9a-zA-Z_-]{1,64}")  # tokens and try ids: one path segment, nothing to climb out with
# leftovers of interrupted local writes (storage.put_atomic) and compare-and-replace guards
_LOCAL_EXTRA = r"(\.tmp-[0-9a-f]{32}|\.guard)?"
_SHARD_FILE = re.compile(rf"\d{{5,}}\.(tar|parquet|stats\.json){_LOCAL_EXTRA}")
# the manifest and its leftovers; not the lock's temporary files, which the holder's renewals write and rename
_JOB_FILE = re.compile(rf"_job\.json{_LOCAL_EXTRA}")


class BrokenCommitError(OutputError):
    """A marker whose files are neither staged nor in place: it must not count, and its unit is redone."""


class SupersededError(BrokenCommitError):
    """The unit's marker is no longer the try being finished (replaced, or removed by --overwrite): that try's
    files do not go into place, and whoever was finishing it looks at the unit again."""


# `with still_held(): change the output`: raises OutputLostError once the driver's lease is lost, and fences the
# change where the store can (LeaseKeeper.holding)
StillHeld = Callable[[], ContextManager[None]]
# A worker's try holds no lease: its holder check before the claim and its marker's re-reads fence its moves.
_NO_LEASE: StillHeld = nullcontext


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


def _sizes(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int]:
    """File sizes in one folder by name, from one listing."""
    fs.invalidate_cache(folder)
    try:
        entries = with_retries(fs.ls, folder, detail=True, what=f"list {folder}")
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries if e.get("type") != "directory"}


def marker_problem(unit_id: int, marker: dict) -> str | None:
    """Why a marker's paths are not those a try of its unit writes, or None. Markers are files anyone with
    write access to the output can plant; their paths are joined to the root and moved or deleted, so only
    `_staging/{token}/{shard}-{try}` and the shard's own data files under the root are ever accepted."""
    shard = shard_name(unit_id)
    fence = marker.get("fence")
    if not isinstance(fence, dict) or not all(isinstance(fence.get(k), str) for k in ("token", "identity", "try")):
        return "no fence"
    staging = marker.get("staging")
    expected = f"{STAGING_DIR}/{fence['token']}/{shard}-{fence['try']}"
    if staging != expected or not _NAME.fullmatch(fence["token"]) or not _NAME.fullmatch(fence["try"]):
        return f"staging {str(staging)[:200]!r} is not {STAGING_DIR}/TOKEN/{shard}-TRY"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "no files"
    for name, info in files.items():
        if not _shard_data_name(shard).fullmatch(str(name)):
            return f"file {str(name)[:200]!r} is not a data file of shard {shard}"
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int):
            return f"file {str(name)[:200]!r} has no size"
    return _stats_problem(marker)


# The stats fields readers show or add up, with what each must be where present (hand-made markers of tests
# leave some out; readers show a missing one as blank). Counts are whole numbers, never strings or booleans.
_COUNT_FIELDS = ("count", "successes", "failed", "truncated", "left_null", "attempt")
_UNIT_INT_FIELDS = ("unit_id", "first_row", "num_rows", "first_key_index")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stats_problem(marker: dict) -> str | None:
    """Why a marker's stats are not of the types its writer gives them, or None: readers (the report, verify,
    the job's summary) format them as numbers and show them, so a planted `"count": "<script>"` never counts."""
    for name in _COUNT_FIELDS:
        if name in marker and not _is_count(marker[name]):
            return f"field {name!r} is {json_kind(marker[name])}, not a whole number of 0 or more"
    if "started_at" in marker and not _is_number(marker["started_at"]):
        return f"field 'started_at' is {json_kind(marker['started_at'])}, not a number"
    timings = marker.get("timings", {})
    if not isinstance(timings, dict):
        return f"field 'timings' is {json_kind(timings)}, not an object"
    for name, value in timings.items():
        if not _is_number(value):
            return f"field 'timings.{str(name)[:60]}' is {json_kind(value)}, not a number"
    for name in ("unit", "worker", "run"):
        if not isinstance(marker.get(name, {}), dict):
            return f"field {name!r} is {json_kind(marker[name])}, not an object"
    unit = marker.get("unit", {})
    if "path" in unit and not isinstance(unit["path"], str):
        return f"field 'unit.path' is {json_kind(unit['path'])}, not a string"
    for name in _UNIT_INT_FIELDS:
        if name in unit and not _is_count(unit[name]):
            return f"field 'unit.{name}' is {json_kind(unit[name])}, not a whole number of 0 or more"
    return None



def _shard_data_name(shard: str) -> re.Pattern:
    return re.compile(rf"(images/|pairs/)?{shard}\.(tar|parquet)")


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
        """Markers by unit id, read in parallel; one that vanished meanwhile is left out. One that is not JSON,
        or whose paths are not its unit's (marker_problem), is returned as {"invalid": why}: it never counts."""

        with ThreadPoolExecutor(_READ_THREADS) as pool:
            markers = dict(zip(unit_ids, pool.map(self._read_marker, unit_ids)))
        return {unit_id: marker for unit_id, marker in markers.items() if marker is not None}

    def _read_marker(self, unit_id: int) -> dict | None:
        try:
            marker = json.loads(get_bytes(self.fs, self._marker(unit_id)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"invalid": "not JSON"}
        problem = marker_problem(unit_id, marker) if isinstance(marker, dict) else "not a JSON object"
        if problem:
            log.warning("ignoring marker %s: %s", self._marker(unit_id), problem)
            return {"invalid": problem}
        return marker

    def _stands(self, unit_id: int, marker: dict) -> bool:
        """Whether the unit's marker is, as read now, this try's."""
        current = self._read_marker(unit_id) or {}
        return current.get("fence") == marker["fence"] and current.get("staging") == marker["staging"]

    def scan(self, fence: Fence) -> "Scan":
        """Every marker that counts for this fence, sorted by where its files are, from one listing of each
        output folder and of the staging."""
        found = self.read_markers(self.marker_ids())
        markers = {u: m for u, m in found.items() if fence.accepts(m)}
        sizes = {sub: _sizes(self.fs, _join(self.root, sub)) for sub in OUTPUT_DIRS}
        staged = self.staged_tries() if markers else set()
        result = Scan(damaged={u: m["invalid"] for u, m in found.items() if "invalid" in m})
        for unit_id, marker in markers.items():
            in_place = all(_in(sizes, name) == info["bytes"] for name, info in marker["files"].items())
            if in_place:
                result.in_place[unit_id] = marker
            elif marker["staging"] in staged:
                result.pending[unit_id] = marker
            else:
                result.broken[unit_id] = marker
        return result

    def committed(self, fence: Fence) -> dict[int, dict]:
        """The markers that count for this fence and have their files (in place or staged), by unit id."""
        scan = self.scan(fence)
        return scan.in_place | scan.pending

    def commit(self, unit_id: int, files: dict[str, bytes], stats: dict, fence: Fence) -> tuple[dict, bool]:
        """Stage a try's files, then make them the unit's shard unless another try already did.

        Returns the shard's marker and whether this try is the one that committed. Raises OutputLostError,
        writing no marker, if another job holds the output.
        """
        try_id = uuid.uuid4().hex
        staging = f"{STAGING_DIR}/{fence.token}/{shard_name(unit_id)}-{try_id}"
        for name in sorted(files):
            put_atomic(self.fs, _join(self.root, f"{staging}/{name}"), files[name])
        marker = redact(stats, by_name=False) | {  # a unit's path names the prompts, with any password in it
            "fence": {"token": fence.token, "identity": fence.identity, "try": try_id},
            "staging": staging,
            "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in sorted(files.items())},
        }
        self._check_holder(fence, unit_id, staging)
        while True:
            winner = self._claim(unit_id, marker, fence)
            if winner["fence"]["try"] == try_id:
                try:
                    self.finish(unit_id, marker, still_held=_NO_LEASE)
                except SupersededError as exc:
                    log.warning("%s", exc)
                    continue  # _claim now finds the marker that replaced this try's
                return marker, True
            try:
                # the winning try may have died before moving its files (idempotent)
                self.finish(unit_id, winner, still_held=_NO_LEASE)
            except BrokenCommitError as exc:
                log.warning("%s; looking at the unit again", exc)
                continue  # _claim now finds the broken (or newer) marker and replaces it or yields to it
            self._remove_staging(staging)
            return winner, False

    def _check_holder(self, fence: Fence, unit_id: int, staging: str) -> None:
        holder = lock_holder(self.fs, self.root)
        if holder != fence.token:
            self._remove_staging(staging)
            raise OutputLostError(f"shard {shard_name(unit_id)} not committed: {self.root} is now held by "
                                  f"{'another job' if holder else 'no job'}, not by this one")

    def _claim(self, unit_id: int, marker: dict, fence: Fence) -> dict:
        """Create the marker if absent; replace one that does not count, or counts but lost its files.
        Returns the marker that holds."""
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
            if not isinstance(existing, dict) or marker_problem(unit_id, existing):
                existing = {}
            if existing.get("fence", {}).get("try") == marker["fence"]["try"]:
                return existing  # ours: an answer was lost
            if fence.accepts(existing):
                if self._has_files(existing):
                    return existing  # another try of this lineage won
                log.warning("replacing marker %s: its files are neither staged nor in place", path)
            else:
                log.warning("replacing marker %s of another lineage or settings (%s)", path, existing.get("fence"))
                self._check_holder(fence, unit_id, marker["staging"])  # a straggler never replaces a newer job's
            try:
                self.store.replace(path, data, version)
                return marker
            except PreconditionFailed:
                continue

    def _has_files(self, marker: dict) -> bool:
        """Each file staged, or in place with its size and digest. Staging is looked at first: a move under way
        takes a file from there to its place, never the other way."""
        for name, info in marker["files"].items():
            staged = _join(self.root, f"{marker['staging']}/{name}")
            self.fs.invalidate_cache(staged)
            if not with_retries(self.fs.exists, staged, what=f"look up {staged}") and not self._in_place(name, info):
                return False
        return True

    def _in_place(self, name: str, info: dict) -> bool:
        """Whether the file in place has the marker's size and, where the marker records one, its sha256. Reads
        the file, so only for the few units whose commit was interrupted or contested, never at every resume: a
        straggler's late move may have put another try's file of the same size there."""
        target = _join(self.root, name)
        self.fs.invalidate_cache(target)
        try:
            if with_retries(self.fs.size, target, what=f"look up {target}") != info["bytes"]:
                return False
            if "sha256" not in info:  # a marker made by hand
                return True
            return with_retries(_sha256, self.fs, target, what=f"read {target}") == info["sha256"]
        except FileNotFoundError:
            return False

    def finish(self, unit_id: int, marker: dict, *, still_held: StillHeld) -> None:
        """Move a committed try's staged files into place (idempotent: a move already done is skipped), only while
        its marker stands. Each move and the staging folder's deletion are made under `still_held`.

        Raises SupersededError, having moved nothing, if the unit's marker is not this try's. If it stopped being
        this try's while the files moved (a straggler paused between its look and its moves), each moved file that
        the marker standing now does not claim with the bytes in place is deleted again, so that no reader takes
        this try's bytes for another's (that commit is then broken, and its unit redone). Raises BrokenCommitError
        if a file is neither staged nor in place with the marker's size and digest."""
        if not self._stands(unit_id, marker):
            raise SupersededError(f"shard {shard_name(unit_id)}: try {marker['fence']['try']} no longer holds its "
                                  "marker; its files were not moved into place")
        staging, moved = marker["staging"], []
        for name in sorted(marker["files"]):
            source, target = _join(self.root, f"{staging}/{name}"), _join(self.root, name)
            try:
                with still_held():
                    move(self.fs, source, target)
                moved.append(name)
            except FileNotFoundError:
                if not self._in_place(name, marker["files"][name]):
                    raise BrokenCommitError(f"{target}: committed by try {marker['fence']['try']} but neither "
                                            "staged nor in place") from None
        if moved and not self._stands(unit_id, marker):
            withdrawn = self._withdraw(unit_id, moved, still_held)
            raise SupersededError(f"shard {shard_name(unit_id)}: its marker changed while try "
                                  f"{marker['fence']['try']} moved its files into place; deleted again those the "
                                  f"marker now standing does not claim: {', '.join(withdrawn) or 'none'}")
        with still_held():
            self._remove_staging(staging)

    def _withdraw(self, unit_id: int, moved: list[str], still_held: StillHeld) -> list[str]:
        """Delete the moved files that the unit's marker, as read now, does not claim with the bytes in place; each
        deletion under `still_held` (a driver finishing moves, stopped here, must not delete the next job's)."""
        current = self._read_marker(unit_id) or {}
        claimed = current.get("files", {}) if "invalid" not in current else {}
        withdrawn = [name for name in moved if name not in claimed or not self._in_place(name, claimed[name])]
        for name in withdrawn:
            try:
                with still_held():
                    with_retries(self.fs.rm, _join(self.root, name), what=f"delete {_join(self.root, name)}")
            except FileNotFoundError:
                pass
        return withdrawn

    def staged_tries(self) -> set[str]:
        """`_staging/{token}/{try}` folders that exist now, relative to the root."""
        prefix = _join(self.root, STAGING_DIR)
        found = set()
        for token_dir in _list(self.fs, prefix):
            for try_dir in _list(self.fs, token_dir):
                found.add(f"{STAGING_DIR}/{posixpath.basename(token_dir)}/{posixpath.basename(try_dir)}")
        return found

    def recover(self, committed: dict[int, dict], *, still_held: StillHeld) -> tuple[int, list[int]]:
        """At job start: finish the moves of committed shards that a crash interrupted, and delete every
        other staged try (losers, and tries that never committed). Returns the number of moves finished and
        the units whose files turned out to be gone, or whose markers were replaced meanwhile (they do not count:
        redo them). Each move and each deletion is made under `still_held`."""
        staged = self.staged_tries()
        pending = [(u, m) for u, m in committed.items() if m.get("staging") in staged]
        broken = []
        for unit_id, marker in pending:
            try:
                self.finish(unit_id, marker, still_held=still_held)
            except BrokenCommitError as exc:
                log.warning("%s: the unit will be done again", exc)
                broken.append(unit_id)
        for leftover in staged - {m["staging"] for _, m in pending}:
            with still_held():
                self._remove_staging(leftover)
        return len(pending) - len(broken), broken

    def finish_interrupted(self, token: str, *, still_held: StillHeld) -> None:
        """When a run stops: finish the moves of its tries that won their marker, delete its other staged
        tries. Reads only its own staging and those few markers, so it fits in `ray job stop`'s grace time.
        Each move and each deletion is made under `still_held`."""
        prefix = _join(self.root, f"{STAGING_DIR}/{token}")
        for try_dir in _list(self.fs, prefix):
            staging = f"{STAGING_DIR}/{token}/{posixpath.basename(try_dir)}"
            unit_id = int(posixpath.basename(try_dir).split("-")[0])
            marker = self._read_marker(unit_id) or {}
            if marker.get("staging") == staging:
                try:
                    self.finish(unit_id, marker, still_held=still_held)
                    continue
                except SupersededError as exc:
                    log.warning("%s", exc)
            with still_held():
                self._remove_staging(staging)

    def _remove_staging(self, staging: str) -> None:
        """Delete one try's staging folder (a few files)."""
        path = _join(self.root, staging)
        try:
            with_retries(self.fs.rm, path, recursive=True, what=f"delete {path}")
        except FileNotFoundError:
            pass

    def _delete(self, paths: list[str], still_held: StillHeld) -> None:
        """Delete files listed before, DELETE_BATCH to a request, each request under `still_held`; on a local
        disk, where a request is one file anyway, each file."""
        size = 1 if isinstance(self.fs, LocalFileSystem) else DELETE_BATCH
        for start in range(0, len(paths), size):
            batch = paths[start:start + size]
            with still_held():
                with_retries(self.fs.rm, batch, what=f"delete {len(batch)} old output files in {self.root}")

    def _delete_staging(self, still_held: StillHeld) -> None:
        """Delete the staged files listed now, in batches; then, on a local disk, the folders left empty (one that
        a job has staged into since the listing is not empty, and stays)."""
        prefix = _join(self.root, STAGING_DIR)
        self.fs.invalidate_cache(prefix)
        try:
            files = with_retries(self.fs.find, prefix, what=f"list {prefix}")
        except FileNotFoundError:
            return
        self._delete(files, still_held)
        if isinstance(self.fs, LocalFileSystem):
            for folder, _, _ in os.walk(self.fs._strip_protocol(prefix), topdown=False):
                try:
                    with still_held():
                        os.rmdir(folder)
                except OSError:  # not empty
                    pass

    def remove_outputs(self, *, still_held: StillHeld) -> None:
        """Delete this engine's shard files, staging and manifest, never other files (for --overwrite).

        A commit in reverse, so that a removal cut short leaves no file that a globbing reader sees without the
        marker that claims it: first each counted shard's files go back to its marker's staging (the marker stays
        valid, its shard pending as after a crash mid-commit: this project's readers stop showing it, and a re-run
        of that job would move them in again); then the data files no counted marker claims; then the markers;
        the manifest last, since the markers count only through its lineage; then the staging. The lock stays:
        the caller holds it while starting over, and each move and each request of deletions is made under
        `still_held`, so a driver that lost the output stops before touching what the next job wrote.
        """
        try:
            manifest = read_manifest(self.fs, self.root)
        except OutputError:  # not a manifest of this tool: no marker counts
            manifest = None
        if manifest is not None:
            scan = self.scan(Fence.from_manifest(manifest))
            with ThreadPoolExecutor(_READ_THREADS) as pool:
                list(pool.map(lambda marker: self._unfinish(marker, still_held),
                              [*scan.in_place.values(), *scan.pending.values()]))
        doomed = []
        for sub in OUTPUT_DIRS:
            for path in _list(self.fs, _join(self.root, sub)):
                name = posixpath.basename(path)
                if _SHARD_FILE.fullmatch(name) or (not sub and _JOB_FILE.fullmatch(name)):
                    doomed.append(path)
        markers = [p for p in doomed if ".stats.json" in posixpath.basename(p)]
        job_files = [p for p in doomed if posixpath.basename(p).startswith("_job.")]
        data = [p for p in doomed if p not in markers and p not in job_files]
        for batch in (data, markers, job_files):
            self._delete(batch, still_held)
        self._delete_staging(still_held)
        log.info("removed %d old output files from %s", len(doomed), self.root)

    def _unfinish(self, marker: dict, still_held: StillHeld) -> None:
        """Move a committed shard's files from their place back to its staging: `finish` undone (idempotent)."""
        for name in sorted(marker["files"]):
            try:
                with still_held():
                    move(self.fs, _join(self.root, name), _join(self.root, f"{marker['staging']}/{name}"))
            except FileNotFoundError:  # staged already (moved back, or never moved in)
                pass


@dataclass
class Scan:
    """The markers that count, by where their files are: in place (readable), pending (still staged: the
    committing try, or the next run, moves them), broken (gone: the unit is redone); and why each damaged marker
    (not JSON, or paths or fields not of its writer: marker_problem) does not count."""

    in_place: dict[int, dict] = field(default_factory=dict)
    pending: dict[int, dict] = field(default_factory=dict)
    broken: dict[int, dict] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _in(sizes: dict[str, dict[str, int]], name: str) -> int | None:
    sub, _, base = name.rpartition("/")
    return sizes.get(sub, {}).get(base)


def committed_shards(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, dict]:
    """Every committed shard of an output whose files are in place, by unit id, with its marker (stats; `files`
    names its data files, relative to the root, with their sizes and digests). Readers of an output use this,
    never a glob: a shard whose move into place is not done yet is not shown."""
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise OutputError(f"{root} has no {MANIFEST_NAME}: not an output of this tool, or no job has started there")
    if not isinstance(manifest, dict):
        raise OutputError(f"{_join(root, MANIFEST_NAME)} is not a JSON object: not an output of this tool")
    return ShardStore(fs, root).scan(Fence.from_manifest(manifest)).in_place
