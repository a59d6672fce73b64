"""The one stack harness of the tests: real services started the same way by every suite.

- `LocalStack`: `ray-vram up`'s local stack (on a declared inventory) in a child process, so Ray never
  enters the test process; the SDK, CLI, example and Prometheus tests use it (the session's shared one
  is the `local_stack` fixture of tests/conftest.py).
- `running_stack` / `deployed`: Ray, Serve, the monitor, the controller and models in this process, for
  the serving tests that reach into Serve and the allocator (tests/serving/conftest.py's `stack`, and the
  modules that need their own: faults, pending, queue, ...).
- `BusyFront`: a busy-front HTTP server that answers 429/503 with Retry-After before passing requests on.

Both stacks serve the generated demo model with the same engine arguments (`ENGINE_KWARGS`);
everything runs on 127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from waiting import wait_until

from vram_scheduler.core.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RAY_VRAM_CACHE", Path.home() / ".cache" / "ray-vram"))


def ray_temp_dir(prefix: str) -> Path:
    """A fresh folder for one Ray cluster's session files, under the short RAY_TMPDIR that ci/env.sh
    sets: Ray refuses socket paths over AF_UNIX's 107 bytes, which a deep checkout's .work leaves no room for."""
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until `url` answers 200; fail early with the log tail if `process` died."""

    def answered() -> bool:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode} before {url} answered:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=2).status_code == 200
        return False

    wait_until(
        answered,
        timeout_s,
        lambda: f"{url} to answer 200:\n{log.read_text()[-3000:] if log and log.exists() else ''}",
        every_s=0.5,
    )


def vllm_env() -> dict[str, str]:
    """Environment for vLLM on CPU without a model hub (engine start in seconds, not a minute)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


class BusyFront:
    """A real HTTP server before an endpoint: the first `busy` POSTs get `status` with Retry-After,
    later ones are forwarded. Records when each request arrived, to check the client's waits."""

    def __init__(self, upstream: str, busy: int, status: int = 429, retry_after: str = "1"):
        self.upstream = upstream.rstrip("/")
        self.busy = busy
        self.status = status
        self.retry_after = retry_after
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if method == "POST":
                    with front._lock:
                        front.arrivals.append(time.monotonic())
                        refuse = len(front.arrivals) <= front.busy
                    if refuse:
                        payload = json.dumps({"error": {"message": "busy", "code": front.status}}).encode()
                        self.send_response(front.status)
                        self.send_header("Retry-After", front.retry_after)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                path = self.path.removeprefix("/v1")
                response = httpx.request(
                    method,
                    f"{front.upstream}{path}",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=120,
                )
                self.send_response(response.status_code)
                self.send_header("Content-Type", response.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BusyFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the local stack


SDK_INVENTORY = {
    "nodes": [
        {
            "node": "sdk-node",
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-5d5d0000-sdk-0",
                    "name": "NVIDIA Test 8GB",
                    "total_gb": 8,
                },
                {
                    "index": 1,
                    "uuid": "GPU-5d5d0000-sdk-1",
                    "name": "NVIDIA Test 4GB",
                    "total_gb": 4,
                },
            ],
        }
    ]
}
#: The session's shared local stack (tests/conftest.py `local_stack`) serves the demo model under these names.
MODEL = "tiny"
ALIAS = "tiny-alias"
ENGINE_KWARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_num_seqs": 8,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def demo_model_spec(model_id: str, vram_gb: float = 1.5, **extra: object) -> dict:
    """A model entry serving the generated demo model, small enough for a 2-core CI machine."""
    return {
        "model_id": model_id,
        "model": "demo",
        "vram_gb": vram_gb,
        "max_model_len": 512,
        "max_tokens": 16,
        "engine_kwargs": ENGINE_KWARGS,
        **extra,
    }


