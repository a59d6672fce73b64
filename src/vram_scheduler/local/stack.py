"""Local mode (`ray-vram up`): the whole platform on one machine, in the foreground.

An embedded Ray, the allocator, a monitor in this process (NVML when a GPU is present, else host
memory as one pseudo-GPU), the serving controller with its HTTP API, and the OpenAI endpoint.
Ctrl-C shuts everything down: models first (each replica frees its reservation), then Serve, then
Ray — nothing is left running or reserved.

The controller API (127.0.0.1 only) requires the installation's controller token (the file
`controller-token` beside the Ray token, or `$RAY_VRAM_CONTROLLER_TOKEN`) and refuses cross-site
requests (`serving.controller.auth`).

Nothing is reachable from another host without a credential: everything that takes an address
listens on 127.0.0.1, and Ray's own gRPC servers (which always listen on every interface) require
the installation's Ray token (`ray_auth_env`). The OpenAI endpoint leaves loopback only when
`serving.host` says so, and then only with an API key (`check_serving_exposure`). Replicas answer
only the routers: local mode makes the cluster's internal key (`internal_key`) when the
environment has none, before Ray starts, so every Ray process inherits it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..core.config import ConfigError, RayVRAMConfig, ServingSettings
from ..core.contract import ApplyResult
from ..core.errors import RayVramError
from ..core.loopback import is_loopback_host, keep_ray_on_loopback
from ..serving.controller.auth import GuardedApp, RequestGuard, allowed_hosts, ensure_secret_file, server_token
from ..serving.internal_key import ensure_internal_key

log = logging.getLogger(__name__)

#: prctl(2) option: orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36

#: vLLM engine start in seconds instead of a minute on CPU machines (see docs/install.md "Local mode").
LOCAL_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
}

#: Set for this process and every process it starts, whatever the environment says (with
#: `loopback.LOOPBACK_NODE_ENV`: the Ray node, its agents and workers on 127.0.0.1).
LOOPBACK_ENV = {"RAY_VRAM_REPLICA_HOST": "127.0.0.1"}

#: File (in the config directory) holding this installation's Ray token for local mode.
TOKEN_FILE = "ray-auth-token"


def ensure_ray_token(directory: Path | None = None) -> Path:
    """The installation's Ray token file (see `serving.controller.auth.ensure_secret_file`)."""
    return ensure_secret_file(TOKEN_FILE, directory)


def ray_auth_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """Ray's token auth for the local cluster: `RAY_AUTH_MODE=token` and the installation's token
    file. Empty when the caller turned auth off explicitly (`RAY_AUTH_MODE=disabled`, what the test
    suite does for speed); never off by default."""
    if environ.get("RAY_AUTH_MODE", "token").strip().lower() == "disabled":
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ensure_ray_token())}


def local_serving(config: RayVRAMConfig, environ: dict[str, str] | os._Environ[str] = os.environ) -> ServingSettings:
    """The endpoint settings local mode uses: on 127.0.0.1 unless the values set `serving.host`, and
    beyond loopback only with an API key in the environment variable `serving.api_key_env` names."""
    serving = config.serving
    if "host" not in serving.model_fields_set:
        serving = serving.model_copy(update={"host": "127.0.0.1"})
    check_serving_exposure(serving, environ)
    return serving


