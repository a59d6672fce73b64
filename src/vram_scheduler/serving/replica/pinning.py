"""Pinning a replica process to the GPU its reservation names, before anything touches CUDA.

Ray's fractional `num_gpus` is a label, not memory, and Ray's own CUDA_VISIBLE_DEVICES choice
packs replicas where it likes. Replicas therefore run with
``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` (Ray leaves the variable alone) and set it
themselves to the reserved GPU's UUID — by UUID, not index, so device ordering can never send
a replica to the wrong card. vLLM's engine process inherits the variable; inside, the one
visible device is ``cuda:0``.
"""

from __future__ import annotations

import os
from typing import Literal

from ...core.errors import RayVramError

#: Runtime-env variables every GPU replica gets (see the module docstring).
PINNING_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


class PinningError(RayVramError, RuntimeError):
    """The replica cannot run on the GPU its reservation names."""


def is_cuda_uuid(gpu_uuid: str) -> bool:
    """NVML UUIDs of real GPUs (and MIG slices); host-memory pseudo-GPUs have other names."""
    return gpu_uuid.startswith(("GPU-", "MIG-"))


def gpu_present(gpu_uuid: str) -> bool:
    """Whether NVML on this node knows `gpu_uuid` (False without a GPU or a driver)."""
    if not is_cuda_uuid(gpu_uuid):
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        return True
    except Exception:
        return False
    finally:
        pynvml.nvmlShutdown()


def pin_process(gpu_uuid: str) -> Literal["cuda", "cpu"]:
    """Make `gpu_uuid` this process's only visible GPU, or hide every GPU and return 'cpu' for a
    host-memory reservation or a GPU that a declared inventory names but this node does not have
    (CI and laptops: vLLM's CPU backend stands in, the reservation is accounting only).

    Must run before CUDA is initialised in this process (torch.cuda, vLLM).
    """
    if not gpu_present(gpu_uuid):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_uuid
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return "cuda"


def visible_device_total_bytes() -> int:
    """Total memory of the pinned GPU through NVML (does not initialise CUDA)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        handle = pynvml.nvmlDeviceGetHandleByUUID(visible) if is_cuda_uuid(visible) else None
        if handle is None:
            raise PinningError(f"CUDA_VISIBLE_DEVICES={visible!r} names no GPU UUID")
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    finally:
        pynvml.nvmlShutdown()
