"""The job's metrics as Ray's Prometheus endpoint exports them (a local Ray with its metrics port on 127.0.0.1),
against the job's own summary; the Grafana dashboard's queries against what is exported; the progress log line."""

import json
import logging
import re
import socket
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import start_ray
from jobs import generate
from pipeline.lock import OutputLock
from pipeline.metrics import EXPORTED
from pipeline.storage import filesystem

DASHBOARD = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "instaflow.json"
SAMPLE = re.compile(r"^(ray_instaflow_[a-z_]+)\{([^}]*)\} (\S+)$")


@pytest.fixture(scope="module")
def metrics_port(tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = start_ray(tmp_path_factory, num_cpus=4, num_gpus=2, _metrics_export_port=port,
                    _system_config={"metrics_report_interval_ms": 500})
    yield port
    ray.shutdown()


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found.append((match.group(1), tags, float(match.group(3))))
    return found


def total(samples, name: str, output: str, **tags) -> float:
    return sum(value for metric, found, value in samples if metric == name and found.get("output") == output
               and all(found.get(key) == want for key, want in tags.items()))


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_a_jobs_metrics_agree_with_its_summary(metrics_port, tiny_models, tmp_path, caplog):
    prompts = [*(f"a lighthouse at night, number {i}" for i in range(8)), ""]  # the empty one fails
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "prompts.parquet", row_group_size=3)
    output = str(tmp_path / "out")
    stale = OutputLock(*filesystem(output, {}), lease_s=1.0)  # a job that stopped renewing: the job takes over
    stale.acquire()
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        assert generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", output, "--model",
                              str(tiny_models["instaflow"]), "--height", "64", "--width", "64", "--rows-per-shard",
                              "3", "--num-workers", "2", "--lock-lease", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "_job.json").read_text())["progress"]
    assert (summary["shards_committed_now"], summary["samples_ok_now"], summary["samples_failed_now"]) == (3, 8, 1)

    deadline, samples = time.monotonic() + 30, []
    while time.monotonic() < deadline:  # the agent exports what the processes report every half second
        samples = scrape(metrics_port)
        if total(samples, "ray_instaflow_unit_seconds_count", output) == 3 and total(
                samples, "ray_instaflow_shards_total", output, status="committed") == 3:
            break
        time.sleep(0.5)
    assert total(samples, "ray_instaflow_shards_total", output, status="committed") == 3
    assert total(samples, "ray_instaflow_samples_total", output, status="ok") == summary["samples_ok_now"]
    assert total(samples, "ray_instaflow_samples_total", output, status="failed") == summary["samples_failed_now"]
    assert total(samples, "ray_instaflow_units_done", output) == total(samples, "ray_instaflow_units_total",
                                                                        output) == 3
    assert total(samples, "ray_instaflow_eta_seconds", output) == 0  # nothing left
    assert total(samples, "ray_instaflow_unit_tries_total", output) >= 3
    assert total(samples, "ray_instaflow_unit_seconds_count", output) == 3  # one per unit, over both workers
    assert total(samples, "ray_instaflow_lock_renewals_total", output) >= 1  # a 2 s lease renews often
    assert total(samples, "ray_instaflow_lock_takeovers_total", output) == 1
    busy = [(tags["worker"], value) for name, tags, value in samples
            if name == "ray_instaflow_device_busy_fraction" and tags.get("output") == output]
    assert 1 <= len(busy) <= 2 and all(0 < value <= 1 for _, value in busy)
    names = {name for name, tags, _ in samples}
    assert names <= set(EXPORTED), names - set(EXPORTED)  # the list the dashboard is checked against
    assert all(set(tags) <= {"output", "worker", "status", "le", "Component", "NodeAddress", "SessionName",
                             "Version", "WorkerId", "otel_scope_name", "otel_scope_schema_url",
                             "otel_scope_version"} for _, tags, _ in samples)  # no key or prompt is a tag
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("progress:")]
    assert lines and re.search(r"samples/s, ETA", lines[0])  # no terminal here: the progress line is logged


def test_every_dashboard_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all(panel["targets"] for panel in dashboard["panels"])
    named = {name for query in queries for name in re.findall(r"ray_instaflow_[a-z_]+", query)}
    assert named and named <= set(EXPORTED), named - set(EXPORTED)
    for family in ("samples_total", "device_busy_fraction", "eta_seconds", "shards_total", "unit_seconds_bucket"):
        assert f"ray_instaflow_{family}" in named  # throughput, busy per worker, ETA, failures, durations