class LocalStack:
    """`ray-vram up`'s local stack in a child process (Ray never enters the test process), with the
    monitor publishing a declared two-GPU inventory instead of host memory so placement is exact.

    Attributes once started: `controller` (URL), `endpoint` (OpenAI base URL ending in /v1), `pid`
    (the stack's process, root of every process it starts), `gcs_address`, `ray_metrics` (Ray's
    metrics agent on the node: its /metrics URL), `config_home` (the stack's XDG_CONFIG_HOME: its
    controller token file, and Ray token with `auth`), `token` (the controller token, as `ray-vram up`
    made it) and `headers` (what a client sends with it). `auth=False` (the SDK tests) turns Ray's token
    auth off for speed; `auth=True` starts the stack as users get it. `values`: more top-level values
    (`placement`, ...) beside the models.
    """

    def __init__(self, models: list[dict], work: Path | None = None, auth: bool = False, values: dict | None = None):
        self.models = models
        self.auth = auth
        self.values = values or {}
        self.work = Path(tempfile.mkdtemp(prefix="sdk-", dir=work)) if work else ray_temp_dir("sdk-")
        self.controller_port = free_port()
        self.serving_port = free_port()
        self.controller = f"http://127.0.0.1:{self.controller_port}"
        self.endpoint = f"http://127.0.0.1:{self.serving_port}/v1"
        self.log = self.work / "stack.log"
        self.process: subprocess.Popen | None = None
        self.gcs_address = ""
        self.ray_metrics = ""
        self.config_home = self.work / "config"
        self.token = ""

    @property
    def pid(self) -> int:
        assert self.process is not None, "the stack is not started"
        return self.process.pid

    def __enter__(self) -> LocalStack:
        import yaml

        values = self.work / "values.yaml"
        inventory = self.work / "inventory.yaml"
        values.write_text(
            yaml.safe_dump(
                self.values | {"models": self.models, "serving": {"host": "127.0.0.1", "port": self.serving_port}}
            )
        )
        inventory.write_text(yaml.safe_dump(SDK_INVENTORY))
        env = vllm_env() | {"RAY_TMPDIR": str(self.work), "RAY_AUTH_MODE": "disabled"}
        env["XDG_CONFIG_HOME"] = str(self.config_home)  # its own token files, never the user's
        env.pop("RAY_VRAM_CONTROLLER_TOKEN", None)
        if self.auth:
            for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                env.pop(name, None)
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(values), str(inventory), str(self.controller_port)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
        try:

            def ready() -> bool:
                if self.process.poll() is not None:
                    raise RuntimeError(f"local stack exited with {self.process.returncode}:\n{self.log_tail()}")
                return "stack ready" in self.log.read_text()

            wait_until(ready, 900, lambda: f"the local stack to start:\n{self.log_tail()}", every_s=0.5)
        except BaseException:
            self.__exit__()
            raise
        lines = self.log.read_text().splitlines()
        self.gcs_address = next(line.split()[1] for line in lines if line.startswith("gcs "))
        metrics_port = next(line.split()[1] for line in lines if line.startswith("metrics "))
        self.ray_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        self.token = (self.config_home / "ray-vram" / "controller-token").read_text().strip()
        return self

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]

    @property
    def headers(self) -> dict[str, str]:
        """The controller token as a client sends it."""
        return {"Authorization": f"Bearer {self.token}"}

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 600):
    """`ray-vram ARGS` in a child process (as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "vram_scheduler.cli", *args],
        env=os.environ | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- the stack in this process

#: The serving tests' declared inventory (nodes ci-gpu-node, and ci-gpu-worker for the two-node stacks).
SERVING_INVENTORY = ROOT / "tests" / "serving" / "inventory.yaml"


def serving_model(model_id: str, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    """A model entry of the in-process stack: the demo model, two replicas unless told."""
    return demo_model_spec(model_id, replicas=replicas, max_tokens=12) | extra


@dataclass
class Stack:
    controller: Any
    config: Any
    base: str  # OpenAI endpoint, e.g. http://127.0.0.1:PORT
    gcs_address: str
    monitor: Any
    ray_metrics: str  # Ray's metrics agent on this node (what the chart's scrape objects read)


def start_monitor(node: str, gcs_address: str, inventory: Path = SERVING_INVENTORY) -> tuple[Any, threading.Thread]:
    """A monitor publishing inventory node `node` of the file, in a thread of this process."""
    from vram_scheduler.monitor.readers import FileReader
    from vram_scheduler.monitor.service import MonitorService, MonitorSettings

    monitor = MonitorService(
        FileReader(inventory, node),
        MonitorSettings(node=node, interval_s=1.0, host="127.0.0.1", port=0, ray_address=gcs_address),
    )
    thread = threading.Thread(target=monitor.run, name=f"monitor-{node}", daemon=True)
    thread.start()
    return monitor, thread


def with_demo_models(config: Any) -> Any:
    """`config` with the demo models it names generated and listed in `serving.model_sources`, as
    `ray-vram up` and `ray-vram serve` do (the serving path serves them from their directory)."""
    from vram_scheduler.tools.demo.model import demo_sources

    return demo_sources(config, progress=lambda _: None)


@contextmanager
def deployed(config: Any, nodes: int = 1) -> Iterator[Any]:
    """Serve, the controller and `config`'s models on the connected Ray cluster once the allocator has
    the inventory of `nodes` nodes; every replica ready. Everything shut down on exit."""
    from ray import serve

    from vram_scheduler.serving.controller.actor import ControllerClient

    config = with_demo_models(config)
    serve.start(proxy_location="Disabled")
    controller = ControllerClient(config.serving)
    try:
        wait_until(
            lambda: len(controller.allocator.vram_state().nodes) >= nodes,
            60,
            f"the monitors to publish the inventory of {nodes} node(s)",
            every_s=0.2,
        )
        controller.apply(config)
        controller.wait_ready(timeout_s=600)
        yield controller
    finally:
        # Serve's own shutdown stops every application at once; the controller's (local mode's exit,
        # which the local stack's tests run) deletes them one at a time, ~3 s each on 2 cores. The
        # controller actor goes with the Ray cluster, which every caller shuts down next.
        serve.shutdown()


@contextmanager
def running_stack(
    models: list[dict[str, Any]], serving: dict[str, Any] | None = None, placement: dict[str, Any] | None = None
) -> Iterator[Stack]:
    """Ray (local, in this process), Serve, the monitor on the declared inventory, the controller and
    `models` deployed and ready (with `serving` settings beside host and port, and `placement`); all
    stopped on exit."""
    import ray

    from vram_scheduler.core.config import parse_config
    from vram_scheduler.core.ray_names import NAMESPACE

    port, metrics_port = free_port(), free_port()
    config = parse_config(
        {
            "models": models,
            "placement": placement or {},
            "serving": {**(serving or {}), "host": "127.0.0.1", "port": port},
        },
        "serving tests",
    )
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    gcs = ray.get_runtime_context().gcs_address
    monitor, thread = start_monitor("ci-gpu-node", gcs)
    try:
        with deployed(config) as controller:
            yield Stack(
                controller, config, f"http://127.0.0.1:{port}", gcs, monitor, f"http://127.0.0.1:{metrics_port}/metrics"
            )
    finally:
        monitor.stop()
        thread.join(timeout=10)
        ray.shutdown()


def stream_outcome(base: str, body: dict[str, Any], first: threading.Event, timeout_s: float = 60) -> str:
    """How a streamed completion ended: "error: <message>" (an OpenAI error event), "done" ([DONE]
    last, no error event), "cut" (neither, or the connection broke) or "hung" (nothing for
    `timeout_s`). `first` is set at the first event."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=timeout_s) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()
    except httpx.ReadTimeout:
        return "hung"
    except httpx.HTTPError:
        return "cut"
    errors = [json.loads(x.removeprefix("data: "))["error"] for x in lines if x.startswith('data: {"error"')]
    if errors:
        return f"error: {errors[-1]['message']}"
    return "done" if lines and lines[-1] == "data: [DONE]" else "cut"


