"""The one way an error reaches the user: one line on stderr, and the exit status its kind documents.

Every entry point (each `instaflow-batch` command, `python -m jobs.*`) runs through `entry_point`, which turns
Ctrl-C and SIGTERM into an interrupt from the first line on and maps what escapes the command to an exit status:
2 for bad input or settings, 3 when no worker could start, 4 when the output was lost, 130 when interrupted.
Anything else is a bug: one line, and the full traceback in a file whose path the line gives. Every message is
redacted, has its control characters escaped (a file name cannot move the cursor or forge a second line) and is
bounded.

Before it reports, the outermost entry point ends what the command started and left running (`release_started`),
so that the error is the last line and the interpreter's exit finds no native thread still at work; an interrupt
from then on, until `process_exit` ends the process, is noted and makes the status 130, never a traceback.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
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

logger = logging.getLogger(__name__)

SHOWN_CHARS = 200  # an echoed value is cut to this many characters (a whole message: display.MESSAGE_CHARS)

# (module, class, exit status), most specific first. A class is looked up only if its module is loaded: an
# exception of it cannot exist otherwise, and `instaflow-batch status` should not import Ray and torch to fail.
_KNOWN_ERRORS = (
    ("builtins", "KeyboardInterrupt", EXIT_INTERRUPTED),
    ("pipeline.lock", "OutputLostError", EXIT_OUTPUT_LOST),
    ("pipeline.pool", "NoWorkersError", EXIT_NO_WORKERS),
    ("pipeline.pool", "SystematicFailureError", EXIT_SHARDS_FAILED),  # stopped early: generation fails everywhere
    ("jobs.toy.reproduce", "PhaseFailedError", EXIT_SHARDS_FAILED),  # a phase's job failed; a re-run resumes it
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
    cause = _stopped_after_start(exc)
    if cause is not None:
        return f"{describe(cause)}; {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and exc.filename is not None:
        paths = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        return f"{paths}: {exc.strerror or type(exc).__name__}"
    if type(exc).__module__.startswith("botocore"):
        return f"storage: {type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__


def exit_status_of(exc: BaseException) -> int | None:
    """The documented exit status for `exc`, or None for an error no check of this project raises (a bug).

    An error that stopped a job after it had started on its output is never 2 ("bad input, nothing ran"), which
    automation takes as not worth retrying: it is 1, as for failed shards, since re-running resumes."""
    cause = _stopped_after_start(exc)
    if cause is not None:
        status = exit_status_of(cause)
        return EXIT_SHARDS_FAILED if status == EXIT_BAD_INPUT else status
    for module, name, status in _KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return status
    return None


def _stopped_after_start(exc: BaseException) -> BaseException | None:
    """The error that stopped a job after it had started on its output (pipeline.job.StoppedAfterStartError)."""
    cls = getattr(sys.modules.get("pipeline.job"), "StoppedAfterStartError", None)
    return exc.__cause__ if cls is not None and isinstance(exc, cls) and exc.__cause__ is not None else None


def report(exc: BaseException) -> int:
    """Prints `exc` as one line on stderr; returns its exit status."""
    status = exit_status_of(exc)
    if status is None:
        path = _write_traceback(exc)
        bug = _stopped_after_start(exc) or exc
        message = f"unexpected {type(bug).__name__}: {describe(exc)} (a bug; the full traceback is in {path})"
        status = EXIT_UNEXPECTED
    else:
        message = describe(exc)
    print(f"error: {error_line(message)}", file=sys.stderr, flush=True)
    return status


def entry_point(command: Callable[..., int | None]) -> Callable[..., int]:
    """Runs `command` with Ctrl-C and SIGTERM as an interrupt (`ray job stop` sends SIGTERM, at any phase of a
    job) and returns its exit status, reporting whatever escapes it as one line. argparse's own exits (--help, a
    bad flag) pass.

    Entry points nest (`instaflow-batch run` calls the job module's `main`): only the outermost one reports,
    after `release_started` has ended what the command started, so nothing is printed after the error. An
    interrupt during the release is noted, not raised (a KeyboardInterrupt inside `ray.shutdown()` lost the
    status and ended on a traceback): the release finishes, and the status is 130, the command's own outcome
    (success included) printed before `error: interrupted`."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> int:
        if getattr(_running, "command", None):  # an inner entry point: the outer one reports and releases
            return command(*args, **kwargs) or EXIT_OK
        previous = _interrupts_raised()
        ray_was_running = _ray_is_running()
        _running.command = command
        status, error, interrupted = EXIT_OK, None, False
        try:
            try:
                status = command(*args, **kwargs) or EXIT_OK
            finally:
                _running.command = None
                interrupted = _interrupts_noted()
        except BaseException as exc:  # noqa: BLE001 - this is the one place every error ends
            error = exc
        interrupted = _interrupts_noted() or interrupted  # also when an interrupt came before the line above
        release_started(ray_was_running)
        if error is not None and not isinstance(error, SystemExit):
            status = report(error)
        if previous is not None and (_interrupts.noted or interrupted):
            if status != EXIT_INTERRUPTED or isinstance(error, SystemExit):
                _print_interrupted()
            status, error = EXIT_INTERRUPTED, None
        _restore(previous)
        if isinstance(error, SystemExit):
            raise error
        return status

    return run


_running = threading.local()  # .command: the outermost entry point running in this thread, if any

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _InterruptState:
    """The main thread's: while `noting`, SIGINT and SIGTERM set `noted` instead of raising KeyboardInterrupt."""

    noting = False
    noted = False


_interrupts = _InterruptState()


def _on_interrupt(signum, frame):
    if _interrupts.noting:
        _interrupts.noted = True
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupts_raised() -> dict | None:
    """SIGINT and SIGTERM raise KeyboardInterrupt from here on; returns the previous handlers (None off the main
    thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _interrupts.noting = _interrupts.noted = False
    return {signum: signal.signal(signum, _on_interrupt) for signum in INTERRUPT_SIGNALS}


def _interrupts_noted() -> bool:
    """From here on SIGINT and SIGTERM are noted in `_interrupts.noted`, not raised, whatever handler the
    command put in their place (Ray's, pipeline.job's): what follows must finish. Returns True when one of
    those handlers raised an interrupt while this was being set up."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _interrupts.noting = True
    interrupted = False
    while True:
        try:
            for signum in INTERRUPT_SIGNALS:
                signal.signal(signum, _on_interrupt)
            return interrupted
        except KeyboardInterrupt:  # a signal that came just before, handled by the handler being replaced
            interrupted = True


def _restore(previous: dict | None) -> None:
    """The handlers `_interrupts_raised` replaced: an in-process caller, such as a test, goes on."""
    if previous is None:
        return
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
    # `_interrupts.noted` stays: one that came while the handlers were put back counts for process_exit


def _print_interrupted() -> None:
    print(f"error: {describe(KeyboardInterrupt())}", file=sys.stderr, flush=True)


def release_started(ray_was_running: bool) -> None:
    """Ends what a command started and may leave at work: a local Ray (its workers' output would otherwise
    stream in after the error line), and pyarrow's thread pools.

    pyarrow's pools release a read's file or buffer a moment after the read has returned. When that object is
    Python's (a file-like object, bytes), the release takes the GIL; if the interpreter has begun to exit by then,
    Python ends that thread in the middle of a C++ destructor and the process aborts ("terminate called without
    an active exception", apache/arrow#34314). Waiting until the pools are idle closes that window."""
    ray = sys.modules.get("ray")
    if not ray_was_running and ray is not None and ray.is_initialized():
        ray.shutdown()
    _wait_for_arrow_pools()


ARROW_IDLE_WAIT_S = 30.0  # a pool task blocked longer (a hung read) is left to process_exit


def _wait_for_arrow_pools(timeout_s: float = ARROW_IDLE_WAIT_S) -> None:
    """Waits until pyarrow's CPU and I/O thread pools have run and released every task (Arrow's
    `ThreadPool::WaitForIdle`, which pyarrow does not wrap), in a helper thread so the wait is bounded."""
    if "pyarrow" not in sys.modules:
        return
    wait_for_idle = _arrow_wait_for_idle()
    if wait_for_idle is None:
        return
    waiter = threading.Thread(target=wait_for_idle, name="arrow-pools-idle", daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    if waiter.is_alive():
        logger.warning("pyarrow's thread pools were still busy after %.0fs", timeout_s)


@functools.cache
def _arrow_wait_for_idle() -> Callable[[], None] | None:
    """A function that waits for both of pyarrow's pools to be idle, or None where libarrow's C++ symbols are not
    found (another platform or build)."""
    import pyarrow

    # The wheel ships libarrow beside pyarrow's own modules. (pyarrow.get_library_dirs() also asks pkg-config,
    # in processes of its own without a timeout: too slow for a command that is closing down.)
    names = glob.glob(os.path.join(os.path.dirname(pyarrow.__file__), "libarrow.so.*"))
    try:
        library = ctypes.CDLL(min(names, key=len))  # libarrow.so.2600, not libarrow.so.2600.1.0
        pools = [library._ZN5arrow8internal16GetCpuThreadPoolEv, library._ZN5arrow2io8internal15GetIOThreadPoolEv]
        wait = library._ZN5arrow8internal10ThreadPool11WaitForIdleEv
    except (OSError, AttributeError, ValueError):
        return None
    for get_pool in pools:
        get_pool.restype = ctypes.c_void_p
    wait.argtypes, wait.restype = [ctypes.c_void_p], None

    def wait_for_idle() -> None:
        for get_pool in pools:
            wait(get_pool())  # ctypes releases the GIL: a task that needs it can finish

    return wait_for_idle


def _ray_is_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def process_exit(status: int) -> NoReturn:
    """Ends the process with `status` at once: its logging closed and its output flushed, without the
    interpreter's own exit.

    That exit is long (module teardown, with torch loaded) and nothing in it is needed once `entry_point` has
    released what the command started; during it a SIGTERM or Ctrl-C killed the process (Python puts the
    default handlers back), and a thread held by a call given up on while blocked (a
    prompts FIFO without a writer, a hung mount: see pipeline.deadline) could make it wait forever. Here
    SIGINT and SIGTERM are noted until the last check: one that came makes the status 130, `error: interrupted`
    the last line. One that comes after that check, microseconds before the process ends, is ignored."""
    interrupted = False
    while True:
        try:
            interrupted = _interrupts_noted() or interrupted
            break
        except KeyboardInterrupt:  # a signal that came before the handlers were in place
            interrupted = True
    logging.shutdown()
    if (interrupted or _interrupts.noted) and status != EXIT_INTERRUPTED:
        _print_interrupted()
        status = EXIT_INTERRUPTED
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


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
