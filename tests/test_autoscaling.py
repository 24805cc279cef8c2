"""A cluster that starts with no GPU: the job asks for GPU workers, Ray's fake autoscaler adds GPU nodes for
them, and the job ends with its shards made on those nodes (logical GPUs, on 127.0.0.1)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from infra.local import cluster
from jobhelpers import prompt_table, stats, write_prompts

pytestmark = pytest.mark.slow  # jobs, clusters or benchmarks run as processes

FAKE_AUTOSCALER = {
    "cluster_name": "instaflow-fake",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
        "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    **{key: {} for key in ("auth", "docker", "file_mounts")},
    **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
    "file_mounts_sync_continuously": False,
}


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.fail("port 6379 is taken: Ray's fake autoscaler can only find a head there")
    root = tmp_path_factory.mktemp("autoscaling")
    config = root / "fake-autoscaler.yaml"
    config.write_text(json.dumps(FAKE_AUTOSCALER))  # JSON is YAML
    state = root / "cluster.json"
    assert cluster.main(["start", "--state", str(state), "--ray-port", "6379", "--num-cpus", "1",
                         "--num-gpus", "0", "--autoscaling-config", str(config)]) == 0
    yield root
    cluster.main(["stop", "--state", str(state)])


def test_gpu_workers_run_on_nodes_the_autoscaler_adds(autoscaling_head, tiny_models):
    prompts, output = autoscaling_head / "prompts.parquet", autoscaling_head / "out"
    import fsspec

    write_prompts(fsspec.filesystem("file"), str(prompts), prompt_table(16), row_group_size=4)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run([
        sys.executable, "-m", "jobs.generate", "--prompts", str(prompts), "--output", str(output),
        "--model", str(tiny_models["instaflow"]), "--height", "64", "--width", "64", "--dtype", "float32",
        "--rows-per-shard", "4", "--num-workers", "2", "--start-timeout", "300", "--no-progress",
        "--ray-address", "127.0.0.1:6379",
    ], env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "asking the autoscaler for the rest" in job.stderr  # no GPU was up when the job started
    shards = stats(fsspec.filesystem("file"), str(output))
    assert len(shards) == 4
    # The head has no GPU: every shard was made by a worker holding a GPU of a node the autoscaler added.
    assert all(len(shard["worker"]["gpu_ids"]) == 1 for shard in shards)
    manifest = json.loads((output / "_job.json").read_text())
    assert manifest["spec"]["device"] == "gpu" and manifest["spec"]["dtype"] == "float32"
