"""`ray-vram up` stops on SIGINT/SIGTERM even when Python drops the KeyboardInterrupt its handler
raises (in a finalizer or a logging lock's release, "Exception ignored in ..."): the handler remembers
the signal and start-up raises it again between phases."""

from __future__ import annotations

import signal

import pytest

from vram_scheduler.cli.commands.up import StopSignal


class _SignalledInFinalizer:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # the handler runs here and its exception is dropped


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_interrupt_was_dropped_is_raised_again() -> None:
    stop = StopSignal()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        finalized = _SignalledInFinalizer()
        del finalized  # no exception escapes the finalizer
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGINT)}"):
            stop.check()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_handler_raises_at_once_and_without_a_signal_nothing_is_raised() -> None:
    stop = StopSignal()
    stop.check()
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGTERM, None)
    assert stop.received == signal.SIGTERM
