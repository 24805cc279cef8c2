"""Credentials never pass through Ray: a planted secret is found nowhere Ray displays, nor in the output."""

import base64
import http.server
import io
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle
from ray.util import state

from conftest import private_ray_tmpdir
from jobhelpers import prompt_table, write_prompts
from jobs import generate
from pipeline import storage
from pipeline.job import ray_pool, run_job
from pipeline.lock import OutputLostError
from pipeline.pool import ActorPool, NoWorkersError, worker_options
from pipeline.spec import JobSpec
from pipeline.worker import ShardWorker

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module

PLANTED = "planted-s3cr3t-9f2c"


@pytest.fixture(scope="module")
def ray_with_dashboard(tmp_path_factory):
    """A local Ray with its dashboard (on 127.0.0.1): what `ray list actors --detail` and the dashboard show."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=private_ray_tmpdir(tmp_path_factory))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow  # runs jobs or a cluster as processes
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


# Redaction by pattern: each form a secret takes in a message, a URL, a repr or JSON.
FORMS = [
    ("https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam.gserviceaccount"
     ".com%2F20260101&X-Goog-Signature=0a1b2c3d4e5f", ["0a1b2c3d4e5f", "sa%40p.iam"]),
    ("https://h/o?X-Amz-Security-Token=tok123&X-Amz-Signature=sig456", ["tok123", "sig456"]),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=azsig%3D", ["azsig"]),
    ("failed: DefaultEndpointsProtocol=https;AccountName=a;AccountKey=acctkey==;EndpointSuffix=x", ["acctkey"]),
    ("ConnectionError: could not connect to http://admin:hunter2x@minio:9000/bucket", ["hunter2x"]),
    ("cannot read http://:emptyuserpw@127.0.0.1:8000/p.parquet", ["emptyuserpw"]),  # a password, no user
    ("cannot read https://ghp_tokenasuser1@127.0.0.1:8000/p.parquet", ["ghp_tokenasuser1"]),  # a token as the user
    ("request headers: Authorization: Bearer eyJhbGciOi.payload.sig", ["eyJhbGciOi"]),
    ("sent Authorization: Basic dXNlcjpwYXNz", ["dXNlcjpwYXNz"]),
    ("botocore config: aws_secret_access_key=wJalrXUtnFEMI/K7MDENG and more", ["wJalrXUtnFEMI"]),
    ("ValueError: bad options {'secret': 'abc', 'anon': False}", ["abc"]),
    ('error: {"token": "tkn-1", "x": 1}', ["tkn-1"]),
    ("options {'headers': {'X-Api-Key': 'zzz-key', 'User-Agent': 'me'}, 'anon': True}", ["zzz-key", "me"]),
    ("S3FileSystem(secret='s3cr3t', anon=False)", ["s3cr3t"]),
    ("client_secret: cl1ent", ["cl1ent"]),
    (r'ClientError: "{\"password\": \"pa55word\", \"x\": 1}"', ["pa55word"]),  # JSON inside a string
]


@pytest.mark.parametrize("text,secrets", FORMS)
def test_redaction_finds_secrets_in_every_form(text, secrets):
    redacted = storage.redact_text(text)
    assert "***" in redacted and not [secret for secret in secrets if secret in redacted], redacted


def test_redaction_leaves_ordinary_messages_alone():
    for text in ("KeyError: 'prompt'", "prompt truncated to 77 tokens: a cat", "sample 000012: generation failed",
                 '{"key": "", "token": null, "headers": {}}', "s3://bucket/out/000001.tar"):
        assert storage.redact_text(text) == text


def test_secrets_are_hidden_by_value_wherever_they_turn_up(monkeypatch, caplog):
    """A secret of the storage options or the environment is hidden in any string, whatever surrounds it, and in
    every log record of the process, its arguments and its traceback included."""
    monkeypatch.setattr(storage, "_remembered_secrets", set())
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "env-account-key-1")
    options = {"secret": "option/secret+1", "headers": {"X-Trace": "header-value-1"},
               "client_kwargs": {"endpoint_url": "http://user:url-password-1@127.0.0.1:9"}, "anon": False}
    storage.protect_secrets(options)
    secrets = ["env-account-key-1", "option/secret+1", "header-value-1", "url-password-1"]
    text = "; ".join(f"rejected ({secret})" for secret in [*secrets, "option%2Fsecret%2B1"])  # URL-encoded too
    assert storage.redact_text(text) == "; ".join(["rejected (***)"] * 5)
    assert storage.redact(options) == {"secret": "***", "headers": "***", "anon": False,
                                       "client_kwargs": {"endpoint_url": "http://***@127.0.0.1:9"}}
    log = logging.getLogger("pipeline.test")
    with caplog.at_level(logging.INFO):
        log.warning("unit %d failed: %s", 3, "upload refused for header-value-1")
        try:
            raise ConnectionError("endpoint said no to option/secret+1")
        except ConnectionError:
            log.exception("worker lost")
    formatted = "\n".join(logging.Formatter().format(record) for record in caplog.records)
    assert "unit 3 failed: upload refused for ***" in formatted and "ConnectionError" in formatted
    assert not [secret for secret in secrets if secret in formatted + caplog.text]


def test_no_secret_is_forwarded_in_the_runtime_environment(monkeypatch):
    """What Ray shows of a worker's environment (its runtime env) holds storage settings, never a secret: not
    by name (an ABFS account key or connection string, HTTP headers), nor inside a value (an fsspec JSON
    config, a URL password), nor as the value of a secret variable or storage option."""
    monkeypatch.setattr(storage, "_remembered_secrets", set())
    storage.remember_secrets({"secret": "remembered-1"})
    monkeypatch.setenv("MY_TOKEN", "env-secret-value-1")
    kept = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "FSSPEC_S3_ANON": "false", "HF_HUB_OFFLINE": "1",
            "FSSPEC_ABFS_ACCOUNT_NAME": "acct"}
    dropped = {"FSSPEC_ABFS_ACCOUNT_KEY": "k1", "FSSPEC_ABFS_CONNECTION_STRING": "AccountName=a;AccountKey=k2",
               "FSSPEC_ABFS_SAS_TOKEN": "sv=1&sig=k3", "FSSPEC_HTTP_HEADERS": '{"X-Api-Key": "k4"}',
               "FSSPEC_HTTP_CLIENT_KWARGS": '{"headers": {"Authorization": "Bearer k5"}}',
               "FSSPEC_S3": '{"secret": "k6"}', "AWS_CONTAINER_AUTHORIZATION_TOKEN": "k7",
               "GCSFS_DEFAULT_PROJECT": "http://u:k8@h", "FSSPEC_GCS_ENDPOINT_URL": "http://h/remembered-1",
               "HF_ENDPOINT": "http://h/env-secret-value-1", "AZURE_STORAGE_ACCOUNT_KEY": "k9"}
    for name, value in {**kept, **dropped}.items():
        monkeypatch.setenv(name, value)
    env = worker_options(1, 1.0)["runtime_env"]["env_vars"]
    assert kept.items() <= env.items() and not set(dropped) & set(env)


def test_submit_refuses_a_secret_in_any_flag(tiny_models, monkeypatch, capsys):
    """The entrypoint Ray stores and shows carries no secret: by pattern in any flag, by key in the storage
    options (headers included), or as the value of one of this machine's secret variables."""
    from jobs.main import main

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")  # nothing listens: a send would fail
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    flags = ["--prompts", "s3://b/prompts/", "--output", "s3://b/out/", "--model", str(tiny_models["instaflow"]),
             "--height", "64", "--width", "64", "--no-progress"]
    for extra in (["--decoder", "tiny", "--tiny-decoder", "https://h/taesd?X-Goog-Signature=abcdef"],
                  ["--decoder", "tiny", "--tiny-decoder", f"org/{PLANTED}"],
                  ["--storage-options", '{"headers": {"X-Api-Key": "abcdef"}}']):
        assert main(["submit", *flags, *extra]) == 2
        err = capsys.readouterr().err
        assert "refusing to submit secrets" in err and "abcdef" not in err and PLANTED not in err, err


