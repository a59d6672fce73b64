"""`ray-vram serve`: the serving controller (the serving image's entrypoint), HTTP API on gunicorn."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ...core.config import RayVRAMConfig, load_config
from ...core.exit_codes import ExitCode
from ...core.flags import add_ray_address_option
from ...serving.controller.auth import GuardedApp, RequestGuard, allowed_hosts, server_token
from .options import add_values_option, ray_address

if TYPE_CHECKING:
    from ...serving.controller.actor import ControllerClient

log = logging.getLogger("ray-vram.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serving controller: converge a Ray cluster to a config and serve the controller API",
        description="Wait for the Ray cluster, plan, deploy the Serve applications of the config's models,\n"
        "and serve the controller API (/healthz, /metrics, /v1/vram, /v1/deployments) with gunicorn.\n"
        "Started again with a changed config it converges: unchanged models keep serving untouched,\n"
        "removed models are shut down and their reservations freed, new models are placed.\n"
        "Every route but /healthz and /metrics needs the controller token: $RAY_VRAM_CONTROLLER_TOKEN,\n"
        "else the installation's token file (~/.config/ray-vram/controller-token, created on first use).\n\n"
        "exit codes: 0 stopped by SIGTERM/SIGINT, 1 runtime failure, 2 invalid config\n\n"
        "examples:\n"
        "  ray-vram serve -f /etc/ray-vram/models.yaml --ray-address ray-head:6379\n"
        "  ray-vram serve -f values/local.yaml --ray-address auto --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_values_option(
        parser, required=True, help="values/config file (`models`, `placement`, `serving`)", deprecated=["--config"]
    )
    add_ray_address_option(parser, deprecated=["--address"])
    parser.add_argument("--host", default="0.0.0.0", help="controller API listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="controller API port (default 8080)")
    parser.add_argument("--wait-timeout", type=float, default=600, help="seconds to wait for the Ray cluster")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients use to reach the controller (repeatable; IP addresses and localhost always "
        "work; also $RAY_VRAM_CONTROLLER_HOSTS, comma-separated); other Host headers are refused (DNS rebinding)",
    )
    parser.set_defaults(func=run)


class _Lazy:
    """WSGI app created in the gunicorn worker (Ray connections do not survive a fork)."""

    def __init__(self, config_path: str, address: str, wait_timeout_s: float, guard: RequestGuard):
        self.config_path = config_path
        self.guard = guard
        self.address = address
        self.wait_timeout_s = wait_timeout_s
        self.api: Any = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._boot, name="controller-boot", daemon=True).start()

    def _boot(self) -> None:
        from ...serving.controller.http_api import ControllerAPI
        from ...tools.demo.model import demo_sources

        config = demo_sources(load_config(self.config_path), progress=log.info)
        try:
            join_ray(self.address, self.wait_timeout_s)
        except ConnectionError as error:
            self.error = str(error)
            log.error(self.error)
            return
        controller = start_controller(config)
        with self._lock:
            self.api = ControllerAPI(controller)
        try:
            result = controller.apply(config)
            log.info("applied %s: %s", self.config_path, result)
        except Exception as error:
            self.error = f"apply failed: {error}"
            log.exception("apply failed")

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return GuardedApp(self._dispatch, self.guard)(environ, start_response)

    def _dispatch(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self._lock:
            api = self.api
        if api is None:
            path = environ.get("PATH_INFO", "")
            status = "503 Service Unavailable" if self.error or path != "/healthz" else "200 OK"
            body = (
                f'{{"status": "{"failed: " + self.error if self.error else "starting"}"}}'.encode()
                if path == "/healthz"
                else b'{"error": "controller starting"}'
            )
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return api(environ, start_response)


def join_ray(address: str, timeout_s: float) -> None:
    """Join the cluster at `address` as a driver in ray-vram's namespace, retrying for `timeout_s`
    (the controller pod may come up before the Ray head answers); ConnectionError after that."""
    import ray

    from ...core.loopback import prepare_ray_join
    from ...core.ray_names import NAMESPACE

    deadline = time.monotonic() + timeout_s
    prepare_ray_join(address)
    while True:
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            return
        except (ConnectionError, RuntimeError) as error:
            if time.monotonic() > deadline:
                raise ConnectionError(f"Ray cluster {address} not reachable after {timeout_s:g}s: {error}") from error
            time.sleep(2)


def start_controller(config: RayVRAMConfig) -> ControllerClient:
    """Serve without its HTTP proxies (the router is the front door) and a handle to the cluster's
    one controller actor: what every `apply` of a whole values file goes through."""
    from ray import serve

    from ...serving.controller.actor import ControllerClient

    serve.start(proxy_location="Disabled")
    return ControllerClient(config.serving)


def run(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    load_config(args.values)  # invalid config: exit 2 before anything starts
    token, hint = server_token()  # before the fork: the worker answers with it from the first request
    guard = RequestGuard(token=token, hosts=allowed_hosts(args.allowed_host), hint=hint)
    lazy = _Lazy(args.values, ray_address(args.ray_address), args.wait_timeout, guard)

    class _App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", 1)  # one controller: it owns the convergence loop
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", 8)
            self.cfg.set("timeout", 0)
            self.cfg.set("accesslog", None)
            self.cfg.set("post_worker_init", lambda worker: lazy.start())

        def load(self) -> Any:
            return lazy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _App().run()
    return ExitCode.OK
