"""Runs `instaflow-batch` commands many times as separate processes and counts how each one ended.

A command's exit status is part of what it promises (README: exit status): 0 for an intact output verified,
2 for a refusal, and so on, every time. An abort in the interpreter's exit (issue 28: SIGABRT after the verdict
was printed, about 1 run in 20 on a busy 2-core machine) shows only in many runs, so this runs each command
`--runs` times, `--parallel` at once (a busy machine makes the race likelier), and reports any run whose status
was not the documented one or whose stderr did not end with the expected line.

    .venv/bin/python -m tests.bench.exit_status --workdir /tmp/exit-status --runs 150 --parallel 2

builds the tiny models and a finished 48-prompt output (one with 2,000 carried input columns, on which the abort
was most frequent) in `--workdir`, then runs verify, preview, report and a straightness refusal on it.

    .venv/bin/python -m tests.bench.exit_status --workdir /tmp/exit-status --interrupt --runs 40 --generate-runs 4

interrupts instead, with SIGTERM and SIGINT in turn, the moment the summary's last line is out: verify `--runs`
times, and `run generate` of the 48 prompts into a fresh output `--generate-runs` times. Each must exit 130 with
`error: interrupted` last, or 0 where it had ended before the signal could reach it (counted apart).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "jobs.main"]
ENV = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
PROJECT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    status: int  # the documented exit status
    last_stderr: str = ""  # what the last line of stderr must start with ("" for no requirement)


@dataclass(frozen=True)
class Outcome:
    case: str
    status: int
    last_stderr: str

    def fits(self, case: Case) -> bool:
        return self.status == case.status and self.last_stderr.startswith(case.last_stderr)


def run_once(case: Case, timeout_s: float = 300.0) -> Outcome:
    done = subprocess.run([*CLI, *case.argv], capture_output=True, text=True, env=ENV, cwd=PROJECT,
                          timeout=timeout_s)
    lines = done.stderr.strip().splitlines()
    return Outcome(case.name, done.returncode, lines[-1] if lines else "")


def interrupt_after(case: Case, marker: str, signum: int, timeout_s: float = 300.0) -> tuple[bool, Outcome]:
    """Runs `case` and sends it `signum` the moment its stdout has a line with `marker` (its summary's last line:
    the command is closing down). Returns whether the signal reached the process before it ended, and how it
    ended. The process is stopped (SIGSTOP) before the signal, so that "ended before" is known without a race."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([*CLI, *case.argv], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=ENV | {"PYTHONUNBUFFERED": "1"}, cwd=PROJECT)
        for line in process.stdout:
            if marker in line:
                break
        os.kill(process.pid, signal.SIGSTOP)
        held = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WSTOPPED | os.WNOWAIT).si_code == os.CLD_STOPPED
        if held:
            os.kill(process.pid, signum)
            os.kill(process.pid, signal.SIGCONT)
        process.stdout.read()
        status = process.wait(timeout_s)
        stderr.seek(0)
        lines = stderr.read().strip().splitlines()
    return held, Outcome(case.name, status, lines[-1] if lines else "")


def run_many(cases: list[Case], runs: int, parallel: int) -> list[Outcome]:
    """Each case `runs` times, `parallel` processes at once; the outcomes in the order they were started."""
    order = [case for _ in range(runs) for case in cases]
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(run_once, order))


def misfits(cases: list[Case], outcomes: list[Outcome]) -> list[Outcome]:
    by_name = {case.name: case for case in cases}
    return [outcome for outcome in outcomes if not outcome.fits(by_name[outcome.case])]


def standard_cases(output: Path, models: Path, scratch: Path) -> list[Case]:
    """What issue 28 saw abort: verify of a finished output, preview, report, and straightness refusing it."""
    return [
        Case("verify", ["verify", str(output)], 0),
        Case("preview", ["preview", str(output), "--out", str(scratch / "sheet.png"), "--n", "4"], 0),
        Case("report", ["report", str(output), "--out", str(scratch / "report.html"), "--n", "4"], 0),
        Case("straightness refusal", ["straightness", "--model", str(models / "instaflow"), "--pairs", str(output)],
             2, "error: "),
    ]


