"""Waiting on conditions, never on the clock: a test that needs something to have happened polls for it,
and a wait that runs out says what it waited for and what it saw last.

`timeout_s` only ends a hang; it is never the behaviour under test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    every_s: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` every `every_s` until it returns something truthy, and return that.

    `what` names the condition (a callable is asked only on timeout, to describe the state seen last);
    exceptions of the types in `ignore` count as "not yet" (a restarting actor answers nothing for a
    moment). Raises TimeoutError naming `what` and the time waited."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as error:
            value, last_error = None, error  # type: ignore[assignment]
        else:
            last_error = None
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            seen = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise TimeoutError(f"waited {timeout_s:g} s for {described}{seen}")
        time.sleep(every_s)
