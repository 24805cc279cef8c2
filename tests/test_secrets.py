"""Credentials never pass through Ray: a planted secret is found nowhere Ray displays, nor in the output."""

import json
import os
from pathlib import Path

import pytest
import ray
from ray.util import state

from conftest import private_ray_tmpdir
from jobhelpers import prompt_table, write_prompts
from jobs import generate

PLANTED = "planted-s3cr3t-9f2c"


@pytest.fixture(scope="module")
def ray_with_dashboard(tmp_path_factory):
    """A local Ray with its dashboard (on 127.0.0.1): what `ray list actors --detail` and the dashboard show."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=private_ray_tmpdir(tmp_path_factory))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_a_planted_secret_is_nowhere_ray_or_the_output_shows_it(ray_with_dashboard, s3, tiny_models, monkeypatch,
                                                                 caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", PLANTED)  # in the driver's environment, as a user's shell would have it
    monkeypatch.setenv("AWS_SESSION_TOKEN", PLANTED)
    write_prompts(s3.fs, f"{s3.bucket}/secret-in/p.parquet", prompt_table(8))
    options = {**s3.storage_options, "secret": PLANTED}  # moto does not check signatures: any secret works
    status = generate.main([
        "--prompts", s3.url("secret-in/"), "--output", s3.url("secret-out/"), "--model", str(tiny_models["instaflow"]),
        "--height", "64", "--width", "64", "--dtype", "float32", "--rows-per-shard", "4", "--num-workers", "2",
        "--storage-options", json.dumps(options), "--no-progress",
    ])
    assert status == 0
    # Everything Ray's state API shows (`ray list actors --detail`, tasks, jobs, workers, the dashboard's data).
    address = ray_with_dashboard
    shown = [state.list_actors(address=address, detail=True, limit=10_000),
             state.list_tasks(address=address, detail=True, limit=10_000),
             state.list_jobs(address=address, detail=True),
             state.list_workers(address=address, detail=True, limit=10_000)]
    assert any(actor["class_name"] == "ShardWorker" for actor in shown[0])  # the API did show the job's actors
    assert PLANTED not in json.dumps(shown, default=str)
    # Ray's logs of this session (drivers, workers, raylet, GCS).
    logs = Path(ray.get_runtime_context().get_node_id() and os.environ["RAY_TMPDIR"])
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".json", ".txt"):
            assert PLANTED not in path.read_text(errors="replace"), path
    # The output: _job.json, the markers, the data; and what the driver printed.
    s3.fs.invalidate_cache()
    for path in s3.fs.find(f"{s3.bucket}/secret-out"):
        assert PLANTED.encode() not in s3.fs.cat_file(path), path
    printed = capsys.readouterr()
    assert PLANTED not in printed.out + printed.err + caplog.text