def _serve_declared(values: str, inventory: str, controller_port: int) -> None:
    """Child process: LocalStack with a FileReader monitor; runs until stdin closes."""
    from vram_scheduler.core.config import load_config
    from vram_scheduler.local import stack as local
    from vram_scheduler.monitor.readers import FileReader
    from vram_scheduler.monitor.service import MonitorService, MonitorSettings
    from vram_scheduler.tools.demo.model import demo_sources

    class DeclaredStack(local.LocalStack):
        def _start_monitor(self, address: str) -> None:
            settings = MonitorSettings(node="sdk-node", interval_s=1.0, host="127.0.0.1", port=0, ray_address=address)
            self.monitor = MonitorService(FileReader(inventory), settings)
            thread = threading.Thread(target=self.monitor.run, name="monitor", daemon=True)
            thread.start()
            self._threads.append(thread)

    # As `ray-vram up` does: the demo models the values name, generated and listed in serving.model_sources.
    config = demo_sources(load_config(values), progress=lambda text: print(text, flush=True))
    stack = DeclaredStack(config, controller_port=controller_port, num_cpus=2)
    try:
        stack.start(progress=lambda text: print(text, flush=True))
        stack.controller.wait_ready(timeout_s=600)
        import ray

        print(f"gcs {ray.get_runtime_context().gcs_address}", flush=True)
        (node,) = [n for n in ray.nodes() if n["Alive"]]
        print(f"metrics {node['MetricsExportPort']}", flush=True)
        print("stack ready", flush=True)
        sys.stdin.read()
    finally:
        stack.stop()
        print("stack stopped", flush=True)


if __name__ == "__main__":
    _serve_declared(sys.argv[1], sys.argv[2], int(sys.argv[3]))