LEAKED = "leaked-option-secret-7d1e"  # the storage options' secret, quoted by a failing client library
LEAKED_TOKEN = "leaked-session-token-3b9a"


class LeakyWorker(ShardWorker):
    """A worker whose errors quote the job's secrets in no form a pattern knows, as a client library's might: one
    row fails on every try, and one unit fails on every try."""

    def _run_batch(self, keys, batch):
        if any(prompt.endswith("number 1") for prompt in batch.prompts):
            raise ConnectionError(f"upload refused ({self.spec.storage_options['client_kwargs']['aws_session_token']})")
        return super()._run_batch(keys, batch)

    def _process(self, unit, attempt):
        if unit.unit_id == 2:
            logging.getLogger("pipeline.worker").warning("giving up on %s", self.spec.storage_options["secret"])
            raise ConnectionError(f"endpoint rejected {self.spec.storage_options['secret']}")
        return super()._process(unit, attempt)


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_a_secret_in_a_workers_errors_is_nowhere_the_job_writes_or_logs(ray_with_dashboard, s3, tiny_models,
                                                                       caplog, capsys):
    write_prompts(s3.fs, f"{s3.bucket}/leak-in/p.parquet", prompt_table(12), row_group_size=4)
    options = {**s3.storage_options, "secret": LEAKED,  # moto checks neither the secret nor the token
               "client_kwargs": {**s3.storage_options["client_kwargs"], "aws_session_token": LEAKED_TOKEN}}
    spec = JobSpec(prompts=s3.url("leak-in/"), output=s3.url("leak-out/"), model=str(tiny_models["instaflow"]),
                   height=64, width=64, dtype="float32", rows_per_shard=4, batch_size=4, max_unit_attempts=2,
                   storage_options=options)

    def leaky_pool(spec, sources, fence, num_units):
        actor = ray.remote(LeakyWorker).options(**worker_options(1, 1.0))
        return ActorPool(lambda index: actor.remote(spec, sources, fence), 2, spec.max_unit_attempts)

    with caplog.at_level(logging.INFO):
        progress = run_job(spec, leaky_pool, show_progress=False)
    assert progress.committed_units == 2 and [r.unit.unit_id for r in progress.failed_units] == [2]
    assert progress.failed_samples == 1 and "endpoint rejected ***" in progress.summary()["failed_shards"][0]["error"]

    written = {}  # every file of the output, the rows' error messages read out of the (compressed) Parquet
    s3.fs.invalidate_cache()
    for path in s3.fs.find(f"{s3.bucket}/leak-out"):
        data = s3.fs.cat_file(path)
        written[path] = data.decode(errors="replace")
        if path.endswith(".parquet"):
            written[path] += json.dumps(pq.read_table(io.BytesIO(data), columns=["error_message"]).to_pylist())
    assert any("upload refused (***)" in text for text in written.values())  # the failed row says why
    assert any(path.endswith("_job.json") for path in written)
    printed = capsys.readouterr()
    ray_logs = [path.read_text(errors="replace") for path in Path(os.environ["RAY_TMPDIR"]).rglob("*")
                if path.is_file() and path.suffix in (".log", ".out", ".err")]
    address = ray_with_dashboard  # what Ray's state API shows of the failed tasks (their errors) and the actors
    shown = json.dumps([state.list_tasks(address=address, detail=True, limit=10_000),
                        state.list_actors(address=address, detail=True, limit=10_000)], default=str)
    everything = [*written.values(), progress.table(), json.dumps(progress.summary()), printed.out, printed.err,
                  caplog.text, shown, *ray_logs]
    assert "giving up on ***" in "".join(ray_logs)  # the worker's own log line is there, redacted
    for secret in (LEAKED, LEAKED_TOKEN):
        assert not [text[max(0, text.find(secret) - 200):][:400] for text in everything if secret in text]


