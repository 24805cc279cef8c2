"""Flags shared by the job entry points, and the one way a job ends: a summary and an exit status.

Exit status, the same for every entry point: 0 every shard committed; 1 some shards failed; 2 bad input or
settings (nothing ran); 3 no worker could start in time; 4 the output was lost to another job; 130 interrupted
(SIGINT, or SIGTERM as `ray job stop` sends it). Re-running the same command resumes.
"""

import argparse
import logging

from jobs.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT_LOST, EXIT_SHARDS_FAILED
from jobs.main import Parser
from jobs.options import check_output_folder, json_object, positive_int, storage_options_flag
from pipeline.job import run_job
from pipeline.progress import JobProgress
from pipeline.settings import default_of, flag_name
from pipeline.spec import SETTINGS, JobSpec
from pipeline.storage import redact_text

logger = logging.getLogger(__name__)


class Repeatable(argparse.Action):
    """A flag that may be given several times, its values kept in order. Values on the command line replace
    the default (a job file's list) rather than add to it, as every other flag overrides the file."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if given is self.default else given), values])


# Parsers the command line puts in place of a declaration's type: --storage-options also reads @FILE, and
# --samples-per-prompt names the flag when a value is not a positive integer.
FLAG_PARSERS = {"storage_options": storage_options_flag, "samples_per_prompt": positive_int}


def base_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of every job, one per common setting that JobSpec declares (pipeline/settings.py)."""
    parser = Parser(prog=prog, description=description)
    for name, declared in SETTINGS.items():
        if not declared.common:
            continue
        options = {"dest": name, "help": declared.help, **declared.options}
        if name in FLAG_PARSERS:
            options["type"] = FLAG_PARSERS[name]
        if declared.repeated:
            options |= {"action": Repeatable, "default": []}
        elif not options.get("required"):
            options["default"] = declared.flag_default if declared.flag_default is not None else \
                default_of(JobSpec, name)
        parser.add_argument(flag_name(name, declared), **options)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def common_spec_args(args: argparse.Namespace) -> dict:
    """The spec's settings that every job's flags set, as parsed."""
    return {name: getattr(args, name) for name, declared in SETTINGS.items() if declared.common}


def run(spec_args: dict, show_progress: bool = True) -> int:
    """Builds the spec, runs the job, prints the summary; returns the exit status. What stops a job before it
    runs is raised, for jobs.errors.entry_point to report (exit 2 or 3)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = spec_args["storage_options"]
    if isinstance(options, str):  # @FILE, read here: on the machine that runs the driver
        try:
            options = json_object(options)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--storage-options: {exc}") from None
    spec = JobSpec(**spec_args | {"storage_options": options})
    check_output_folder(spec.output, spec.storage_options)
    progress = run_job(spec, show_progress=show_progress)
    print(progress.table())
    print(where_to_look(spec.output))
    return exit_status(progress)


def run_command_line(parser, spec_args, argv: list[str] | None) -> int:
    """A job module's `main`: its flags (`parser()`), its spec (`spec_args`), the job run with a progress bar
    unless --no-progress."""
    args = parser().parse_args(argv)
    return run(spec_args(args), show_progress=not args.no_progress)


def where_to_look(output: str) -> str:
    """Where the job's outputs, its report and its metrics are: the last lines of a job's log."""
    shown_output = redact_text(output)
    return "\n".join([
        f"outputs      {shown_output}",
        f"report       instaflow-batch report {shown_output} --out report.html",
        "metrics      ray_instaflow_* on each Ray node's metrics endpoint; dashboard: infra/grafana/instaflow.json",
    ])


def exit_status(progress: JobProgress) -> int:
    if progress.lost:
        return EXIT_OUTPUT_LOST
    if progress.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if progress.complete else EXIT_SHARDS_FAILED
