"""Local mode exposes nothing to other hosts without a credential.

The stack runs as users get it (Ray's token auth not turned off) and serves the demo model. Every
listening socket of its process tree (the `ray-vram up` process, GCS, raylet, agents, workers,
replicas) must be on a loopback address, or Ray must refuse an unauthenticated client there. Probes
connect to loopback only: a socket on every interface is reached through 127.0.0.1 / ::1, and one
bound to a single non-loopback address fails without being probed.
"""

from __future__ import annotations

import ipaddress
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import stack

#: One harmless call per Ray gRPC service a local node runs; a server answers UNIMPLEMENTED for
#: services it does not host, and checks the token (UNAUTHENTICATED) before running a method it does.
RAY_GRPC_PROBES = (
    "/ray.rpc.NodeInfoGcsService/GetClusterId",
    "/ray.rpc.NodeManagerService/GetSystemConfig",
    "/ray.rpc.ObjectManagerService/FreeObjects",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/HealthCheck",
    "/ray.rpc.events.EventAggregatorService/AddEvents",
    # Serve's inter-deployment server in every replica (on [::], whatever the node address).
    "/ray.serve.ASGIService/HandleRequest",
)


@dataclass(frozen=True)
class Listener:
    """A socket taking connections (TCP) or datagrams (UDP) from anyone who can reach `address`."""

    kind: str
    address: str
    port: int
    pid: int
    process: str

    def __str__(self) -> str:
        return f"{self.kind} {self.address}:{self.port} pid {self.pid} ({self.process})"


def _process_label(proc: psutil.Process) -> str:
    """`gcs_server`, `raylet`, or a Ray worker's title (`ray::ServeReplica:...`)."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return proc.name()
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("ray::"):
        return first.split()[0]
    if len(cmdline) > 1 and Path(first).name.startswith("python"):
        script = next((Path(part).name for part in cmdline[1:] if part.endswith(".py")), None)
        return f"python {script}" if script else proc.name()
    return Path(first).name


def listeners(root_pid: int) -> list[Listener]:
    """Every listening TCP socket and every unconnected bound UDP socket of `root_pid` and its descendants."""
    root = psutil.Process(root_pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
            label = _process_label(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            tcp = conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN
            udp = conn.type == socket.SOCK_DGRAM and not conn.raddr
            if tcp or udp:
                found.add(Listener("tcp" if tcp else "udp", conn.laddr.ip, conn.laddr.port, proc.pid, label))
    return sorted(found, key=lambda item: (item.process, item.port))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def loopback_target(listener: Listener) -> str | None:
    """Where to reach a socket bound to every interface without leaving this host (None: bound to
    one non-loopback address, which a probe could reach only from outside)."""
    if listener.address == "0.0.0.0":
        return f"127.0.0.1:{listener.port}"
    if listener.address == "::":
        return f"[::1]:{listener.port}"
    return None


def grpc_answer(target: str, token: str | None) -> str | None:
    """`refused` (UNAUTHENTICATED), `accepted (...)` (the server ran the call), or None (no Ray
    gRPC service answered there)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        for method in RAY_GRPC_PROBES:
            call = channel.unary_unary(method)
            try:
                call(b"", timeout=5, metadata=metadata)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    continue
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    return "refused"
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None  # not a gRPC server (e.g. HTTP/1)
                return f"accepted ({method}: {code.name})"
            return f"accepted ({method}: OK)"
    return None


def http_answer(target: str, token: str | None) -> str | None:
    """`refused` (401/403 without a valid token), `accepted (...)`, or None (no HTTP server)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"http://{target}/", headers=headers, timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code in (401, 403):
        return "refused"
    return f"accepted (HTTP {response.status_code})"


def unauthenticated_answer(target: str, token: str | None = None) -> str:
    return grpc_answer(target, token) or http_answer(target, token) or "no Ray gRPC or HTTP service answered"


@pytest.fixture(scope="module")
def user_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.LocalStack]:
    """`ray-vram up`'s stack with the defaults users get (token auth on), serving the demo model."""
    with stack.LocalStack([stack.demo_model_spec("exposed")], auth=True) as running:
        yield running


def test_every_listening_socket_is_loopback_or_refuses_unauthenticated_ray_clients(
    user_stack: stack.LocalStack,
) -> None:
    answer = httpx.post(
        f"{user_stack.endpoint}/chat/completions",
        json={"model": "exposed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text  # it serves while the sockets are listed
    token_file = user_stack.work / "config" / "ray-vram" / "ray-auth-token"
    token = token_file.read_text().strip() if token_file.exists() else None

    found = listeners(user_stack.pid)
    lines, problems = [], []
    for listener in found:
        if is_loopback(listener.address):
            lines.append(f"{listener}: loopback")
            continue
        target = loopback_target(listener)
        if target is None:
            verdict = "bound to a non-loopback address (not probed)"
        else:
            verdict = unauthenticated_answer(target)
            if verdict == "refused":
                # The same call with the stack's token gets through: refused for want of a credential.
                with_token = unauthenticated_answer(target, token)
                if with_token == "refused":
                    verdict = "refused even with the stack's token (probe broken?)"
        lines.append(f"{listener}: {verdict}")
        if verdict != "refused":
            problems.append(f"{listener}: {verdict}")
    report = "\n".join(lines)
    print(f"listening sockets of the local stack:\n{report}")
    assert any(item.process == "gcs_server" for item in found), f"the GCS was not found:\n{report}"
    assert not problems, (
        "sockets other hosts may reach without a credential:\n" + "\n".join(problems) + f"\n\nall:\n{report}"
    )


def test_the_token_is_private_to_the_user(user_stack: stack.LocalStack) -> None:
    token_file = user_stack.work / "config" / "ray-vram" / "ray-auth-token"
    assert token_file.is_file(), f"no Ray token at {token_file}"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text().strip()) >= 32