def check_serving_exposure(serving: ServingSettings, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Refuse an OpenAI endpoint open to other hosts without an API key (ConfigError naming the fix)."""
    if is_loopback_host(serving.host):
        return
    variable = serving.api_key_env
    if variable and environ.get(variable, "").strip():
        return
    where = f"the environment variable {variable}" if variable else "serving.api_key_env (null)"
    raise ConfigError(
        "serving",
        [
            f"serving.host = {serving.host!r} opens the OpenAI endpoint to other hosts, but {where} holds no "
            "API key; set one (e.g. `export RAY_VRAM_API_KEY=$(openssl rand -hex 24)`) or use host 127.0.0.1"
        ],
    )


class NoGPULargeEnough(RayVramError, RuntimeError):
    """Local mode refuses models a replica of which is larger than every GPU of this machine: no GPU
    can join here, so such a replica would stay pending forever. `reasons`: the planner's, per model."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__(
            "no GPU of this machine holds a replica of every model (local mode: none can join): " + "; ".join(reasons)
        )

    def __reduce__(self) -> tuple[type[NoGPULargeEnough], tuple[list[str]]]:
        return (type(self), (self.reasons,))


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
    mps_dirs: tuple[str, str] | None = None
    #: What the controller's `apply` returned: kept, deployed, removed, and per model the reasons
    #: of its pending replicas ("unplaced").
    applied: ApplyResult = field(default_factory=ApplyResult)
    _threads: list[threading.Thread] = field(default_factory=list)
    _started_at: float | None = None

    def start(self, progress: Callable[[str], None] = print) -> None:
        self.config = self.config.model_copy(update={"serving": local_serving(self.config)})
        self._started_at = time.time()
        become_subreaper()
        for key, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.update(LOOPBACK_ENV)
        ensure_internal_key()  # before Ray: the raylet and every worker inherit it
        keep_ray_on_loopback()
        auth = ray_auth_env()
        os.environ.pop("RAY_AUTH_TOKEN", None)  # a token for another cluster would win over ours
        os.environ.update(auth or {"RAY_AUTH_MODE": "disabled"})
        if not auth:
            progress(
                "warning: RAY_AUTH_MODE=disabled: Ray's gRPC ports (on every interface) accept anyone "
                "who can reach this machine"
            )
        import ray
        from ray import serve

        from ..core.ray_names import NAMESPACE
        from ..serving.controller.actor import ControllerClient
        from ..serving.controller.http_api import ControllerAPI

        self._start_mps(progress)
        _apply_to_this_process(token=bool(auth))
        progress("starting Ray (local, token auth) ..." if auth else "starting Ray (local) ...")
        self.started_ray = True  # before init: an interrupt inside it still shuts down what it started
        on_sigterm = signal.getsignal(signal.SIGTERM)
        with _callers_sigterm_handler_kept():
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
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            raise RuntimeError(f"the local Ray node took address {node_ip}, not 127.0.0.1; refusing to serve")
        serve.start(proxy_location="Disabled")
        self.controller = ControllerClient(self.config.serving)
        self._start_monitor(ray.get_runtime_context().gcs_address)
        self._wait_inventory()
        token, hint = server_token()
        guard = RequestGuard(token=token, hosts=allowed_hosts(), hint=hint)
        self.http = make_server(
            "127.0.0.1",
            self.controller_port,
            GuardedApp(ControllerAPI(self.controller), guard),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(target=self.http.serve_forever, name="controller-http", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._refuse_too_big()
        progress(f"deploying {len(self.config.models)} model(s) ...")
        self.applied = self.controller.apply(self.config)

    def _refuse_too_big(self) -> None:
        """Raise `NoGPULargeEnough` before any engine starts when a model's replica is larger than
        every GPU here (the planner's `too_big`); a model merely without room now stays pending."""
        planned = self.controller.allocator.plan(self.config.models, self.config.placement)
        too_big = [u.reason for u in planned.unplaced if u.too_big]
        if too_big:
            raise NoGPULargeEnough(too_big)

    def _start_mps(self, progress: Callable[[str], None]) -> None:
        """Start an MPS control daemon of this stack's own when the machine has NVIDIA GPUs, so each
        replica's engine is hard-capped at its reservation (see `serving.mps`); Ray workers inherit
        its pipe directory."""
        from ..monitor.readers import NVMLReader, default_node_name
        from ..serving.replica import mps

        if os.environ.get(mps.PIPE_DIR_ENV) or os.environ.get(mps.SWITCH_ENV) == "off" or mps.control_binary() is None:
            return
        try:
            reader = NVMLReader(default_node_name())
            has_gpu = bool(reader.gpu_count)
            reader.close()
        except Exception:
            has_gpu = False
        if not has_gpu:
            return
        base = tempfile.mkdtemp(prefix="rv-mps-")
        pipe_dir, log_dir = os.path.join(base, "pipe"), os.path.join(base, "log")
        mps.start_daemon(pipe_dir, log_dir)
        self.mps_dirs = (pipe_dir, log_dir)
        os.environ[mps.PIPE_DIR_ENV] = pipe_dir
        progress(f"MPS daemon started ({pipe_dir}): each replica is capped at its reservation")

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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.controller.allocator.vram_state()
            if state.gpus:
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
            if self.mps_dirs is not None:  # after every client is gone: the daemon then quits
                from ..serving.replica import mps

                mps.stop_daemon(*self.mps_dirs)
                os.environ.pop(mps.PIPE_DIR_ENV, None)
                self.mps_dirs = None


def _apply_to_this_process(token: bool) -> None:
    """Make this process's Ray see the auth settings just put in the environment, even if Ray was
    used before: it reads RAY_AUTH_MODE once and caches the token."""
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    if token and get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RuntimeError("Ray did not take RAY_AUTH_MODE=token; refusing to start an unauthenticated local cluster")


@contextlib.contextmanager
def _callers_sigterm_handler_kept() -> Iterator[None]:
    """While `ray.init` runs, keep the caller's SIGTERM handler: Ray installs one that calls
    `sys.exit` first thing, and a SIGTERM landing inside one of Ray's finalizers then raised an
    exception that Python ignores, so `up` went on starting instead of stopping."""
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install


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
    from ..serving.replica.engine_processes import wait_gone

    for process in left:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    wait_gone(left, timeout_s)
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
