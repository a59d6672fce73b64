"""NVIDIA MPS as the hard cap on a replica's GPU memory.

`torch.cuda.set_per_process_memory_fraction` caps only PyTorch's allocator in the process that
sets it, and vLLM's engine runs in a child process (EngineCore) that it never reaches. MPS's
per-client limit (`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`) is enforced by the driver on every
allocation of the client process — PyTorch's, NCCL's, cuBLAS workspaces, CUDA graphs — so a
replica that outgrows its reservation gets a CUDA OOM in its own engine and its neighbours on
the GPU are untouched. Measured on the GPU machine (H200): a client limited to 10G saw 9.5 GiB
free (its CUDA context takes 0.5 GiB of the limit), allocated 9 GiB, and failed 12 GiB; the limit
may name the GPU by UUID, so pinning and capping use the same name.

One MPS control daemon serves a node. Whoever starts the node's Ray (``ray-vram up`` locally,
the GPU worker's entrypoint in the chart) starts it with a private pipe directory and exports
that directory as `PIPE_DIR_ENV`; Ray workers inherit it, and a replica becomes an MPS client
only when it starts its engine with the client variables below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from ...core.errors import RayVramError

#: Where the node's MPS control daemon listens (set by whoever started it; inherited by Ray workers).
PIPE_DIR_ENV = "RAY_VRAM_MPS_PIPE_DIRECTORY"
#: "off" keeps local mode from starting MPS (replicas are then sized but not hard-capped).
SWITCH_ENV = "RAY_VRAM_MPS"
CONTROL = "nvidia-cuda-mps-control"
MIB = 1024**2


class MPSError(RayVramError, RuntimeError):
    """The MPS control daemon could not be started or reached."""


#: Where the chart's `gpu.mode: hostMounts` mounts the host's NVIDIA programs (not on PATH there).
DRIVER_BIN = "/usr/local/nvidia/bin"


def control_binary() -> str | None:
    """Path of NVIDIA's MPS control program, or None on machines without the NVIDIA driver tools."""
    return shutil.which(CONTROL) or shutil.which(CONTROL, path=DRIVER_BIN)


def daemon_running(pipe_dir: str | Path) -> bool:
    """Whether an MPS control daemon listens in `pipe_dir`: its `control` socket exists and the pid it
    wrote is alive (the socket file outlives a daemon that quit; seen on the GPU machine)."""
    pipe = Path(pipe_dir)
    if not (pipe / "control").is_socket():
        return False
    try:
        pid = int((pipe / "nvidia-cuda-mps-control.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _daemon_env(pipe_dir: Path, log_dir: Path) -> dict[str, str]:
    return {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}


def start_daemon(pipe_dir: str | Path, log_dir: str | Path, timeout_s: float = 10) -> bool:
    """Start the node's MPS control daemon in `pipe_dir` unless one runs there; True if this call started it."""
    pipe, logs = Path(pipe_dir), Path(log_dir)
    if daemon_running(pipe):
        return False
    binary = control_binary()
    if binary is None:
        raise MPSError(f"{CONTROL} not found on PATH: this node has no NVIDIA MPS")
    pipe.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([binary, "-d"], env=_daemon_env(pipe, logs), capture_output=True, text=True)
    deadline = time.monotonic() + timeout_s
    while not daemon_running(pipe):
        if result.returncode != 0 or time.monotonic() > deadline:
            raise MPSError(
                f"{CONTROL} -d did not start (exit {result.returncode}): {(result.stderr or result.stdout).strip()} "
                f"(log: {logs / 'control.log'})"
            )
        time.sleep(0.05)
    return True


def stop_daemon(pipe_dir: str | Path, log_dir: str | Path) -> None:
    """Ask the daemon in `pipe_dir` to quit (its servers exit once their clients are gone)."""
    binary = control_binary()
    if binary is None or not daemon_running(pipe_dir):
        return
    subprocess.run(
        [binary], input="quit\n", env=_daemon_env(Path(pipe_dir), Path(log_dir)), capture_output=True, text=True
    )


def client_env(pipe_dir: str | Path, gpu_uuid: str, limit_bytes: int) -> dict[str, str]:
    """Environment that makes a process an MPS client capped at `limit_bytes` on `gpu_uuid`."""
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"{gpu_uuid}={limit_bytes // MIB}M",
    }


def node_pipe_dir() -> str | None:
    """This node's MPS pipe directory when its daemon runs, else None."""
    pipe_dir = os.environ.get(PIPE_DIR_ENV)
    return pipe_dir if pipe_dir and daemon_running(pipe_dir) else None
