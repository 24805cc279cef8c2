"""A node disappears mid-job on a three-node cluster (ray.cluster_utils): only its in-flight units are redone."""

import threading

import fsspec
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import private_ray_tmpdir
from jobhelpers import data_files, metadata_rows, prompt_table, stats, write_prompts
from pipeline.job import ray_pool, run_job
from pipeline.spec import JobSpec

pytestmark = pytest.mark.slow  # jobs, clusters or benchmarks run as processes

FS = fsspec.filesystem("file")
NUM_PROMPTS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A CPU-only head and two nodes with two logical GPUs each, all on 127.0.0.1."""
    private_ray_tmpdir(tmp_path_factory)  # Ray keeps its session under $RAY_TMPDIR/ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, gpu_nodes
    ray.shutdown()
    cluster.shutdown()


def test_lost_node_costs_only_its_units(cluster, tiny_models, tmp_path):
    cluster, gpu_nodes = cluster
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(NUM_PROMPTS), row_group_size=4)

    def spec(output):
        return JobSpec(prompts=str(tmp_path / "prompts.parquet"), output=str(tmp_path / output), tasks=("pairs",),
                       teacher=str(tiny_models["sd15"]), height=64, width=64, rows_per_shard=4, batch_size=4,
                       dtype="float32")

    assert run_job(spec("reference"), show_progress=False).complete
    reference = data_files(FS, str(tmp_path / "reference"))

    faulty = spec("out")
    pools, started, ended = [], [], set()  # (worker, unit) of the tries handed out; units whose try ended

    def watched_pool(*args):
        pool = ray_pool(*args)
        start, committed = pool.deadlines.start, pool.deadlines.on_committed
        pool.deadlines.start = lambda index, unit, ahead: started.append((index, unit.unit_id)) or start(
            index, unit, ahead)
        pool.deadlines.on_committed = lambda attempt: ended.add(attempt.unit.unit_id) or committed(attempt)
        pools.append(pool)
        return pool

    lost = gpu_nodes[0]
    lost_node_id = lost.node_id

    def units_on_lost_node() -> set[int]:
        on_node = {i for i, info in pools[0].worker_info.items() if info.get("node_id") == lost_node_id}
        return {unit for index, unit in list(started) if index in on_node} - ended

    result = {}
    job = threading.Thread(target=lambda: result.update(progress=run_job(faulty, watched_pool, show_progress=False)))
    job.start()
    # The node goes while its workers hold units (two, so that one committing meanwhile still leaves one) and
    # others have committed: a node lost with nothing in flight would cost nothing, and show nothing.
    while len(list((tmp_path / "out").glob("*.stats.json"))) < 2 or len(units_on_lost_node()) < 2:
        job.join(timeout=0.02)
        assert job.is_alive()
    assert pools[0].num_workers == 4  # one per logical GPU across both nodes
    cluster.remove_node(lost)
    job.join(timeout=300)

    progress = result["progress"]
    assert progress.complete
    shards = stats(FS, str(tmp_path / "out"))
    assert {shard["worker"]["node_id"] for shard in shards} >= {gpu_nodes[1].node_id}
    assert any(shard["attempt"] > 1 for shard in shards)  # the lost node's in-flight units, redone
    rows = metadata_rows(FS, str(tmp_path / "out"))
    assert len(rows) == NUM_PROMPTS and len({row["key"] for row in rows}) == NUM_PROMPTS
    assert data_files(FS, str(tmp_path / "out")) == reference
    assert lost_node_id not in {shard["worker"]["node_id"] for shard in shards if shard["attempt"] > 1}
