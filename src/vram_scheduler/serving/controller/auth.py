"""Who may call the serving controller's HTTP API: a bearer token on every route but health (metrics
included), and no cross-site requests (Host and Origin checks), the server side (the client side is `sdk.token`).

Why each check: the API deploys models (code and GPUs) and removes them, so a caller must hold the
installation's controller token (compared in constant time). A browser page must not be able to use
a user's network position either: a cross-site `POST` carries an `Origin` that is not the
controller's own (refused), a DNS-rebound name arrives as a `Host` that is not one of the
controller's names (refused), and only `application/json` bodies are taken (a browser cannot send
those cross-site without a CORS preflight, which the controller never grants). Clients that are not
browsers send no Origin and pass.

Where the token comes from:
- server: `$RAY_VRAM_CONTROLLER_TOKEN` (the chart fills it from its Secret), else the installation's
  token file `controller-token` in the config directory (`ray-vram up`; created 0600 on first use);
- client (SDK, CLI, inference helpers): an explicit token, else `$RAY_VRAM_CONTROLLER_TOKEN`, else
  that file when it exists.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.installation import TOKEN_ENV, TOKEN_FILE, config_dir

#: Extra host names the controller answers to (comma-separated), beside IP addresses and localhost.
HOSTS_ENV = "RAY_VRAM_CONTROLLER_HOSTS"
#: Where an operator finds the token, told to a caller the controller refuses (the chart sets it).
HINT_ENV = "RAY_VRAM_CONTROLLER_TOKEN_HINT"
#: Routes that need no token: liveness only. Prometheus scrapes /metrics with the token (the chart's
#: ServiceMonitor reads it from the auth Secret): model names and counts are not for everyone.
OPEN_ROUTES = frozenset({"/healthz"})


def ensure_secret_file(name: str, directory: Path | None = None) -> Path:
    """The installation's secret file `name`, created on first use: 64 random hex digits, mode 0600 in
    a 0700 directory. An existing file readable by others is narrowed to 0600; an empty one is refilled."""
    directory = directory or config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / name
    if path.exists() and path.read_text().strip():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return path
    temporary = directory / f".{name}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    os.replace(temporary, path)  # atomic: two first starts at once both end with one whole token
    return path


def server_token(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[str, str]:
    """(the token a controller requires, where an operator finds it)."""
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, environ.get(HINT_ENV) or f"the environment variable {TOKEN_ENV} of the controller"
    path = ensure_secret_file(TOKEN_FILE)
    return path.read_text().strip(), environ.get(HINT_ENV) or f"the file {path} (or set {TOKEN_ENV})"


def _split_host(value: str) -> str:
    """`name` of a Host header `name[:port]` or `[v6]:port`, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.rsplit(":", 1)[0]
    return value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_hosts(extra: Iterable[str] = (), environ: dict[str, str] | os._Environ[str] = os.environ) -> frozenset[str]:
    """Host names the controller answers to besides IP addresses: localhost, `extra`, $RAY_VRAM_CONTROLLER_HOSTS."""
    names = {"localhost", *extra, *environ.get(HOSTS_ENV, "").split(",")}
    return frozenset(_split_host(n) for n in names if n.strip())


@dataclass(frozen=True)
class RequestGuard:
    """The controller's checks of one request, before any route runs."""

    token: str
    hosts: frozenset[str]
    hint: str

    def refusal(self, environ: dict[str, Any]) -> tuple[int, dict[str, str]] | None:
        """None when the request may proceed, else (status, JSON body naming what and why)."""
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        if path == "/healthz":
            return None
        host_header = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
        host = _split_host(host_header)
        if not (_is_ip(host) or host in self.hosts or "*" in self.hosts):
            return 403, {
                "error": f"Host {host_header!r} is not a name of this controller (allowed: IP addresses, "
                f"{', '.join(sorted(self.hosts))}); add it with --allowed-host or ${HOSTS_ENV}"
            }
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin.rstrip("/").lower() not in {
            f"http://{host_header.lower()}",
            f"https://{host_header.lower()}",
        }:
            return 403, {
                "error": f"cross-site request refused: Origin {origin!r} is not this controller "
                f"(http://{host_header}); the controller API is not for web pages"
            }
        fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
        if fetch_site is not None and fetch_site not in {"same-origin", "none"}:
            return 403, {"error": f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"}
        if path in OPEN_ROUTES:
            return None
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, {"error": "the controller API needs its token (Authorization: Bearer TOKEN)", "hint": self.hint}
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return 401, {"error": "wrong controller token", "hint": self.hint}
        return None


StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_STATUS = {401: "401 Unauthorized", 403: "403 Forbidden"}


class GuardedApp:
    """WSGI middleware: `guard` first, then `app`."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], guard: RequestGuard):
        self.app = app
        self.guard = guard

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        refusal = self.guard.refusal(environ)
        if refusal is None:
            return self.app(environ, start_response)
        status, body = refusal
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="ray-vram controller"'))
        start_response(_STATUS[status], headers)
        return [data]
