"""Each command exits with its documented status every time, with its error as the last line (issue 28).

The commands run as processes of their own, as users run them: an abort in the interpreter's exit (pyarrow's
pools releasing a Python file after the read returned) happened after the verdict was printed, in a few runs in a
hundred, and a Ray worker's crash dump could follow a job's error line.
"""

from __future__ import annotations

import errno
import signal
import subprocess

import pytest
import safetensors.torch

from tests.bench.exit_status import CLI, ENV, PROJECT, Case, interrupt_after, misfits, run_many, standard_cases
from jobs.main import main
from tests.jobhelpers import prompt_table

RUNS = {"verify": 20, "preview": 3, "report": 3, "straightness refusal": 4}


@pytest.fixture(scope="module")
def finished(ray_gpus, tiny_models, tmp_path_factory):
    """A finished image output of 8 prompts with carried columns, made in this process."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("exit-status")
    table = prompt_table(8)
    for j in range(200):
        table = table.append_column(f"carried_{j}", [[j] * len(table)])
    pq.write_table(table, root / "prompts.parquet")
    flags = ["--prompts", str(root / "prompts.parquet"), "--model", str(tiny_models["instaflow"]), "--height", "64",
             "--width", "64", "--batch-size", "4", "--rows-per-shard", "4", "--num-workers", "1", "--device", "cpu",
             "--no-progress"]
    assert main(["run", "generate", *flags, "--output", str(root / "out")]) == 0
    return root, flags


def test_each_command_exits_with_its_documented_status_every_time(finished, tiny_models):
    root, _ = finished
    cases = standard_cases(root / "out", tiny_models["instaflow"].parent, root)
    outcomes = run_many([case for case in cases if case.name == "verify"], RUNS["verify"], parallel=2)
    for case in cases[1:]:
        outcomes += run_many([case], RUNS[case.name], parallel=2)
    assert len(outcomes) == sum(RUNS.values())
    assert not misfits(cases, outcomes), misfits(cases, outcomes)


def test_an_interrupt_while_a_command_closes_down_exits_130_with_its_line_last(finished):
    """Ctrl-C or SIGTERM once the summary is out lands in the release (Ray's shutdown, pyarrow's pools) or the
    exit: it was a traceback (status 1 or -2) or a death by signal (-15). A verify whose signal came after its
    exit's last check for one (jobs.errors.process_exit: microseconds before it ends, a moment a loaded machine
    can stretch), or after it ended, exits 0 with its own last line; runs go on until 2 exited 130."""
    root, flags = finished
    generate = Case("generate", ["run", "generate", *flags, "--output", str(root / "closing")], 0)
    held, outcome = interrupt_after(generate, "metrics", signal.SIGINT)  # Ray's shutdown takes a second or two
    assert held and (outcome.status, outcome.last_stderr) == (130, "error: interrupted"), outcome
    verify, reached = Case("verify", ["verify", str(root / "out")], 0), 0
    for signum in [signal.SIGTERM, signal.SIGINT] * 4:
        _, outcome = interrupt_after(verify, "verdict", signum)
        if outcome.status == 130:
            assert outcome.last_stderr == "error: interrupted", (signum, outcome)
            reached += 1
        else:
            assert outcome.status == 0 and not outcome.last_stderr.startswith(("error", "Traceback")), outcome
        if reached == 2:
            break
    assert reached == 2, "the signal never reached verify before its exit's last check"


def test_a_worker_that_cannot_load_its_lora_ends_with_the_error_line(finished, tiny_models):
    """Finite weights whose fused result overflows are found in the worker only (NaN in the file is refused on
    the driver); the failed workers' crash dumps (Ray's) must not follow the driver's error, which names the
    file."""
    root, flags = finished
    state = safetensors.torch.load_file(tiny_models["lora-kohya"])
    key = next(k for k in state if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    state[key][0, 0] = 3e38
    safetensors.torch.save_file(state, root / "overflow.safetensors")
    done = subprocess.run([*CLI, "run", "generate", *flags, "--output", str(root / "overflow-out"), "--lora",
                           f"{root / 'overflow.safetensors'}:1e30"], capture_output=True, text=True, env=ENV,
                          cwd=PROJECT, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode not in (0, 1), done.stderr[-3000:]
    assert last.startswith("error: ") and "overflow.safetensors" in last and "non-finite" in last, done.stderr[-3000:]


def test_an_error_after_shards_were_committed_exits_1_and_a_rerun_resumes(finished, monkeypatch, capfd, caplog):
    """A storage error once the job has started on its output is not "bad input, nothing ran" (2)."""
    import pipeline.job

    root, flags = finished

    def storage_fails(store, *args):
        raise OSError(errno.EIO, "injected I/O error", f"{store.root}/00000.done")

    monkeypatch.setattr(pipeline.job, "_audit", storage_fails)
    output = ["--output", str(root / "resumed")]
    assert main(["run", "generate", *flags, *output]) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "00000.done: injected I/O error" in last, last
    assert "re-running the same command resumes" in last, last
    monkeypatch.undo()
    caplog.set_level("INFO", logger="pipeline.job")
    assert main(["run", "generate", *flags, *output]) == 0
    assert "all 2 shards are committed: nothing to do" in caplog.text
