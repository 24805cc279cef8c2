"""Attacks on the lock's fence of a driver's destructive phases (commit 47f332e): each test is a way a change
of the output could still land after another job took the output over, or a failure that is not the user's."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from pipeline import commit
from pipeline.commit import ShardStore
from pipeline.lock import OutputLostError
from pipeline.storage import put_atomic
from tests.test_fencing import PausedDriver, commits_interrupted_before_their_moves, output  # noqa: F401


@pytest.mark.xfail(strict=True, raises=FileNotFoundError,  # the new job's 00000.tar deleted
                   reason="defect: finish's _withdraw deletes outside the fence (recover, stop)")
def test_a_withdrawal_in_recovery_stops_at_once_when_its_driver_wakes_past_its_lease(output, monkeypatch):  # noqa: F811
    """Recovery finishes unit 0's moves; a straggler of the old run replaces its marker meanwhile, so finish
    deletes again the file it moved (_withdraw). The driver is stopped between reading the marker and that
    deletion; a new job takes the output over and commits unit 0 in place. On waking, the deletion must not land
    on the new job's file."""
    fs, root = output
    driver = PausedDriver(fs, root)
    commits_interrupted_before_their_moves(driver, monkeypatch)
    store = ShardStore(fs, root)
    committed = store.committed(driver.fence)
    marker_path, target = f"{root}/00000.stats.json", f"{root}/00000.tar"
    real_move, real_rm, straggled, paused = commit.move, fs.rm, [], []

    def move_then_straggle(fs_, source, destination):
        real_move(fs_, source, destination)
        if destination == target and not straggled:  # a straggler of the old run replaces the marker now
            straggler = copy.deepcopy(committed[0])
            straggler["fence"]["try"] = "f" * 32
            straggler["staging"] = f"_staging/{driver.lock.token}/00000-{'f' * 32}"
            data = b"straggler's bytes"
            straggler["files"]["00000.tar"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            put_atomic(fs, marker_path, json.dumps(straggler).encode())
            straggled.append(True)

    def rm_after_a_stop(path, *args, **kwargs):
        if path == target and straggled and not paused:  # _withdraw has read the marker: stopped here
            paused.append(True)
            driver.pause()  # the new job takes over and commits unit 0, its 00000.tar in place
        return real_rm(path, *args, **kwargs)

    monkeypatch.setattr(commit, "move", move_then_straggle)
    monkeypatch.setattr(fs, "rm", rm_after_a_stop)
    with pytest.raises(OutputLostError):
        store.recover(committed, still_held=driver.keeper.holding)
    monkeypatch.undo()
    assert paused
    driver.assert_new_job_untouched()  # fails now: the withdrawal deleted the new job's 00000.tar
    driver.stop()
