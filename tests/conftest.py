"""Shared fixtures: the tiny offline models, a local S3 server (moto) and Ray, all on 127.0.0.1."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# Ray Train's controller checks its workers every 2 s by default, so each training job ended up to 2 s after its
# workers did; the tests run a few dozen of them (measured: 2 to 4 s less per training job at 0.5 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Two test processes on two cores: torch's OpenMP threads that spin while they wait take cores the other process's
# jobs need (measured: 5% less time for three job files in two processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
# Started in the background by a script (`cmd &`), pytest would ignore SIGINT, and so would every driver it starts
# (an ignored signal stays ignored across exec): the tests that interrupt drivers need it handled.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


EXIT_STATUS = pytest.StashKey[int]()
RAY_FIXTURES = {"ray_gpus", "ray_cpus"}  # each starts a local Ray for its module


# The longest files (half a minute or more each: pytest --durations), longest first: run before the others, so
# that the test processes of `-n` (infra/local/dev.sh runs two, a file each at a time) end together rather than one
# waiting on the last of them.
LONGEST_FIRST = ("test_reproduce_toy.py", "test_train_job.py", "test_chaos.py", "test_bench_cpu.py",
                 "test_submit.py", "test_stage_jobs.py", "test_exit_status.py", "test_faults.py", "test_bench_gpu.py",
                 "test_identity.py", "test_jobs.py", "test_wide_unet.py", "test_encode_job.py", "test_demo.py",
                 "test_pool.py", "test_secrets.py", "test_node_loss.py", "test_verify.py", "test_named_inputs.py",
                 "test_worker.py")


def pytest_collection_modifyitems(config, items):
    """The fast tier is `-m "not slow"`: a test that needs a local Ray (through its fixtures) is slow, as is one
    marked so where it is written (it starts Ray itself, or runs commands as processes). In two processes or more
    (`-n`), the longest files go first (LONGEST_FIRST), the others keep their order."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if getattr(config.option, "numprocesses", None):
        rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends what tests started and left running: a Ray a job started in this process, and pyarrow's thread pools,
    whose late release of a Python file aborts an exiting interpreter (see jobs.errors.release_started; the job
    entry points do the same, and their exits are tested as processes).

    Then, in a process that was a Ray driver, it ends as the commands end (jobs.errors.process_exit): the exit
    functions run, and the process exits with pytest's status without destroying the C++ libraries' static
    objects. Ray leaves a metrics exporter thread running in a driver after some `ray.shutdown()`s (Ray's own
    workers end with os._exit for such reasons); a core dump of a full run that died of SIGSEGV after 694 passed
    showed it logging through spdlog's registry while exit() destroyed it (tests/RELIABILITY.md, issue 28)."""
    from jobs.errors import release_started

    release_started(ray_was_running=False)
    if "ray._raylet" in sys.modules and EXIT_STATUS in config.stash:
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(config.stash[EXIT_STATUS])


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    endpoint_url: str
    storage_options: dict  # for s3fs / fsspec.url_to_fs
    fs: object  # s3fs.S3FileSystem
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


@pytest.fixture(scope="session")
def s3():
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {
            "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": endpoint, "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]},
        }
        bucket = "test-bucket"
        # s3fs.mkdir sends a LocationConstraint that us-east-1 rejects; boto3 sends none.
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        yield S3(endpoint, options, fs, bucket)
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from jobs.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


def private_ray_tmpdir(tmp_path_factory) -> str:
    """A fresh RAY_TMPDIR for each Ray a test module starts: sessions never see each other's files. Ray's files
    stay with the tests' others (pytest keeps the last runs' folders: a failure's logs), reached through a short
    link directly under the system's temporary folder, whatever pytest's folder is (`-n`'s workers lengthen it):
    Ray's socket paths must fit the 107 bytes of a Unix socket's name. The link goes when the tests end."""
    folder = tmp_path_factory.mktemp("ray")
    links = tempfile.mkdtemp(prefix="ray-")
    atexit.register(shutil.rmtree, links, True)  # the link, not what it points to
    ray_tmp = os.path.join(links, "r")
    os.symlink(folder, ray_tmp)
    os.environ["RAY_TMPDIR"] = ray_tmp
    return ray_tmp


def start_ray(tmp_path_factory, **resources):
    """A private local Ray on 127.0.0.1 with logical GPUs; the caller shuts it down."""
    import ray

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=private_ray_tmpdir(tmp_path_factory), **resources)
    return ray


@pytest.fixture(scope="module")
def ray_gpus(tmp_path_factory):
    """Ray with 4 logical GPUs (and logical CPUs enough for the workers' fractions and Ray Data)."""
    ray = start_ray(tmp_path_factory, num_cpus=4, num_gpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cpus(tmp_path_factory):
    """Ray with 4 logical CPUs and no GPU: Ray Train's CPU workers, and jobs that run with --device cpu."""
    ray = start_ray(tmp_path_factory, num_cpus=4)
    yield ray
    ray.shutdown()
