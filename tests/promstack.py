"""Real Prometheus and promtool for the tests (Debian's package, unpacked by ci/prometheus.sh).

`tools()` finds the binaries: RAY_VRAM_PROMETHEUS / RAY_VRAM_PROMTOOL when set (ci/test.sh sets
them), else it runs ci/prometheus.sh, which downloads them once into the cache. A machine where
that fails fails the tests, naming why, rather than skipping them: like Helm and the API server,
Prometheus is something the CI scripts provide. `PrometheusServer` runs one on 127.0.0.1 with a
temporary storage folder, scraping given targets every second.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import waiting
import yaml

from vram_scheduler.core.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tools:
    prometheus: str
    promtool: str


@cache
def tools() -> Tools:
    """The binaries from the environment, or installed (cached) with the project's script."""
    prometheus, promtool = os.environ.get("RAY_VRAM_PROMETHEUS"), os.environ.get("RAY_VRAM_PROMTOOL")
    if not (prometheus and promtool):
        result = subprocess.run(["bash", str(ROOT / "ci" / "prometheus.sh")], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ci/prometheus.sh could not provide Prometheus:\n{result.stderr}")
        bin_dir = Path(result.stdout.strip().splitlines()[-1])
        prometheus, promtool = prometheus or str(bin_dir / "prometheus"), promtool or str(bin_dir / "promtool")
    for path in (prometheus, promtool):
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} is not an executable (RAY_VRAM_PROMETHEUS / RAY_VRAM_PROMTOOL)")
    return Tools(prometheus, promtool)


class PrometheusServer:
    """`prometheus` scraping `targets` (job name → host:port) every second, with `rule_files` loaded;
    a job in `bearer_tokens` sends that token (`Authorization: Bearer`), as the chart's ServiceMonitor does."""

    def __init__(
        self, targets: dict[str, str], rule_files: Iterable[Path] = (), bearer_tokens: dict[str, str] | None = None
    ):
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        folder = Path(self._dir.name)
        tokens = bearer_tokens or {}
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [t]}]}
                | ({"authorization": {"credentials": tokens[job]}} if job in tokens else {})
                for job, t in targets.items()
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (folder / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                tools().prometheus,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return (Path(self._dir.name) / "prometheus.log").read_text()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> → its `data`, failing on an error answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"/api/v1/{path} {params}: {error.code} {error.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (scalars come back as a one-element list)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_until(self, predicate, what: str, timeout_s: float = 60) -> Any:
        def met() -> Any:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            return predicate()  # OSError (not answering yet) and AssertionError (a check inside) are "not yet"

        return waiting.wait_until(
            met, timeout_s, lambda: f"{what}\n{self.log()[-3000:]}", every_s=0.3, ignore=(OSError, AssertionError)
        )

    def wait_targets_up(self, timeout_s: float = 60) -> list[dict[str, Any]]:
        def all_up() -> list[dict[str, Any]] | None:
            active = self.api("targets")["activeTargets"]
            return active if active and all(t["health"] == "up" for t in active) else None

        return self.wait_until(all_up, "every target up", timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._dir.cleanup()
