"""`instaflow-batch submit/status/logs/stop` against a real `ray start` head and moto S3, both on 127.0.0.1.

One head for the module, started and stopped by infra/local/cluster.py (which the last test checks stopped
everything it started). The head has the S3 endpoint and test credentials in its environment, as cluster nodes
have their own: the jobs carry none.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from ray.dashboard.modules.job.common import JobInfo, JobStatus

from infra.local.cluster import processes_naming
from infra.local.s3_server import CREDS
from jobs.main import main
from jobs.ray_jobs import connect, exit_status
from pipeline.commit import committed_shards
from pipeline.lock import lock_holder
from tests.jobhelpers import prompt_table, write_prompts

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "cluster-bucket"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster") / "state.json"
    command = [sys.executable, "-m", "infra.local.cluster"]
    started = subprocess.run(  # its private temp dir goes under /tmp: Ray's socket paths must stay short
        [*command, "start", "--state", str(state), "--num-cpus", "2", "--num-gpus", "2", "--bucket", BUCKET],
        cwd=PROJECT, capture_output=True, text=True, timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    info = json.loads(state.read_text())
    try:
        yield info
    finally:
        stopped = subprocess.run([*command, "stop", "--state", str(state)], cwd=PROJECT, capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not processes_naming(info["temp_dir"], f"--address={info['ray_address']} ")


@pytest.fixture(scope="module")
def bucket(cluster):
    fs = s3fs.S3FileSystem(key=CREDS["AWS_ACCESS_KEY_ID"], secret=CREDS["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": cluster["s3_endpoint_url"], "region_name": "us-east-1"},
                           skip_instance_cache=True)
    write_prompts(fs, f"{BUCKET}/prompts/prompts.parquet", prompt_table(12), row_group_size=4)
    write_prompts(fs, f"{BUCKET}/many/prompts.parquet", prompt_table(400), row_group_size=8)  # for stopping
    return fs


@pytest.fixture
def address(cluster, monkeypatch):
    """The dashboard by RAY_API_SERVER_ADDRESS, with a RAY_ADDRESS that would fail: the first one wins."""
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", cluster["dashboard_url"])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    return cluster["dashboard_url"]


def job_flags(tiny_models, output: str, *extra: str) -> list[str]:
    return ["--prompts", f"s3://{BUCKET}/prompts/", "--output", f"s3://{BUCKET}/{output}/",
            "--model", str(tiny_models["instaflow"]), "--height", "64", "--width", "64", "--batch-size", "2",
            "--rows-per-shard", "4", "--num-workers", "2", "--no-progress", *extra]


def submission_id(printed: str) -> str:
    return re.search(r"raysubmit_\w+", printed).group(0)


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_submit_then_follow_to_succeeded(address, bucket, tiny_models, capsys):
    assert main(["submit", *job_flags(tiny_models, "images")]) == 0
    printed = capsys.readouterr()
    job_id = printed.out.strip()
    assert job_id.startswith("raysubmit_") and "logs --follow" in printed.err

    assert main(["logs", job_id, "--follow"]) == 0
    logs = capsys.readouterr().out
    assert "python -m jobs.generate" in logs and "shards_committed_now           3" in logs
    assert main(["status", job_id]) == 0
    status = capsys.readouterr().out
    assert "status: SUCCEEDED" in status and "driver exit status: 0" in status
    info = connect(None).get_job_info(job_id)
    assert "RAY_ADDRESS" not in info.entrypoint and address not in info.entrypoint
    assert not (info.runtime_env or {}).get("env_vars")  # nothing of this shell's environment travels
    shards = committed_shards(bucket, f"{BUCKET}/images")
    assert sorted(shards) == [0, 1, 2] and sum(marker["count"] for marker in shards.values()) == 12


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_submit_wait_exits_with_the_drivers_status_for_bad_input(address, bucket, tiny_models, capsys):
    flags = job_flags(tiny_models, "nothing")
    flags[1] = f"s3://{BUCKET}/no-such-prompts/"
    assert main(["submit", "--wait", *flags]) == 2
    printed = capsys.readouterr()
    assert "error: no Parquet files found" in printed.out
    info = connect(None).get_job_info(submission_id(printed.err))
    assert info.status == JobStatus.FAILED and info.driver_exit_code == 2
    assert "no Parquet files found" in info.message


def test_address_flag_wins_over_the_environment(cluster, monkeypatch, capsys):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    assert main(["status", "raysubmit_nope", "--address", cluster["dashboard_url"]]) == 2
    assert "does not exist" in capsys.readouterr().err  # the cluster answered, not the dead addresses
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", cluster["dashboard_url"])
    assert main(["status", "raysubmit_nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_unknown_job_id_is_a_clean_error_for_every_command(address, capsys):
    """`logs --follow` asked a websocket that answered 404 (exit 1, "a bug"); now every command says the same.
    An id that is not one went into the API's path as it was: `?q=1` reached the job list (exit 1, "a bug") and
    `stop '?q=1'` the submit endpoint; such an id is refused before anything is sent."""
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        assert main([*command, "raysubmit_nope"]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1, (command, err)
        for not_an_id in ("", "?q=1", "#x", "../../api/jobs", "a/b", "raysubmit_x%2F"):
            with pytest.raises(SystemExit) as refused:  # as argparse refuses a flag
                main([*command, not_an_id])
            assert refused.value.code == 2, (command, not_an_id)
            err = capsys.readouterr().err
            assert f"argument submission_id: {not_an_id!r} is not a job id" in err, (command, err)
            assert len(err.splitlines()) == 1, (command, err)


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_stopped_job_resubmitted_resumes_and_completes(address, bucket, tiny_models, capsys):
    flags = job_flags(tiny_models, "stopped", "--rows-per-shard", "8", "--batch-size", "1")
    flags[1] = f"s3://{BUCKET}/many/"  # 400 prompts, 50 shards
    assert main(["submit", *flags]) == 0
    job_id = capsys.readouterr().out.strip()
    deadline = time.monotonic() + 120
    while not bucket.exists(f"{BUCKET}/stopped/_job.json") or not committed_shards(bucket, f"{BUCKET}/stopped"):
        assert time.monotonic() < deadline, "no shard committed in 120 s"
        time.sleep(0.2)
        bucket.invalidate_cache()
    assert main(["stop", job_id]) == 0
    client = connect(None)
    while not client.get_job_info(job_id).status.is_terminal():
        time.sleep(0.2)
    assert client.get_job_info(job_id).status == JobStatus.STOPPED
    # A stopped driver (SIGTERM) must release its output, as Ctrl-C does, for the next job to take it at once.
    assert lock_holder(bucket, f"{BUCKET}/stopped") is None, "SIGTERM left the output locked"
    done_before = len(committed_shards(bucket, f"{BUCKET}/stopped"))
    assert done_before < 50, "the job finished before it could be stopped: make it longer"
    capsys.readouterr()

    assert main(["submit", "--wait", *flags]) == 0  # exits with the driver's status: 0
    printed = capsys.readouterr()
    assert f"resuming: {done_before} of 50 shards already committed" in printed.out
    assert "SUCCEEDED, exit status 0" in printed.err
    shards = committed_shards(bucket, f"{BUCKET}/stopped")
    assert sorted(shards) == list(range(50)) and sum(marker["count"] for marker in shards.values()) == 400


def test_secrets_are_refused_before_anything_is_sent(tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")  # nothing listens: a send would fail
    for options in ('{"key": "AKIA0", "secret": "s3cr3t"}',
                    '{"client_kwargs": {"endpoint_url": "http://user:pw@127.0.0.1:9000"}}'):
        assert main(["submit", *job_flags(tiny_models, "x"), "--storage-options", options]) == 2
        err = capsys.readouterr().err
        assert "refusing to submit secrets" in err and "instance profile" in err
        assert "s3cr3t" not in err and "pw@" not in err
    assert main(["submit", *job_flags(tiny_models, "x"), "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--ray-address has no place in a submitted job" in capsys.readouterr().err
    assert main(["submit", *job_flags(tiny_models, "x"), "--height", "63"]) == 2  # the spec's own checks
    assert "height" in capsys.readouterr().err


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_storage_options_file_is_read_by_the_driver_on_the_cluster(address, bucket, tiny_models, tmp_path, capsys):
    """`--storage-options @FILE` names a file on the nodes: the entrypoint carries its path, and the driver reads
    it there (here the node is this machine)."""
    options = {"client_kwargs": {"region_name": "us-east-1"}, "default_block_size": 5 * 2**20}
    on_nodes = tmp_path / "on-nodes.json"
    on_nodes.write_text(json.dumps(options))
    assert main(["submit", "--wait", *job_flags(tiny_models, "options-file"), "--storage-options", f"@{on_nodes}"]) == 0
    printed = capsys.readouterr()
    info = connect(None).get_job_info(submission_id(printed.err))
    assert f"--storage-options @{on_nodes}" in info.entrypoint and "region_name" not in info.entrypoint
    manifest = json.loads(bucket.cat(f"{BUCKET}/options-file/_job.json"))
    assert manifest["storage_options"] == options  # what the driver read from the file


def test_storage_options_file_is_not_read_where_the_job_is_submitted(tiny_models, tmp_path, monkeypatch):
    """The path travels, made absolute as other local paths; its content (secrets allowed) is never read here."""
    from jobs.jobfile import parse_job
    from jobs.submit import job_entrypoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secrets.json").write_text('{"key": "AKIA0", "secret": "s3cr3t"}')
    for given, sent in (("@secrets.json", f"@{tmp_path}/secrets.json"), ("@/run/s3.json", "@/run/s3.json")):
        job = parse_job("instaflow-batch submit", [*job_flags(tiny_models, "x"), "--storage-options", given],
                        lambda parser: None)
        entrypoint = job_entrypoint(job)
        assert f"--storage-options {sent}" in entrypoint and "s3cr3t" not in entrypoint


def test_local_paths_are_made_absolute(tiny_models, tmp_path, monkeypatch):
    from jobs.jobfile import parse_job
    from jobs.submit import job_entrypoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(tiny_models["instaflow"].parent)
    job = parse_job("instaflow-batch submit", ["--prompts", "data/p.parquet", "--output", "out/x/",
                                               "--model", "models/instaflow"], lambda parser: None)
    entrypoint = job_entrypoint(job)
    assert f"--prompts {tmp_path}/data/p.parquet" in entrypoint and f"--output {tmp_path}/out/x" in entrypoint
    assert f"--model {tiny_models['instaflow'].resolve()}" in entrypoint
    hub = parse_job("instaflow-batch submit", ["--prompts", "s3://b/p/", "--output", "s3://b/o/",
                                               "--model", "XCLiu/instaflow_0_9B_from_sd_1_5"], lambda parser: None)
    assert "--model XCLiu/instaflow_0_9B_from_sd_1_5" in job_entrypoint(hub)  # hub ids stay as they are


@pytest.mark.parametrize("status, code, expected", [
    (JobStatus.SUCCEEDED, 0, 0), (JobStatus.FAILED, 1, 1), (JobStatus.FAILED, 2, 2), (JobStatus.FAILED, 3, 3),
    (JobStatus.FAILED, 4, 4), (JobStatus.FAILED, 130, 130), (JobStatus.FAILED, -9, 137),
    (JobStatus.STOPPED, None, 130), (JobStatus.FAILED, None, 2),
])
def test_exit_status_is_the_drivers(status, code, expected):
    assert exit_status(JobInfo(status=status, entrypoint="python -m jobs.generate", driver_exit_code=code)) == expected


def test_missing_address_is_a_clear_error(monkeypatch, capsys):
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["status", "raysubmit_x"]) == 2
    assert "no cluster address: pass --address" in capsys.readouterr().err
    assert os.environ.get("RAY_ADDRESS") is None


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_the_commands_options_go_before_or_after_the_job_name(tiny_models, tmp_path, monkeypatch):
    """`submit --address URL --wait generate ...` as the README's usage line has it, and every other order; the
    job's local models, adapters and ControlNets travel as absolute paths, a scale kept."""
    from jobs.jobfile import parse_job
    from jobs.submit import job_entrypoint, submit_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(tiny_models["instaflow"].parent)
    flags = ["--prompts", "s3://b/p/", "--output", "s3://b/o/", "--model", "models/instaflow", "--lora",
             "models/lora-kohya.safetensors:0.5", "--lora", "org/repo/style.safetensors", "--controlnet",
             "models/controlnet", "--merge-finetune", "models/finetune:0.8"]
    address = "http://127.0.0.1:8265"
    for argv in (["--address", address, "--wait", "generate", *flags], [f"--address={address}", "generate", *flags],
                 ["generate", "--wait", *flags, "--address", address], ["--wait", *flags, "--address", address]):
        job = parse_job("instaflow-batch submit", argv, submit_options)
        assert job.name == "generate" and job.args.address == address, argv
        assert job.args.wait == ("--wait" in argv)
    entrypoint = job_entrypoint(job)
    models = tiny_models["instaflow"].parent.resolve()
    assert f"--lora {models}/lora-kohya.safetensors:0.5" in entrypoint
    assert "--lora org/repo/style.safetensors" in entrypoint  # a hub file stays as it is
    assert f"--controlnet {models}/controlnet" in entrypoint and f"--merge-finetune {models}/finetune:0.8" in entrypoint
    with pytest.raises(Exception, match="unknown job"):
        parse_job("instaflow-batch submit", ["--address", address, "generat", *flags], submit_options)
