"""One real serving stack per test module: isolated local Ray (loopback), Serve, the allocator,
the monitor publishing a declared two-GPU inventory, the controller, the OpenAI router, and vLLM
(CPU backend) replicas of the generated demo model."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vram_scheduler.core.loopback import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_VRAM_REPLICA_HOST", "127.0.0.1")

HERE = Path(__file__).resolve().parent
INVENTORY = HERE / "inventory.yaml"
ENGINE_KWARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_num_seqs": 8,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def model(model_id: str, replicas: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "model": "demo",
        "vram_gb": 1.5,
        "replicas": replicas,
        "max_model_len": 512,
        "max_tokens": 12,
        "engine_kwargs": ENGINE_KWARGS,
        **extra,
    }


@dataclass
class Stack:
    controller: Any
    config: Any
    base: str  # OpenAI endpoint, e.g. http://127.0.0.1:PORT
    gcs_address: str
    monitor: Any
    ray_metrics: str  # Ray's metrics agent on this node (what the chart's scrape objects read)


def two_models(port: int) -> Any:
    """The stack's configuration: alpha and beta (alias beta-alias), 2 replicas each."""
    from vram_scheduler.core.config import parse_config

    return parse_config(
        {
            "models": [model("alpha"), model("beta", router_name="beta-alias", max_tokens=10)],
            "serving": {"host": "127.0.0.1", "port": port},
        },
        "serving tests",
    )


def with_demo_models(config: Any) -> Any:
    """`config` with the demo models it names generated and listed in `serving.model_sources`, as
    `ray-vram up` and `ray-vram serve` do (the serving path serves them from their directory)."""
    from vram_scheduler.tools.demo.model import demo_sources

    return demo_sources(config, progress=lambda _: None)


def start_monitor(node: str, gcs_address: str, inventory: Path = INVENTORY) -> tuple[Any, threading.Thread]:
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
        deadline = time.monotonic() + 60
        while len(controller.allocator.vram_state().nodes) < nodes:
            assert time.monotonic() < deadline, "the monitors published no inventory"
            time.sleep(0.2)
        controller.apply(config)
        controller.wait_ready(timeout_s=600)
        yield controller
    finally:
        try:
            controller.shutdown()
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A 2 GiB overhead for every model (placement.replica_overhead_gb): the tests' room arithmetic is round.
    models = [model("alpha"), model("beta", router_name="beta-alias", max_tokens=10)]
    with running_stack(models, placement={"replica_overhead_gb": 2}) as started:
        yield started


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


def stream_outcome(base: str, body: dict[str, Any], first: threading.Event) -> str:
    """How a streamed completion ended: "error: <message>" (an OpenAI error event), "done" ([DONE]
    last, no error event), "cut" (neither, or the connection broke) or "hung". `first` is set at
    the first event."""
    import httpx

    lines: list[str] = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
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
