"""A real `ray-vram monitor` process on a declared inventory, scraped over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

from vram_scheduler.core.loopback import free_port

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def inventory_yaml(node: str = "ci-node", processes: list[dict] | None = None, **gpu1: Any) -> dict:
    """Two GPUs on one node; GPU 1 takes overrides (used_bytes, processes, ...)."""
    return {
        "nodes": [
            {
                "node": node,
                "gpus": [
                    {"index": 0, "uuid": f"GPU-{node}-0", "name": "NVIDIA H100 80GB HBM3", "total_gb": 80},
                    {
                        "index": 1,
                        "uuid": f"GPU-{node}-1",
                        "name": "NVIDIA GeForce RTX 4090",
                        "total_gb": 24,
                        "used_gb": 6,
                        "processes": processes or [],
                        **gpu1,
                    },
                ],
            }
        ]
    }


class Monitor:
    """`python -m vram_scheduler.cli monitor ...` as a subprocess, with helpers to scrape it."""

    def __init__(self, *args: str):
        self.port = free_port()
        # A file, not a pipe: a monitor logging into a pipe nobody reads would block.
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by the `monitors` fixture)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vram_scheduler.cli",
                "monitor",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--interval=0.1",
                *args,
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def wait_ready(self, timeout_s: float = 90) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"monitor exited with {self.process.returncode}: {self.log()}")
            try:
                return self.get("/healthz")[0] == 200
            except OSError:
                return False

        wait_until(healthy, timeout_s, "the monitor healthy (/healthz 200)")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample as {(name, frozenset(labels.items())): value}."""
        status, body = self.get("/metrics")
        assert status == 200
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def wait_for(self, predicate, timeout_s: float = 45, what: str = "condition") -> dict:
        samples: dict = {}

        def seen() -> dict | None:
            nonlocal samples
            samples = self.metrics()
            return samples if predicate(samples) else None

        return wait_until(seen, timeout_s, lambda: f"{what}; last samples: {sample_names(samples)}")

    def close(self) -> None:
        self._log.close()

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"monitor did not exit within {timeout_s}s of signal {sig}") from None
        return self.process.returncode


def sample_names(samples: dict) -> list[str]:
    return sorted({name for name, _ in samples})


def value(samples: dict, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


@pytest.fixture
def write_inventory(tmp_path: Path):
    path = tmp_path / "inventory.yaml"

    def write(data: dict) -> Path:
        # Written then renamed, so the running monitor never reads half a file.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
        tmp.replace(path)
        return path

    return write


@pytest.fixture
def monitors() -> Iterator[list[Monitor]]:
    started: list[Monitor] = []
    yield started
    for monitor in started:
        if monitor.process.poll() is None:
            monitor.stop(signal.SIGKILL)
        monitor.close()