@pytest.mark.slow  # runs jobs or a cluster as processes
@pytest.mark.parametrize("outcome", ["complete", "no workers", "interrupted", "lost", "crashed"])
def test_the_autoscaler_request_is_withdrawn_however_the_job_ends(ray_with_dashboard, tiny_models, tmp_path,
                                                                 monkeypatch, outcome):
    """A job that asks for more GPUs than are up asks the autoscaler for them; the request stands until it is
    replaced, so the job withdraws it when it ends, however it ends, or a long-lived cluster keeps the nodes."""
    import ray.autoscaler.sdk

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kwargs: requests.append(kwargs))
    stops = {"interrupted": KeyboardInterrupt(), "lost": OutputLostError("taken over"), "crashed": RuntimeError("x")}
    if outcome in stops:
        def stop(*args, **kwargs):
            raise stops[outcome]
        monkeypatch.setattr(ActorPool, "wait_until_ready", stop)
    write_prompts(storage.filesystem("file")[0], str(tmp_path / "p.parquet"), prompt_table(4))
    spec = JobSpec(prompts=str(tmp_path / "p.parquet"), output=str(tmp_path / "out"),
                   model=str(tiny_models["instaflow"]), height=64, width=64, dtype="float32", rows_per_shard=4,
                   num_workers=3, **({"cpus_per_worker": 64, "start_timeout_s": 1} if outcome == "no workers" else {}))
    if outcome in ("no workers", "crashed"):
        with pytest.raises(NoWorkersError if outcome == "no workers" else RuntimeError):
            run_job(spec, ray_pool, show_progress=False)
    else:
        progress = run_job(spec, ray_pool, show_progress=False)
        assert progress.status == {"lost": "lost", "interrupted": "interrupted"}.get(outcome, "complete")
    assert len(requests[0]["bundles"]) == 3 and requests[-1] == {"bundles": []}, requests


