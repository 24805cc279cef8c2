"""Commit protocol, manifest, lock and storage helpers, on local disk and S3 (moto)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from pipeline import commit, storage
from pipeline.commit import (
    OutputLockedError,
    ShardStore,
    SpecMismatchError,
    acquire_lock,
    check_compatible,
    job_manifest,
    read_manifest,
    refresh_lock,
    release_lock,
    write_manifest,
)
from pipeline.storage import get_bytes, put_atomic, redact, storage_env, with_retries


@pytest.fixture(autouse=True)
def no_lock_settle(monkeypatch):
    monkeypatch.setattr(commit, "LOCK_SETTLE_S", 0)


@pytest.fixture
def local(tmp_path):
    return fsspec.filesystem("file"), str(tmp_path / "out")


def test_commit_writes_files_then_marker(local, monkeypatch):
    fs, root = local
    written = []
    monkeypatch.setattr(commit, "put_atomic", lambda fs_, path, data: written.append(path) or put_atomic(fs_, path, data))
    store = ShardStore(fs, root)
    assert store.committed() == set()  # the root does not exist yet

    store.commit(3, {"00003.tar": b"tar", "images/00003.parquet": b"pq"}, {"ok": 2, "failed": 1})
    assert [p[len(root) + 1:] for p in written] == ["00003.tar", "images/00003.parquet", "00003.stats.json"]
    assert store.committed() == {3}
    assert store.read_stats(3) == {"ok": 2, "failed": 1}
    assert open(f"{root}/00003.stats.json").read() == json.dumps({"failed": 1, "ok": 2}, indent=2, sort_keys=True)

    put_atomic(fs, f"{root}/00004.tar", b"data but no marker")  # a crash before the marker
    put_atomic(fs, f"{root}/123.stats.json", b"{}")  # not a shard name
    assert store.committed() == {3}


def test_put_atomic_leaves_nothing_partial_on_failure(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "sub" / "00001.tar")
    put_atomic(fs, path, b"old complete contents")

    def crash(fd):  # fails after the data was written to the temporary file
        raise RuntimeError("disk unplugged")

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        put_atomic(fs, path, b"new")
    with pytest.raises(RuntimeError):
        put_atomic(fs, str(tmp_path / "sub" / "00002.tar"), b"new")
    assert os.listdir(tmp_path / "sub") == ["00001.tar"]
    assert open(path, "rb").read() == b"old complete contents"


def test_remove_outputs_keeps_user_files(local):
    fs, root = local
    ours = ["00001.tar", "00001.parquet", "00001.stats.json", "123456.tar", "_job.json",
            "00002.tar.tmp-" + "a" * 32, "images/00001.parquet", "pairs/00001.parquet"]
    theirs = ["_job.lock", "README.md", "123.tar", "00001.tar.bak", "images/notes.txt", "other/00001.tar"]
    for name in ours + theirs:
        put_atomic(fs, f"{root}/{name}", b"x")
    ShardStore(fs, root).remove_outputs()
    left = sorted(p[len(root) + 1:] for p in fs.find(root))
    assert left == sorted(theirs)


def test_manifest_round_trip_and_mismatch_messages(local):
    fs, root = local
    assert read_manifest(fs, root) is None
    inputs = [{"path": "s3://b/a.parquet", "size": 10, "etag": "e1", "mtime": "t"}]
    identity = {"model": "tiny", "steps": 1, "size": (16, 16)}
    write_manifest(fs, root, job_manifest(identity, inputs))
    existing = read_manifest(fs, root)
    check_compatible(existing, identity, inputs)  # same job: resumable

    with pytest.raises(SpecMismatchError) as e:
        check_compatible(existing, {"model": "other", "steps": 1, "size": (16, 16), "seed": 3}, inputs)
    message = str(e.value)
    assert "model: 'tiny' -> 'other'" in message and "seed: (unset) -> 3" in message
    assert "steps" not in message and "--overwrite" in message

    changed = [{**inputs[0], "size": 11, "etag": "e2"}, {"path": "s3://b/new.parquet", "size": 1}]
    with pytest.raises(SpecMismatchError, match="input files changed since the job started") as e:
        check_compatible(existing, identity, changed)
    assert "s3://b/a.parquet (size 10 -> 11, etag e1 -> e2)" in str(e.value)
    assert "s3://b/new.parquet (added)" in str(e.value)

    put_atomic(fs, f"{root}/_job.json", b"{not json")
    with pytest.raises(commit.OutputError, match="_job.json is not valid JSON"):
        read_manifest(fs, root)


def test_lock_refuses_a_live_holder_and_is_released(local):
    fs, root = local
    token = acquire_lock(fs, root)
    with pytest.raises(OutputLockedError, match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
        acquire_lock(fs, root)
    refresh_lock(fs, root, token)
    with pytest.raises(OutputLockedError, match="lost the lock"):
        refresh_lock(fs, root, "someone-else")
    release_lock(fs, root, "someone-else")  # not ours: kept
    assert fs.exists(f"{root}/_job.lock")
    release_lock(fs, root, token)
    assert not fs.exists(f"{root}/_job.lock")
    release_lock(fs, root, token)  # already gone: fine


def write_lock(fs, root, **fields):
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "token": "old", "started": "then",
            "heartbeat": time.time(), **fields}
    put_atomic(fs, f"{root}/_job.lock", json.dumps(lock).encode())


def test_stale_locks_are_taken_over(local, caplog):
    fs, root = local
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its pid is dead
    write_lock(fs, root, pid=child.pid)
    with caplog.at_level(logging.WARNING, logger="pipeline.commit"):
        token = acquire_lock(fs, root)
    assert "stale lock" in caplog.text and json.loads(get_bytes(fs, f"{root}/_job.lock"))["token"] == token

    write_lock(fs, root, host="elsewhere", heartbeat=time.time() - commit.LOCK_LEASE_S - 1)
    acquire_lock(fs, root)  # heartbeat too old
    write_lock(fs, root, host="elsewhere")
    with pytest.raises(OutputLockedError, match="host elsewhere"):
        acquire_lock(fs, root)  # another host's pid cannot be checked: the lease decides

    put_atomic(fs, f"{root}/_job.lock", b"garbage")
    with pytest.raises(commit.OutputError, match="not a lock file"):
        acquire_lock(fs, root)


def test_with_retries_retries_transient_errors_only(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "done"

    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        assert with_retries(flaky, what="fetch thing", base_delay_s=0) == "done"
    assert len(calls) == 3 and caplog.text.count("fetch thing failed") == 2

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="read", base_delay_s=0)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise ConnectionError("refused")

    calls.clear()
    with pytest.raises(ConnectionError, match="refused"):
        with_retries(down, what="read", attempts=2, base_delay_s=0)
    assert len(calls) == 2


def test_transient_classification():
    from botocore.exceptions import ClientError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("Whatever", 500))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert storage.is_transient(TimeoutError()) and storage.is_transient(OSError(5, "EIO"))
    assert not storage.is_transient(PermissionError()) and not storage.is_transient(ValueError())


def test_redact_and_storage_env(monkeypatch):
    options = {"key": "AKIA", "secret": "s", "anon": False,
               "client_kwargs": {"endpoint_url": "http://h", "aws_session_token": "t"},
               "Credentials": {"a": 1}, "profiles": [{"password": "p"}]}
    assert redact(options) == {"key": "***", "secret": "***", "anon": False,
                               "client_kwargs": {"endpoint_url": "http://h", "aws_session_token": "***"},
                               "Credentials": "***", "profiles": [{"password": "***"}]}
    assert options["key"] == "AKIA"
    for name in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "S3_ENDPOINT_URL", "GCSFS_X"):
        monkeypatch.setenv(name, "v")
    monkeypatch.setenv("MY_S3_ENDPOINT_URL", "no")
    env = storage_env()
    assert {"AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "HF_HUB_OFFLINE", "S3_ENDPOINT_URL", "GCSFS_X"} <= set(env)
    assert "MY_S3_ENDPOINT_URL" not in env


def test_commit_and_lock_on_s3(s3):
    fs, root = storage.filesystem(s3.url("out"), s3.storage_options)
    store = ShardStore(fs, root)
    assert store.committed() == set()
    store.commit(0, {"00000.tar": b"a" * 1000}, {"ok": 1})
    store.commit(7, {"00007.tar": b"b", "pairs/00007.parquet": b"c"}, {"ok": 2})
    put_atomic(fs, f"{root}/00009.tar", b"no marker")
    put_atomic(fs, f"{root}/notes.txt", b"user file")
    assert store.committed() == {0, 7}
    assert store.read_stats(7) == {"ok": 2} and get_bytes(fs, f"{root}/00000.tar") == b"a" * 1000

    token = acquire_lock(fs, root)
    with pytest.raises(OutputLockedError):
        acquire_lock(fs, root)
    store.remove_outputs()
    assert store.committed() == set()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(root)) == ["_job.lock", "notes.txt"]
    release_lock(fs, root, token)
    assert not fs.exists(f"{root}/_job.lock")
