"""`instaflow-batch`: one command for the jobs, their clusters and their outputs.

Each subcommand is one entry in COMMANDS, naming the function that implements it as "module:function"; the
module is imported only when its subcommand runs, so `--help` and `status` do not wait for torch. Every function
takes (argv, prog), parses argv with its own `Parser`, and returns the exit status; what it raises is reported
by jobs.errors.entry_point, the one place an error becomes a line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import NoReturn

from jobs.errors import EXIT_BAD_INPUT, entry_point, error_line, process_exit, shown


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every subcommand's help format: a flag's default is shown, except None and False, whose help says what
    happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every command's parser: defaults shown in --help, and a bad flag is one line (the usage is --help's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {error_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str  # "module:function", called as function(argv, prog) -> exit status

    def __call__(self, argv: list[str]) -> int:
        module, function = self.target.split(":")
        return entry_point(lambda: getattr(importlib.import_module(module), function)(argv, self.prog))()

    @property
    def prog(self) -> str:
        return f"instaflow-batch {self.name}"


COMMANDS = (
    Command("run", "run a job here: [generate|reflow-pairs|encode] [--config job.yaml] [job flags]", "jobs.jobfile:run_command"),
    Command("submit", "send a job to a Ray cluster through its Jobs API ([--wait] to follow it)", "jobs.submit:submit_command"),
    Command("status", "a submitted job's status", "jobs.ray_jobs:status_command"),
    Command("logs", "a submitted job's logs ([--follow])", "jobs.ray_jobs:logs_command"),
    Command("stop", "stop a submitted job", "jobs.ray_jobs:stop_command"),
    Command("verify", "check that an output is complete and intact, without trusting the writer", "jobs.verify:verify_command"),
    Command("preview", "a contact sheet of an output's images (or decoded pairs)", "jobs.preview:main"),
    Command("report", "one self-contained HTML page about an output: settings, verdict, shards, gallery",
            "jobs.report:main"),
    Command("train", "train on reflow pairs with Ray Train: reflow, or one-step distillation", "jobs.train_reflow:main"),
    Command("straightness", "measure a model or each checkpoint of a training run on held-out pairs",
            "jobs.straightness:main"),
    Command("reproduce-toy", "reflow reproduced offline on a procedural toy set: 1-RF, 2-RF, distillation, measures",
            "jobs.toy.reproduce:main"),
    Command("tiny", "write the tiny offline models (for tests and demos)", "jobs.tiny:main"),
)


def usage() -> str:
    width = max(len(command.name) for command in COMMANDS)
    lines = [f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS]
    return "\n".join([
        "usage: instaflow-batch COMMAND [options]   (instaflow-batch COMMAND --help for its options)",
        "",
        "InstaFlow image datasets and reflow training pairs, on one machine or a Ray cluster.",
        "",
        "commands:",
        *lines,
        "",
        "Exit status of run and submit --wait: 0 all shards committed, 1 some shards failed, 2 bad input or settings",
        "(nothing ran), 3 no worker could start in time, 4 the output was lost to another job, 130 interrupted.",
        "Of verify: 0 complete and intact, 1 something missing or corrupt, 2 not an output of this tool.",
    ])


def main(argv: list[str] | None = None) -> int:
    """The console script (argv None: the process's own, and the process ends here) or a call with `argv`."""
    if argv is None:
        process_exit(dispatch(sys.argv[1:]))
    return dispatch(argv)


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    commands = {command.name: command for command in COMMANDS}
    if argv[0] not in commands:
        print(f"instaflow-batch: error: unknown command {shown(argv[0])} (see instaflow-batch --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