def test_a_secret_of_the_storage_options_is_hidden_in_the_error_of_any_command(s3, monkeypatch, capsys):
    """Every command that reaches storage with the options (verify here) hides their secrets in what it prints,
    not only jobs: here an error that quotes the secret in no form a pattern knows."""
    from jobs.main import main

    monkeypatch.setattr(storage, "_remembered_secrets", set())
    secret = "verify-secret-5a7c"

    def refusing(method):
        def read(self, path, *args, **kwargs):
            if path.endswith("_job.json"):
                raise PermissionError(f"access denied with {secret}")
            return method(self, path, *args, **kwargs)
        return read

    s3.fs.pipe_file(f"{s3.bucket}/verify-out/_job.json", b"{}")
    for method in ("_cat_file", "_info", "_open"):
        monkeypatch.setattr(type(s3.fs), method, refusing(getattr(type(s3.fs), method)))
    options = {**s3.storage_options, "secret": secret}
    main(["verify", s3.url("verify-out/"), "--storage-options", json.dumps(options)])
    printed = capsys.readouterr()
    assert "access denied with ***" in printed.err and secret not in printed.out + printed.err, printed.err


class LeakyStartWorker(ShardWorker):
    """A worker that cannot start, its error quoting the storage options' secret."""

    def load_models(self, sources):
        raise ConnectionError(f"model store rejected {self.spec.storage_options['secret']}")


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_a_secret_in_a_workers_start_up_error_is_nowhere_shown(ray_with_dashboard, tiny_models, tmp_path, caplog):
    write_prompts(storage.filesystem("file")[0], str(tmp_path / "p.parquet"), prompt_table(4))
    secret = "start-up-secret-0e4d"
    spec = JobSpec(prompts=str(tmp_path / "p.parquet"), output=str(tmp_path / "out"),
                   model=str(tiny_models["instaflow"]), height=64, width=64, dtype="float32", rows_per_shard=4,
                   storage_options={"secret": secret})

    def leaky_pool(spec, sources, fence, num_units):
        actor = ray.remote(LeakyStartWorker).options(**worker_options(1, 1.0))
        return ActorPool(lambda index: actor.remote(spec, sources, fence), 1, spec.max_unit_attempts)

    with caplog.at_level(logging.INFO), pytest.raises(NoWorkersError) as error:
        run_job(spec, leaky_pool, show_progress=False)
    assert "model store rejected ***" in str(error.value)
    shown = json.dumps(state.list_actors(address=ray_with_dashboard, detail=True, limit=10_000), default=str)
    assert "LeakyStartWorker" in shown and secret not in shown and secret not in caplog.text


URL_PASSWORD, URL_SIGNATURE, MODEL_SIGNATURE = "s3cretpw-41c7", "urlsig-0d9e2f", "modelsig-6b1a"


