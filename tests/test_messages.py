"""Every mistake is one clean line: what reaches the user from each command is one line on stderr, with the
documented exit status, naming the file, field or URL; escaped, bounded, never a traceback.

Most cases call `main(argv)` in this process (what the console script runs); the process-level behaviours (the
exit status of `python -m jobs.generate`, SIGTERM while planning blocks) run it as a subprocess.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.main import main
from pipeline.deadline import abandoned_calls
from tests.jobhelpers import prompt_table

PROJECT = Path(__file__).resolve().parents[1]
ESCAPE = "\x1b[31m"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(prompt_table(8), path)
    return path


@pytest.fixture
def job(prompts, tiny_models):
    """A runnable generate command line, but for its output."""
    return ["run", "generate", "--prompts", str(prompts), "--model", str(tiny_models["instaflow"]),
            "--height", "64", "--width", "64", "--no-progress"]


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr (logs go to pytest's handler, not to stderr here)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err and not any(c in err for c in "\x1b\r\x00"), err
    return lines[0]


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_outputs_that_are_files_or_cannot_be_written(job, tmp_path, capsys):
    a_file = write(tmp_path / "a-file", "x")
    for output, named in ((a_file, "a-file' is a file, not a folder"), (f"{a_file}/sub", f"{a_file}/sub"),
                          ("/proc/instaflow-out", "/proc/instaflow-out"), ("/sys/kernel/instaflow", "/sys/kernel")):
        assert main([*job, "--output", output]) == 2, output
        line = error_line(capsys)
        assert line.startswith("error: ") and named in line, line
    assert Path(a_file).read_text() == "x"


def test_storage_options_that_are_not_a_json_object(job, tmp_path, capsys):
    """Inline and @FILE alike: the option and the file are named; a deep nesting is no RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    files = {name: write(tmp_path / f"{name}.json", data) for name, data in (
        ("deep", deep), ("list", "[1]"), ("bad", "{nope"), ("latin1", '{"a": "caf\xe9"}'.encode("latin-1")))}
    cases = [
        ("{nope", "not valid JSON"), (deep, "nested too deeply"), ("[1, 2]", "must be a JSON object, got list"),
        ('"text"', "must be a JSON object, got str"),
        (f"@{files['deep']}", "deep.json': JSON nested too deeply"), (f"@{files['list']}", "got list"),
        (f"@{files['bad']}", "bad.json': not valid JSON"), (f"@{files['latin1']}", "latin1.json': not UTF-8"),
        (f"@{tmp_path}/missing.json", "missing.json': cannot read it (No such file"),
        (f"@{tmp_path}", "cannot read it (Is a directory)"),
    ]
    for options, expected in cases:
        try:
            status = main([*job, "--output", str(tmp_path / "out"), "--storage-options", options])
        except SystemExit as exit_info:  # inline JSON: refused by the flag's parser
            status = exit_info.code
        assert status == 2, options[:40]
        line = error_line(capsys)
        assert "--storage-options" in line and expected in line and len(line) < 400, line
    assert not (tmp_path / "out").exists()
    for command in (["verify", str(tmp_path)], ["preview", str(tmp_path), "--out", str(tmp_path / "s.png")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--storage-options", f"@{files['list']}"])
        assert exit_info.value.code == 2 and "got list" in error_line(capsys)


def test_verify_on_what_is_not_an_output(tmp_path, capsys):
    a_file = write(tmp_path / "a-file", "x")
    manifests = {"[1, 2]": "holds an array, not a JSON object", "7": "holds a number, not a JSON object",
                 '"x"': "holds a string, not a JSON object", "null": "holds null, not a JSON object",
                 '{"spec": [1], "inputs": {}}': "spec is an array, inputs is an object"}
    cases = [(a_file, "is a file, not an output folder"), (str(tmp_path / "missing"), "no such folder"),
             (str(tmp_path / f"x{ESCAPE}\nb"), "x\\x1b[31m\\nb': no such folder")]
    for i, (manifest, expected) in enumerate(manifests.items()):
        output = tmp_path / f"out-{i}"
        output.mkdir()
        write(output / "_job.json", manifest)
        cases.append((str(output), f"_job.json: {expected}"))
    for output, expected in cases:
        assert main(["verify", output]) == 2, output
        assert expected in error_line(capsys)


@pytest.mark.parametrize("manifest, expected", [("[]", "holds an array, not a JSON object"),
                                                ('{"lineage": "x", "spec": 1}', "spec is a number, lineage is a string")])
def test_a_rerun_over_a_job_json_that_is_not_a_manifest(job, tmp_path, capsys, manifest, expected):
    (tmp_path / "out").mkdir()
    write(tmp_path / "out" / "_job.json", manifest)
    assert main([*job, "--output", str(tmp_path / "out")]) == 2
    assert f"_job.json: {expected}" in error_line(capsys)
    assert (tmp_path / "out" / "_job.json").read_text() == manifest  # nothing was written over it


@pytest.mark.parametrize("text, expected", [
    ("prompts: p\noutput: o\nmodel: m\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ("prompts: café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 12)"),
    ("a: " + "[" * 20_000 + "]" * 20_000, "nested too deeply"),
    ("prompts: p\n\x1b[31m: x\n", "not valid YAML: unacceptable character #x001b"),
    ("height: " + "x" * 100_000, "height: expected an integer, got 'xxxx"),
])
def test_job_files_that_cannot_be_read_are_one_line(tmp_path, capsys, text, expected):
    config = write(tmp_path / f"job{ESCAPE}\n.yaml", text)
    assert main(["run", "--config", config]) == 2
    line = error_line(capsys)
    assert expected in line and "job\\x1b[31m\\n.yaml" in line and len(line) < 1200, line[:300]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Nine levels of nine aliases would expand to 9**9 strings; the first alias is refused instead."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 10)]
    config = write(tmp_path / "bomb.yaml", "\n".join(["prompts: p", "output: o", "model: m", *lines, "height: *l9"]))
    started = time.monotonic()
    assert main(["run", "--config", config]) == 2
    assert time.monotonic() - started < 2
    assert "line 5, column 10: key 'l1[0]': a YAML alias (*l0) is not allowed in a job file" in error_line(capsys)


def test_flags_that_parse_badly_are_one_line(job, tmp_path, capsys):
    for argv, expected in (([*job, "--output", "o", "--height", "tall"], "argument --height: invalid int value"),
                           (["verify"], "the following arguments are required: output"),
                           (["status"], "the following arguments are required: submission_id"),
                           (["run", "--prompts", f"p{ESCAPE}"], "the following arguments are required")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        line = error_line(capsys)
        assert expected in line and "--help" in line, line
    assert main([f"frobnicate{ESCAPE}"]) == 2
    assert "unknown command 'frobnicate\\x1b[31m'" in error_line(capsys)


def test_a_prompts_path_with_control_characters_is_escaped(tiny_models, tmp_path, capsys):
    prompts = tmp_path / f"p{ESCAPE}\n.parquet"
    assert main(["run", "--prompts", str(prompts), "--output", str(tmp_path / "out"),
                 "--model", str(tiny_models["instaflow"]), "--height", "64", "--width", "64"]) == 2
    line = error_line(capsys)
    assert "no Parquet files found" in line and "p\\x1b[31m\\n.parquet" in line


def test_train_and_straightness_errors_are_one_line(tiny_models, tmp_path, capsys):
    model = str(tiny_models["instaflow"])
    missing = str(tmp_path / "no-pairs")
    assert main(["train", "--pairs", missing, "--init", model, "--output", str(tmp_path / "t")]) == 2
    assert missing in error_line(capsys)
    assert main(["straightness", "--pairs", missing, "--model", model, "--device", "cpu"]) == 2
    assert missing in error_line(capsys)


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    import jobs.verify

    def broken(output, storage_options, prompts):
        raise TypeError(f"an internal bug{ESCAPE}\nwith a second line" + "x" * 10_000)

    monkeypatch.setattr(jobs.verify, "verify_output", broken)
    (tmp_path / "out").mkdir()
    assert main(["verify", str(tmp_path / "out")]) == 1
    line = error_line(capsys)
    assert line.startswith("error: unexpected TypeError: an internal bug\\x1b[31m\\nwith") and len(line) <= 1010
    path = Path(line.rsplit("the full traceback is in ", 1)[1].rstrip(")"))
    try:
        traceback = path.read_text()
        assert "Traceback (most recent call last)" in traceback and "def broken" not in traceback
        assert "in broken" in traceback and "an internal bug" in traceback
        assert path.stat().st_mode & 0o077 == 0  # private: tracebacks can hold paths and values
    finally:
        path.unlink()


def test_storage_that_refuses_or_has_no_credentials_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import jobs.verify
    from botocore.exceptions import ClientError, NoCredentialsError

    for error in (NoCredentialsError(), ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjects")):
        def refusing(output, storage_options, prompts, error=error):
            raise error

        monkeypatch.setattr(jobs.verify, "verify_output", refusing)
        (tmp_path / "out").mkdir(exist_ok=True)  # a local folder: no storage client looks for credentials here
        assert main(["verify", str(tmp_path / "out")]) == 2
        line = error_line(capsys)
        assert line.startswith(f"error: storage: {type(error).__name__}: ") and "unexpected" not in line


def run_module(args: list[str], **kwargs) -> subprocess.Popen:
    env = os.environ | kwargs.pop("env", {})
    return subprocess.Popen([sys.executable, "-m", *args], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_job_entry_point_exits_with_one_line(tiny_models, tmp_path):
    """`python -m jobs.generate`, as a cluster runs it: the process's own exit status and stderr."""
    write(tmp_path / "a-file", "x")
    process = run_module(["jobs.generate", "--prompts", str(tmp_path / "none.parquet"), "--output",
                          str(tmp_path / "a-file"), "--model", str(tiny_models["instaflow"]), "--no-progress"])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and err.splitlines() == [f"error: output '{tmp_path}/a-file' is a file, not a "
                                                             "folder: name a folder (new or an output of this tool)"]


class SilentServer:
    """A store on 127.0.0.1 that takes connections and never answers: planning blocks on it, as on a hung store."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/prompts.parquet"

    def _accept(self) -> None:
        try:
            while True:
                self.connections.append(self.listener.accept()[0])
        except OSError:  # closed
            pass

    def close(self, timeout_s: float = 60.0) -> None:
        """Closes every connection (so the calls planning gave up on return: this test process must not keep a
        blocked thread, which its exit would wait for), until none is left."""
        self.listener.close()
        deadline = time.monotonic() + timeout_s
        while True:
            for connection in self.connections:
                connection.close()
            if not abandoned_calls():
                return
            assert time.monotonic() < deadline, "the abandoned planning call never returned"
            time.sleep(0.02)


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_prompts_that_are_not_a_regular_file_are_refused_at_once(job, tmp_path, capsys):
    """A FIFO (or a device) would block the reader or never end: a stat says so before anything reads it."""
    fifo = tmp_path / "prompts.parquet"
    os.mkfifo(fifo)
    for named in (fifo, "/dev/zero"):
        job[job.index("--prompts") + 1] = str(named)
        started = time.monotonic()
        assert main([*job, "--output", str(tmp_path / "out")]) == 2
        assert time.monotonic() - started < 10
        assert f"{named} is not a regular file or a folder (a FIFO, a device or a socket)" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_a_driver_blocked_on_a_store_that_never_answers(tiny_models, tmp_path, silent):
    process = run_module(["jobs.generate", "--prompts", silent.url, "--output", str(tmp_path / "out"),
                          "--model", str(tiny_models["instaflow"]), "--no-progress"])
    try:
        deadline = time.monotonic() + 120
        while not silent.connections:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the driver never asked the store"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130 and time.monotonic() - stopped < 5
    assert [line for line in err.splitlines() if "error" in line] == ["error: interrupted"]


def test_a_blocked_prompts_path_is_an_error_after_the_plan_timeout(job, tmp_path, capsys, monkeypatch, silent):
    monkeypatch.setenv("INSTAFLOW_PLAN_TIMEOUT_S", "1")
    job[job.index("--prompts") + 1] = silent.url
    started = time.monotonic()
    assert main([*job, "--output", str(tmp_path / "out")]) == 2
    assert time.monotonic() - started < 30
    line = error_line(capsys)
    assert f"prompts at {silent.url}: no answer in 1 s" in line and "INSTAFLOW_PLAN_TIMEOUT_S" in line
    silent.close()
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("INSTAFLOW_PLAN_TIMEOUT_S", "soon")
    assert main([*job, "--output", str(tmp_path / "out")]) == 2
    assert "INSTAFLOW_PLAN_TIMEOUT_S must be a number of seconds, got 'soon'" in error_line(capsys)
