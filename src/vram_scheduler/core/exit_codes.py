"""The CLI's exit codes, in one enum so that no command writes them as literals (CONTRIBUTING.md)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a runtime failure
    INVALID = 2  # invalid input (configuration, arguments, a model nothing serves)
    UNPLACED = 3  # not everything fits
    INTERRUPTED = 130  # Ctrl-C / SIGTERM
