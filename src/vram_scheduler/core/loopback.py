"""Keeping Ray on 127.0.0.1: what local mode starts, and whoever joins it from this machine.

Ray rewrites a node address of 127.0.0.1 (and a GCS address of 127.0.0.1:PORT) to the machine's
network address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is off — named for macOS/Windows, read on
every platform. Local mode turns it off so that its node, agents and workers listen on loopback; a
process joining such a cluster must turn it off too, or it looks for the GCS at the network address,
where nothing listens.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

LOOPBACK_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address, `[v6]` or `localhost`) is reachable from this machine only."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keep_ray_on_loopback() -> None:
    """This process and those it starts: a Ray node here is 127.0.0.1, not the network address."""
    os.environ.update(LOOPBACK_NODE_ENV)
    try:
        from ray._private import ray_constants
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; Ray may be imported already


def prepare_ray_join(address: str | None) -> None:
    """Before `ray.init(address=...)`: joining a GCS on a loopback address that does not also answer
    on the machine's network address (local mode's) keeps this node on loopback too. Any other
    address is left to Ray (a `ray start` cluster reached as 127.0.0.1 joins as before)."""
    if not address or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not is_loopback_host(host) or not port.isdigit():
        return
    from ray._private.services import get_node_ip_address

    network_ip = get_node_ip_address()
    if not is_loopback_host(network_ip):
        with contextlib.suppress(OSError), socket.create_connection((network_ip, int(port)), timeout=1):
            return
    keep_ray_on_loopback()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a race with other binders is possible)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
