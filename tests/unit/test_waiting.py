"""The tests' wait helper (tests/waiting.py): it returns what the condition returned, counts the
ignored errors as "not yet", and a wait that runs out names what it waited for and the last error."""

from __future__ import annotations

import itertools

import pytest
from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 3 and "third", 60, "three calls", every_s=0) == "third"


def test_a_wait_that_runs_out_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match=r"waited 0 s for the replica to be ready$"):
        wait_until(lambda: False, 0, "the replica to be ready")


def test_the_description_is_asked_for_only_when_the_wait_runs_out() -> None:
    asked: list[int] = []
    calls = itertools.count()
    wait_until(lambda: next(calls) == 2, 60, lambda: str(asked.append(1)), every_s=0)
    assert asked == []
    with pytest.raises(TimeoutError, match="state seen: 7"):
        wait_until(lambda: False, 0, lambda: "state seen: 7")


def test_ignored_errors_are_not_yet_and_the_last_one_is_named() -> None:
    calls = itertools.count()

    def flaky() -> bool:
        if next(calls) < 2:
            raise ConnectionError("restarting")
        return True

    assert wait_until(flaky, 60, "the actor back", every_s=0, ignore=(ConnectionError,))
    with pytest.raises(TimeoutError, match=r"for the actor back \(last error: ConnectionError: down\)"):
        wait_until(
            lambda: (_ for _ in ()).throw(ConnectionError("down")), 0, "the actor back", ignore=(ConnectionError,)
        )


def test_other_errors_propagate() -> None:
    with pytest.raises(KeyError):
        wait_until(lambda: {}["missing"], 60, "never", ignore=(ConnectionError,))
