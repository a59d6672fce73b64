"""Shared test setup: the repository root, the cluster's internal key, and skipping GPU tests where
no GPU exists."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every Ray cluster a test starts (in this process or a child) inherits it, as a Ray node does from
# its container: replicas refuse to start without one, and routers send it (serving/internal_key.py).
os.environ.setdefault("RAY_VRAM_INTERNAL_KEY", secrets.token_hex(32))


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
