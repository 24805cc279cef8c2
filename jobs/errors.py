"""The one way an error reaches the user: one line on stderr, and the exit status its kind documents.

Every entry point (each `instaflow-batch` command, `python -m jobs.*`) runs through `entry_point`, which turns
SIGTERM into an interrupt from the first line on and maps what escapes the command to an exit status: 2 for bad
input or settings, 3 when no worker could start, 4 when the output was lost, 130 when interrupted. Anything else
is a bug: one line, and the full traceback in a file whose path the line gives. Every message is redacted, has
its control characters escaped (a file name cannot move the cursor or forge a second line) and is bounded.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, NoReturn

from pipeline.display import printable
from pipeline.display import safe_line as error_line  # a message as stderr shows it: redacted, escaped, bounded

EXIT_OK, EXIT_SHARDS_FAILED, EXIT_BAD_INPUT, EXIT_NO_WORKERS, EXIT_OUTPUT_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_UNEXPECTED = 1  # Python's own status for an uncaught exception

SHOWN_CHARS = 200  # an echoed value is cut to this many characters (a whole message: display.MESSAGE_CHARS)

# (module, class, exit status), most specific first. A class is looked up only if its module is loaded: an
# exception of it cannot exist otherwise, and `instaflow-batch status` should not import Ray and torch to fail.
_KNOWN_ERRORS = (
    ("builtins", "KeyboardInterrupt", EXIT_INTERRUPTED),
    ("pipeline.lock", "OutputLostError", EXIT_OUTPUT_LOST),
    ("pipeline.pool", "NoWorkersError", EXIT_NO_WORKERS),
    ("pipeline.pool", "SystematicFailureError", EXIT_SHARDS_FAILED),  # stopped early: generation fails everywhere
    ("pipeline.storage", "OutputError", EXIT_BAD_INPUT),
    ("instaflow.loading", "ModelLoadError", EXIT_BAD_INPUT),
    ("argparse", "ArgumentTypeError", EXIT_BAD_INPUT),
    # storage that cannot be reached or refuses: no credentials, an endpoint that does not answer, access denied
    ("botocore.exceptions", "BotoCoreError", EXIT_BAD_INPUT),
    ("botocore.exceptions", "ClientError", EXIT_BAD_INPUT),
    ("builtins", "ValueError", EXIT_BAD_INPUT),  # every input check of this project raises a ValueError kind
    ("builtins", "OSError", EXIT_BAD_INPUT),  # a path or URL that cannot be read or written
)

def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A value as an error message echoes it: its repr, escaped, and cut to `limit` characters."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """The message of a known error: an OSError names its path, which str() buries in an errno tuple."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and exc.filename is not None:
        paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        return f"{paths}: {exc.strerror or type(exc).__name__}"
    if type(exc).__module__.startswith("botocore"):
        return f"storage: {type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__


def exit_status_of(exc: BaseException) -> int | None:
    """The documented exit status for `exc`, or None for an error no check of this project raises (a bug)."""
    for module, name, status in _KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return status
    return None


def report(exc: BaseException) -> int:
    """Prints `exc` as one line on stderr; returns its exit status."""
    status = exit_status_of(exc)
    if status is None:
        path = _write_traceback(exc)
        message = f"unexpected {type(exc).__name__}: {describe(exc)} (a bug; the full traceback is in {path})"
        status = EXIT_UNEXPECTED
    else:
        message = describe(exc)
    print(f"error: {error_line(message)}", file=sys.stderr, flush=True)
    return status


def entry_point(command: Callable[..., int | None]) -> Callable[..., int]:
    """Runs `command` with SIGTERM as an interrupt (`ray job stop` sends it, at any phase of a job) and returns
    its exit status, reporting whatever escapes it as one line. argparse's own exits (--help, a bad flag) pass."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> int:
        previous = _sigterm_as_interrupt()
        try:
            return command(*args, **kwargs) or EXIT_OK
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the one place every error ends
            return report(exc)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return run


def process_exit(status: int) -> NoReturn:
    """Ends the process with `status`. A call given up on while blocked (a prompts FIFO without a writer, a
    hung mount: see pipeline.deadline) may hold a thread the interpreter would wait for at exit, forever; then
    the process ends at once, its output flushed."""
    from pipeline.deadline import abandoned_calls  # light: no Ray, no torch

    if not abandoned_calls():
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _write_traceback(exc: BaseException) -> str:
    """The full traceback, redacted, in a private file under the temp dir (independent of any output)."""
    from pipeline.storage import redact_text

    text = "".join(traceback.format_exception(exc))
    try:
        fd, path = tempfile.mkstemp(prefix="instaflow-batch-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(redact_text(text))
    except OSError as write_error:
        return f"nowhere: it could not be written ({write_error})"
    return path
