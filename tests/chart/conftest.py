"""Chart tests: the API-server tests need kube-apiserver built from source once (~8 minutes on a
fresh machine). When they are selected and the binary is not cached yet, the build starts in the
background as soon as collection ends and those tests run last, so that the build overlaps every
other test; `ci/kube-apiserver.sh start` (their fixture) waits for it under the script's lock."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from .helm import ROOT

_build: subprocess.Popen | None = None


def _binary_cached() -> bool:
    cache = os.environ.get("RAY_VRAM_CACHE", os.path.expanduser("~/.cache/ray-vram"))
    return os.path.exists(os.path.join(cache, "kube-apiserver-1.20.2", "bin", "kube-apiserver"))


APISERVER_TESTS = "tests/chart/test_apiserver.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The API-server tests go last (in their own order), after everything else of the session."""
    last = [item for item in items if item.nodeid.startswith(APISERVER_TESTS)]
    if last:
        items[:] = [item for item in items if not item.nodeid.startswith(APISERVER_TESTS)] + last


def pytest_collection_finish(session: pytest.Session) -> None:
    global _build
    wanted = any(item.nodeid.startswith(APISERVER_TESTS) for item in session.items)
    if not wanted or _binary_cached() or session.config.option.collectonly:
        return
    log = ROOT / ".work" / "kube-apiserver-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        _build = subprocess.Popen(
            ["bash", str(ROOT / "ci" / "kube-apiserver.sh"), "build"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A build still running when the session ends (its tests deselected or failed early) is stopped."""
    if _build is not None and _build.poll() is None:
        os.killpg(_build.pid, signal.SIGTERM)
        _build.wait(timeout=60)
