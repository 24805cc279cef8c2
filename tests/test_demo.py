"""The README's first command: the demo runs both jobs on a local CPU Ray, verifies them, and resumes."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # jobs, clusters or benchmarks run as processes


def test_the_demo_runs_verifies_and_resumes(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "jobs.demo", "--workdir", str(tmp_path / "demo")]
    first = subprocess.run(command, env=env | {"PYTHONPATH": os.getcwd()}, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert first.stdout.count(": OK") == 2  # both outputs verified
    again = subprocess.run(command, env=env | {"PYTHONPATH": os.getcwd()}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count(": OK") == 2
    assert again.stderr.count("nothing to do") == 2  # both jobs found every shard committed
