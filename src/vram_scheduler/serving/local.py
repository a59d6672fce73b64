"""Local mode (`ray-vram up`): the whole platform on one machine, in the foreground.

An embedded Ray (loopback only), the allocator, a monitor in this process (NVML when a GPU is
present, else host memory as one pseudo-GPU), the serving controller with its HTTP API, and the
OpenAI endpoint. Ctrl-C shuts everything down: models first (each replica frees its
reservation), then Serve, then Ray — nothing is left running or reserved.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..config import RayVRAMConfig
from ..demo_model import ensure_demo_model, is_demo_model

log = logging.getLogger(__name__)

#: prctl(2) option: orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36

#: vLLM engine start in seconds instead of a minute on CPU machines (see README "Local mode").
LOCAL_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    # Replicas serve on loopback: everything of local mode stays on 127.0.0.1.
    "RAY_VRAM_REPLICA_HOST": "127.0.0.1",
}


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


@dataclass
class LocalStack:
    """Everything `ray-vram up` started, stopped in reverse order by `stop()`."""

    config: RayVRAMConfig
    controller_port: int = 8080
    monitor_interval_s: float = 1.0
    num_cpus: int | None = None
    controller: Any = None
    monitor: Any = None
    http: Any = None
    started_ray: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)
    _started_at: float | None = None

    def start(self, progress: Callable[[str], None] = print) -> None:
        self._started_at = time.time()
        become_subreaper()
        for key, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if any(is_demo_model(m.model) for m in self.config.models):
            progress("preparing the demo model ...")
            ensure_demo_model()
        import ray
        from ray import serve

        from ..allocator import NAMESPACE
        from .controller import Controller
        from .http_api import ControllerAPI

        progress("starting Ray (local, 127.0.0.1 only) ...")
        self.started_ray = True  # before init: an interrupt inside it still shuts down what it started
        on_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(
            address="local",  # always a new cluster of our own, never someone else's
            namespace=NAMESPACE,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            num_cpus=self.num_cpus or os.cpu_count(),
            logging_level=logging.WARNING,
            log_to_driver=os.environ.get("RAY_VRAM_LOG_TO_DRIVER", "0") == "1",
        )
        # Ray's core worker replaces the SIGTERM handler with one that aborts the process: put back
        # the caller's (`up` turns SIGTERM into a clean stop).
        if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
        serve.start(proxy_location="Disabled")
        self.controller = Controller(self.config.serving)
        self._start_monitor(ray.get_runtime_context().gcs_address)
        self._wait_inventory()
        self.http = make_server(
            "127.0.0.1",
            self.controller_port,
            ControllerAPI(self.controller),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(target=self.http.serve_forever, name="controller-http", daemon=True)
        thread.start()
        self._threads.append(thread)
        progress(f"deploying {len(self.config.models)} model(s) ...")
        self.controller.apply(self.config)

    def _start_monitor(self, address: str) -> None:
        from ..monitor.readers import HostMemoryReader, NVMLReader, default_node_name
        from ..monitor.service import MonitorService, MonitorSettings

        node = default_node_name()
        try:
            reader: Any = NVMLReader(node)
            if not reader.gpu_count:
                reader.close()
                reader = HostMemoryReader(node)
        except Exception:
            reader = HostMemoryReader(node)
        settings = MonitorSettings(
            node=node, interval_s=self.monitor_interval_s, host="127.0.0.1", port=0, ray_address=address
        )
        self.monitor = MonitorService(reader, settings)
        thread = threading.Thread(target=self.monitor.run, name="monitor", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _wait_inventory(self, timeout_s: float = 60) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = ray.get(self.controller.allocator.get_vram_state.remote())
            if state["gpus"]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the monitor published no inventory within {timeout_s:g}s")

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.controller is not None:
            try:
                self.controller.shutdown()
            except Exception as error:
                log.warning("model shutdown failed: %s", error)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.monitor is not None:
            self.monitor.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        try:
            if self.started_ray and ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            if self._started_at is not None:
                end_descendants(self._started_at)


def become_subreaper() -> None:
    """Make orphaned descendants this process's children instead of init's (Linux; elsewhere a no-op).

    A replica killed while loading leaves vLLM's engine-core process without its parent; as a
    subreaper, local mode still finds it among its own children and ends it in `stop()`.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_descendants(since: float, timeout_s: float = 10.0) -> list[int]:
    """End every process descending from this one that started at or after `since` (SIGTERM, then
    SIGKILL after `timeout_s`); returns their pids. Ray's shutdown normally leaves none."""
    import psutil

    try:
        left = [p for p in psutil.Process().children(recursive=True) if p.create_time() >= since - 1]
    except psutil.Error:
        return []
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    if left:
        log.info("ended %d process(es) left after shutdown: %s", len(left), [p.pid for p in left])
    return [p.pid for p in left]


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