def build_output(workdir: Path, extra_columns: int) -> tuple[Path, Path]:
    """The tiny models and a finished 48-prompt image output with `extra_columns` carried input columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    models, output, prompts = workdir / "models", workdir / f"out-{extra_columns}", workdir / "prompts.parquet"
    if not models.exists():
        subprocess.run([*CLI, "tiny", str(models)], check=True, env=ENV, cwd=PROJECT, capture_output=True)
    if not output.exists():
        num_rows = 48
        columns = {"prompt": [f"a photo of thing {i}" for i in range(num_rows)]}
        columns |= {f"carried_{j}": [j] * num_rows for j in range(extra_columns)}
        pq.write_table(pa.table(columns), prompts)
        subprocess.run([*CLI, "run", "generate", "--model", str(models / "instaflow"), "--prompts", str(prompts),
                        "--output", str(output), "--height", "64", "--width", "64", "--device", "cpu",
                        "--rows-per-shard", "16", "--no-progress"], check=True, env=ENV, cwd=PROJECT,
                       capture_output=True)
    return models, output


def interrupt_many(output: Path, models: Path, prompts: Path, workdir: Path, runs: int, generate_runs: int,
                   parallel: int) -> dict:
    """verify and `run generate` interrupted after their summary (see `interrupt_after`): how each run ended."""
    signals = (signal.SIGTERM, signal.SIGINT)
    tries = [(Case("verify", ["verify", str(output)], 0), "verdict", signals[i % 2]) for i in range(runs)]
    tries += [(Case("generate", ["run", "generate", "--model", str(models / "instaflow"), "--prompts", str(prompts),
                                 "--output", str(workdir / f"interrupted-{time.time_ns()}-{i}"), "--height", "64",
                                 "--width", "64", "--device", "cpu", "--rows-per-shard", "16", "--no-progress"], 0),
               "metrics", signals[i % 2]) for i in range(generate_runs)]
    with ThreadPoolExecutor(parallel) as pool:
        ended = list(pool.map(lambda t: (t[2], *interrupt_after(*t)), tries))
    counts = collections.Counter(
        f"{outcome.case} {signal.Signals(signum).name} {'reached' if held else 'ended before'}: "
        f"{outcome.status} {outcome.last_stderr[:40]!r}" for signum, held, outcome in ended)
    bad = [vars(outcome) for _, held, outcome in ended
           if (outcome.status, outcome.last_stderr) != (130, "error: interrupted") and (held or outcome.status)]
    return {"outcomes": dict(sorted(counts.items())), "misfits": bad[:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=150, help="runs of each command")
    parser.add_argument("--parallel", type=int, default=2, help="processes at once")
    parser.add_argument("--extra-columns", type=int, default=2000, help="input columns carried into the output")
    parser.add_argument("--commands", default="verify,preview,report,straightness refusal")
    parser.add_argument("--interrupt", action="store_true",
                        help="interrupt verify and run generate after their summary instead")
    parser.add_argument("--generate-runs", type=int, default=4, help="with --interrupt: runs of run generate")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    models, output = build_output(args.workdir, args.extra_columns)
    if args.interrupt:
        started = time.monotonic()
        found = interrupt_many(output, models, args.workdir / "prompts.parquet", args.workdir, args.runs,
                               args.generate_runs, args.parallel)
        print(json.dumps({"parallel": args.parallel, "extra_columns": args.extra_columns,
                          "seconds": round(time.monotonic() - started), "load_average": os.getloadavg(), **found},
                         indent=1))
        return 1 if found["misfits"] else 0
    wanted = args.commands.split(",")
    cases = [case for case in standard_cases(output, models, args.workdir) if case.name in wanted]
    started = time.monotonic()
    outcomes = run_many(cases, args.runs, args.parallel)
    counts = collections.Counter((outcome.case, outcome.status) for outcome in outcomes)
    bad = misfits(cases, outcomes)
    print(json.dumps({
        "runs": len(outcomes), "parallel": args.parallel, "extra_columns": args.extra_columns,
        "seconds": round(time.monotonic() - started), "load_average": os.getloadavg(),
        "statuses": {f"{name}: {status}": n for (name, status), n in sorted(counts.items())},
        "misfits": [vars(outcome) for outcome in bad[:20]],
    }, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
