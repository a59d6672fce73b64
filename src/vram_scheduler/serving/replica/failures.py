"""A start failure as one line that says what went wrong: the root cause's own message, whole.

A replica's start can fail deep inside vLLM, wrapped by Ray, pydantic and argparse; the last line
of a traceback is often only pydantic's documentation link or an exit code. `root_cause` follows
the exception chain to the innermost error that carries a message (Ray's `cause`, then
`__cause__`) and renders it on one line, so Serve status, the
controller API, `ray-vram status` and the SDK's `DeploymentError` all show the same full reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import ValidationError

from ...core.config import ConfigError, ModelSpec
from ...core.errors import RayVramError
from ...core.model_limits import effective_max_model_len

#: Our own errors are already phrased for the user: shown without their class name.
_PHRASED = {"ModelCheckError", "ReplicaStartupError", "BudgetTooSmall", "EngineArgsError", "ConfigError"}
_PHRASED |= {"ReservationError"}
_NOISE = re.compile(r"^\s*For further information visit https://errors\.pydantic\.dev\S*\s*$")
_PYDANTIC_INPUT = re.compile(r"\s*\[type=[^\]]*\]?\s*$")


def _next(error: BaseException) -> BaseException | None:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return cause
    return error.__cause__  # explicit chains only: an implicit __context__ may be unrelated


def _meaningful(error: BaseException) -> bool:
    text = str(error).strip()
    return bool(text) and not isinstance(error, SystemExit) and not text.isdigit()


def _message(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = [str(item.get("msg", "")).removeprefix("Value error, ") for item in error.errors(include_url=False)]
        return "; ".join(p for p in parts if p) or str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not _NOISE.match(line)]
    return " ".join(_PYDANTIC_INPUT.sub("", line) for line in lines)


def root_cause(error: BaseException) -> str:
    """The innermost error with a message, as one line (`Type: message` unless it is one of ours)."""
    chosen = error
    seen = {id(error)}
    current: BaseException | None = error
    while current is not None:
        if _meaningful(current):
            chosen = current
        current = _next(current)
        if current is not None and id(current) in seen:
            break
        if current is not None:
            seen.add(id(current))
    text = _message(chosen) if _meaningful(chosen) else ""
    name = type(chosen).__name__
    if not text:
        return name
    return text if name in _PHRASED else f"{name}: {text}"


#: What vLLM's front end says when its engine process died at start; the cause is in that process's output.
ENGINE_DIED = "See root cause above"
_ERROR_LINE = re.compile(r"\b(\w+(Error|Exception)): (.+)$")


def stderr_position() -> tuple[str, int] | None:
    """This process's stderr file and its size now (vLLM's engine process writes to the same file)."""
    try:
        path = os.readlink("/proc/self/fd/2")
        return path, Path(path).stat().st_size
    except OSError:
        return None


def engine_errors(text: str, limit: int = 2) -> list[str]:
    """The last distinct `SomeError: message` lines of an engine's output, without vLLM's generic
    wrapper line (the root cause is the line before it)."""
    found: list[str] = []
    for line in text.splitlines():
        match = _ERROR_LINE.search(line)
        if match is None or ENGINE_DIED in line or "initialization failed" in line:
            continue
        entry = f"{match.group(1)}: {match.group(3).strip()}"[:400]
        if entry in found:
            found.remove(entry)
        found.append(entry)
    return found[-limit:]


def engine_cause(mark: tuple[str, int] | None) -> str:
    """The engine's own error lines written to stderr since `mark` ('' when none are found)."""
    if mark is None:
        return ""
    path, offset = mark
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read(4 * 1024 * 1024).decode(errors="replace")
    except OSError:
        return ""
    return "; ".join(engine_errors(text))


class ModelCheckError(RayVramError, RuntimeError):
    """The model cannot be served as configured; found before anything was reserved."""


def checked_spec(spec: ModelSpec, replica_id: str) -> ModelSpec:
    """`spec` with its effective `max_model_len`, checked against the model's files on this node.

    Raises `ModelCheckError` (one line, the fix included) for a missing local path or a length over
    the model's maximum; a hub name whose files cannot be fetched is left to vLLM to report.
    """
    where = f"replica {replica_id} on node {os.uname().nodename}"
    if spec.model.startswith(("/", "./", "../", "~")):
        path = Path(spec.model).expanduser()
        if not path.is_dir():
            raise ModelCheckError(
                f"{where}: model path {spec.model} does not exist here (not a directory); "
                "give a local directory present on every GPU node, or a Hugging Face name"
            )
        if not (path / "config.json").is_file():
            raise ModelCheckError(f"{where}: model path {spec.model} has no config.json; is it a model directory?")
    try:
        length = effective_max_model_len(spec, download=True)
    except ConfigError as error:
        raise ModelCheckError(f"{where}: " + "; ".join(error.problems)) from None
    return spec.model_copy(update={"max_model_len": length})