@pytest.fixture
def prompts_over_http(tmp_path):
    """Prompts served on 127.0.0.1 over HTTP with basic auth and byte ranges (what fsspec reads Parquet with);
    the URL carries the password and a signed-URL query, as a presigned or credentialed link would."""
    folder = tmp_path / "served"
    folder.mkdir()
    pq.write_table(prompt_table(8), folder / "p.parquet", row_group_size=4)
    expected = "Basic " + base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            path = folder / self.path.split("?")[0].lstrip("/")
            if self.headers.get("Authorization") != expected or not path.is_file():
                self.send_response(401 if path.is_file() else 404)
                self.end_headers()
                return
            data = path.read_bytes()
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            start, end = (int(wanted[1]), min(int(wanted[2] or len(data) - 1), len(data) - 1)) if wanted else (0, len(data) - 1)
            self.send_response(206 if wanted else 200)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self.wfile.write(data[start : end + 1])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (f"http://user:{URL_PASSWORD}@127.0.0.1:{server.server_address[1]}/p.parquet"
           f"?X-Amz-Signature={URL_SIGNATURE}")
    server.shutdown()


def readable_output(root: Path) -> dict[str, str]:
    """Every file under an output as text: Parquet files read out (they are compressed), with their schema's
    metadata; tars as they are (uncompressed, their JSON members readable)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            found[str(path)] = path.read_bytes().decode(errors="replace")
            if path.suffix == ".parquet":
                table = pq.read_table(path)
                found[str(path)] += json.dumps([{k: v for k, v in row.items() if not isinstance(v, (bytes, dict))}
                                                for row in table.to_pylist()], default=str)
                found[str(path)] += str(table.schema.metadata)
    return found


@pytest.mark.slow  # runs jobs or a cluster as processes
def test_a_password_or_signature_in_the_prompts_url_or_model_name_is_in_no_sink(ray_with_dashboard, tiny_models,
                                                                                prompts_over_http, tmp_path, caplog,
                                                                                capsys):
    """Prompts read over HTTP with a password and a signature in their URL, and a model whose name carries a
    signature: the job runs, resumes under a new signature, and neither secret is in any file of the output
    (markers, _job.json, Parquet, tars' JSON), what it printed or logged, or what Ray shows."""
    from jobs.main import main

    model = tmp_path / f"instaflow?X-Amz-Signature={MODEL_SIGNATURE}"
    model.symlink_to(tiny_models["instaflow"], target_is_directory=True)
    flags = ["--output", str(tmp_path / "out"), "--model", str(model), "--height", "64", "--width", "64",
             "--dtype", "float32", "--rows-per-shard", "4", "--num-workers", "1", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(["run", "generate", "--prompts", prompts_over_http, *flags]) == 0
        resigned = prompts_over_http.replace(URL_SIGNATURE, "urlsig-rotated")
        assert main(["run", "generate", "--prompts", resigned, *flags]) == 0  # the same input: nothing to do
    printed = capsys.readouterr()
    assert "all 2 shards are committed: nothing to do" in caplog.text
    written = readable_output(tmp_path / "out")
    assert len([path for path in written if path.endswith(".stats.json")]) == 2
    assert "X-Amz-Signature=***" in written[str(tmp_path / "out" / "00000.stats.json")]  # the unit, redacted
    ray_logs = [path.read_text(errors="replace") for path in Path(os.environ["RAY_TMPDIR"]).rglob("*")
                if path.is_file() and path.suffix in (".log", ".out", ".err")]
    shown = json.dumps([state.list_tasks(address=ray_with_dashboard, detail=True, limit=10_000),
                        state.list_actors(address=ray_with_dashboard, detail=True, limit=10_000)], default=str)
    everything = {**written, "stdout": printed.out, "stderr": printed.err, "log": caplog.text, "ray": shown,
                  **{f"ray log {i}": text for i, text in enumerate(ray_logs)}}
    for secret in (URL_PASSWORD, URL_SIGNATURE, MODEL_SIGNATURE):
        assert not [(where, text[max(0, text.find(secret) - 100):][:200]) for where, text in everything.items()
                    if secret in text], secret

    # verify re-reads the input: from the redacted URL it cannot, and says to pass the URL; given it, it passes
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "pass it as --prompts" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "out"), "--prompts", resigned]) == 0
    assert main(["verify", str(tmp_path / "out"), "--prompts", prompts_over_http.replace("p.parquet", "q.parquet")]) == 2
    assert URL_PASSWORD not in "".join(capsys.readouterr())
