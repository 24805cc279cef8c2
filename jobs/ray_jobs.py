"""A Ray cluster's Jobs API from the command line: the address, following a job, status, logs, stop.

The address is the cluster's dashboard URL, found as Ray's own CLI finds it: --address, else
RAY_API_SERVER_ADDRESS, else RAY_ADDRESS. `follow` ends with the job driver's own exit status, so that
`submit --wait` exits as `run` would have.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
from urllib.parse import quote

from jobs.errors import error_line, shown
from jobs.main import Parser

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
JOB_ID = re.compile(r"[A-Za-z0-9_-]+")


class AddressError(ValueError):
    """No cluster address was given."""


class JobsApiError(ValueError):
    """The cluster's Jobs API could not be reached, or refused the request; the message is its answer."""


@contextlib.contextmanager
def jobs_api():
    """Calls to the Jobs API, whose client raises RuntimeError and ConnectionError for a cluster's answers, and
    aiohttp's ClientResponseError when the log stream's websocket is refused."""
    try:
        yield
    except (RuntimeError, ConnectionError) as exc:
        raise JobsApiError(str(exc) or type(exc).__name__) from None
    except Exception as exc:
        aiohttp = sys.modules.get("aiohttp")
        if aiohttp is None or not isinstance(exc, aiohttp.ClientResponseError):
            raise
        raise JobsApiError(f"the cluster answered {exc.status} {exc.message} to {exc.request_info.real_url}") \
            from None


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                                           "(default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")


def resolve_address(address: str | None) -> str:
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_VARIABLES)):
        if candidate:
            return candidate
    raise AddressError("no cluster address: pass --address http://HEAD:8265 (the dashboard's URL), "
                      "or set RAY_API_SERVER_ADDRESS")


def connect(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    # Ray's client lets these variables override an explicit address; here --address wins, as documented.
    with _environment_without(ADDRESS_VARIABLES):
        return JobSubmissionClient(url)


@contextlib.contextmanager
def _environment_without(names: tuple[str, ...]):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def follow(client, submission_id: str) -> int:
    """Prints the job's logs until it ends, then its outcome; returns the driver's exit status."""
    try:
        with jobs_api():
            asyncio.run(_print_log_tail(client, submission_id))
            info = _final_info(client, submission_id)
            status = exit_status(info)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: instaflow-batch stop {submission_id}",
              file=sys.stderr)
        return 130
    print(f"job {submission_id} {info.status.value}, exit status {status}", file=sys.stderr)
    if info.status.value == "FAILED" and info.driver_exit_code is None:
        print(f"error: {error_line(info.message or 'the job failed before its driver ran')}", file=sys.stderr)
    return status


async def _print_log_tail(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)


def _final_info(client, submission_id: str, timeout_s: float = 30.0):
    """The job's info once terminal: the log tail may close a moment before the status is written."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def exit_status(info) -> int:
    """The job driver's own exit status; 130 for a stopped job, and 2 when the driver never ran."""
    status = info.status.value
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return 130
    if status != "FAILED":
        raise RuntimeError(f"job {info.submission_id} has not ended: {status}")
    code = info.driver_exit_code
    if code is None:  # the runtime env or the entrypoint failed to start
        return 2
    return 128 - code if code < 0 else code  # a driver killed by signal N reports -N, a shell 128+N


def job_id(text: str) -> str:
    """A job's id as the Jobs API takes it in a URL path (/api/jobs/ID): `raysubmit_` and 16 letters and digits as
    Ray makes them, a driver's job id (hex), or an id given to `ray job submit --submission-id`, limited here to
    letters, digits, `_` and `-`. Anything else reached another endpoint: `?q=1` the job list, `../../x` other
    dashboard paths, an empty id `stop`'s POST the submit endpoint."""
    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a job id: letters, digits, _ and - only "
                                         "(submit prints it: raysubmit_...)")
    return text


def in_path(submission_id: str) -> str:
    """The id as a URL path segment (Ray's client puts it in the path as given)."""
    return quote(submission_id, safe="")


def _id_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("submission_id", type=job_id, help="as printed by submit (raysubmit_...)")
    add_address(parser)
    return parser


def status_command(argv: list[str], prog: str) -> int:
    args = _id_parser(prog, "A submitted job's status, and its driver's exit status once it has ended.").parse_args(argv)
    with jobs_api():
        info = connect(args.address).get_job_info(in_path(args.submission_id))
    print(f"status: {info.status.value}")
    if info.driver_exit_code is not None:
        print(f"driver exit status: {info.driver_exit_code}")
    print(f"entrypoint: {info.entrypoint}")
    if info.message:
        print(f"message: {info.message}")
    return 0


def logs_command(argv: list[str], prog: str) -> int:
    parser = _id_parser(prog, "A submitted job's logs (its driver's output).")
    parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    args = parser.parse_args(argv)
    segment = in_path(args.submission_id)
    with jobs_api():
        client = connect(args.address)
        if args.follow:
            client.get_job_info(segment)  # an unknown id: "does not exist", as status and stop say
            asyncio.run(_print_log_tail(client, segment))
        else:
            print(client.get_job_logs(segment), end="")
    return 0


def stop_command(argv: list[str], prog: str) -> int:
    parser = _id_parser(prog, "Stops a submitted job: its driver gets SIGTERM, committed shards stay, and "
                              "submitting the same job again resumes it.")
    args = parser.parse_args(argv)
    with jobs_api():
        stopping = connect(args.address).stop_job(in_path(args.submission_id))
    print(f"stopping {args.submission_id}" if stopping else f"{args.submission_id} had already ended")
    return 0
