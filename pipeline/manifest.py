"""Writing `_job.json` only while this job holds the output.

The manifest says which commits count (its lineage), so a driver whose lease ran out unnoticed must never write
it over the next holder's. Every write is conditional on the version this driver last wrote or read: a write
in between by anyone else fails it. The job then asks the lock whether it still holds the output: if so the
other writer was a stale driver and this job writes again over what it wrote; if not, this job has lost the
output and stops (`confirm_held` raises OutputLostError).
"""

from __future__ import annotations

import json
import posixpath
from typing import Callable

import fsspec

from pipeline.commit import MANIFEST_NAME
from pipeline.lock import OutputLostError
from pipeline.storage import PreconditionFailed, conditional_store

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
        data = json.dumps(manifest, sort_keys=True, indent=2).encode()
        for _ in range(_ATTEMPTS):
            try:
                if self.version is None:
                    self.version = self.store.create(self.path, data)
                else:
                    self.version = self.store.replace(self.path, data, self.version)
                return
            except PreconditionFailed:
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
