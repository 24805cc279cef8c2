"""The job manifest `_job.json`: what a job is (its identity and inputs), which runs own the output (the lineage
whose commits count), and whether a re-run may resume it; written only while the job holds the output.

The manifest says which commits count (its lineage), so a driver whose lease ran out unnoticed must never write
it over the next holder's. Every write is conditional on the version this driver last wrote or read: a write
in between by anyone else fails it. The job then asks the lock whether it still holds the output: if so the
other writer was a stale driver and this job writes again over what it wrote; if not, this job has lost the
output and stops (`confirm_held` raises OutputLostError).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Callable

import fsspec

from pipeline.lock import OutputLostError
from pipeline.storage import OutputError, PreconditionFailed, conditional_store, get_bytes

MANIFEST_NAME = "_job.json"



class SpecMismatchError(OutputError):
    """The output holds a job with different settings or inputs."""


def identity_digest(identity: dict) -> str:
    """A short, stable name for a spec identity, recorded in every marker."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


_ATTEMPTS = 5  # writes lost to stale writers before giving up (each time, this job proved it holds the lock)


class ManifestWriter:
    """Conditional writes of one output's manifest, for the job holding its lock."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, confirm_held: Callable[[], None]):
        self.path = posixpath.join(root.rstrip("/"), MANIFEST_NAME)
        self.store = conditional_store(fs)
        self.confirm_held = confirm_held
        self.version = self._current_version()

    def _current_version(self) -> str | None:
        try:
            return self.store.read(self.path)[1]
        except FileNotFoundError:
            return None

    def write(self, manifest: dict) -> None:
        data = manifest_bytes(manifest)
        for _ in range(_ATTEMPTS):
            try:
                if self.version is None:
                    self.version = self.store.create(self.path, data)
                else:
                    self.version = self.store.replace(self.path, data, self.version)
                return
            except (PreconditionFailed, FileNotFoundError):  # changed, or deleted (S3 answers If-Match so)
                try:
                    current, version = self.store.read(self.path)
                except FileNotFoundError:
                    current, version = None, None
                if current == data:  # our own write, whose answer was lost
                    self.version = version
                    return
                self.confirm_held()
                self.version = version  # a stale driver wrote it: this job, the holder, writes again
        raise OutputLostError(f"{self.path} keeps being changed by another writer; this job stops")


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, indent=2).encode()


def job_manifest(spec_identity: dict, inputs: list[dict], lineage: list[str]) -> dict:
    """The manifest check_compatible compares against; callers may add informational keys."""
    return {"spec": spec_identity, "identity": identity_digest(spec_identity), "inputs": inputs, "lineage": lineage}


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    path = posixpath.join(root.rstrip("/"), MANIFEST_NAME)
    try:
        manifest = json.loads(get_bytes(fs, path))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser's depth
        raise OutputError(f"{path} is not valid JSON ({e}); pass --overwrite to start over") from None
    wrong = [f"{field} is {json_kind(manifest[field])}" for field, kind in _MANIFEST_FIELDS.items()
             if isinstance(manifest, dict) and field in manifest and not isinstance(manifest[field], kind)]
    if not isinstance(manifest, dict) or wrong:
        what = ", ".join(wrong) if wrong else f"holds {json_kind(manifest)}, not a JSON object"
        raise OutputError(f"{path}: {what}: not a manifest of this tool; pass --overwrite to start over")
    return manifest


_MANIFEST_FIELDS = {"spec": dict, "inputs": list, "lineage": list, "progress": dict}  # what readers index into


def json_kind(value) -> str:
    """A JSON value's kind, as a message names it (never the value: it is data, and may be markup or a secret)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


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
            "the output holds a job with different settings: " + "; ".join(p.strip() for p in problems)
            + ". Pass --overwrite to start over there, or use another output location."
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
                 if before[path].get(k) != f.get(k) and not _upgraded(k, before[path], f)]
        if diffs:
            changes.append(f"{path} ({', '.join(diffs)})")
    return changes


def _upgraded(key: str, old: dict, new: dict) -> bool:
    """Outputs begun before local inputs were tagged by content recorded a digest of each Parquet footer instead:
    a file of the same size is taken as the same once, and its content digest is kept from then on."""
    return (key == "etag" and str(old.get("etag")).startswith("footer-sha256:")
            and str(new.get("etag")).startswith("sha256:") and old.get("size") == new.get("size"))
