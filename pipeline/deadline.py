"""A bounded wait for a call that may block for good: a prompts FIFO with no writer, a hung network mount.

Such a call cannot be cancelled, so it runs in a daemon thread and the caller stops waiting at the deadline (or at
Ctrl-C / SIGTERM, which the wait does not hold up). The thread is left behind, and listed by `abandoned_calls` so
that a process about to exit knows it must not wait for it.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

PLAN_TIMEOUT_VARIABLE = "INSTAFLOW_PLAN_TIMEOUT_S"
DEFAULT_PLAN_TIMEOUT_S = 120.0

_abandoned: list[threading.Thread] = []


class StalledError(OSError):
    """A call gave no answer within its deadline; the message names what it was doing."""


def plan_timeout_s() -> float:
    """Seconds the input listing and its footers may take: INSTAFLOW_PLAN_TIMEOUT_S, else 120."""
    text = os.environ.get(PLAN_TIMEOUT_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_PLAN_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{PLAN_TIMEOUT_VARIABLE} must be a number of seconds, got {text[:50]!r}") from None
    if not value > 0:
        raise ValueError(f"{PLAN_TIMEOUT_VARIABLE} must be positive, got {text[:50]!r}")
    return value


def call_within(timeout_s: float, what: str, function: Callable[..., T], *args) -> T:
    """function(*args), or StalledError naming `what` once `timeout_s` passes without an answer."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name=f"bounded: {what[:60]}", daemon=True)
    thread.start()
    try:
        finished = done.wait(timeout_s)  # a signal handler's exception (SIGTERM, Ctrl-C) ends the wait at once
    except BaseException:
        _abandoned.append(thread)
        raise
    if not finished:
        _abandoned.append(thread)
        raise StalledError(f"{what}: no answer in {timeout_s:g} s (a FIFO without a writer, a hung mount?); "
                           f"{PLAN_TIMEOUT_VARIABLE} sets the limit")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def abandoned_calls() -> list[threading.Thread]:
    """Threads still blocked in a call whose caller gave up on it."""
    return [thread for thread in _abandoned if thread.is_alive()]
