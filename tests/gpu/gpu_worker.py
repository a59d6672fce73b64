"""A process holding GPU memory for the GPU tests, driven line by line over stdin/stdout (JSON).

Started as `python gpu_worker.py [--budget-bytes N]`: initialises CUDA on device 0, caps PyTorch
to the budget (torch.cuda.set_per_process_memory_fraction, as a replica does), prints
{"pid", "uuid", "ready"} and then answers commands:

  alloc N     allocate N bytes through PyTorch (kept)     → {"ok": true} or {"oom": "..."}
  raw N       allocate N bytes with cudaMalloc, bypassing PyTorch's cap (CuPy, else libcudart)
  compute     a matrix product on the GPU                 → {"ok": true, "value": float}
  meminfo     torch.cuda.mem_get_info()                   → {"free": int, "total": int}
  exit
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

import torch


def raw_malloc(n_bytes: int) -> object:
    """cudaMalloc outside PyTorch's allocator: what a non-PyTorch library in a replica would do."""
    try:
        import cupy

        return cupy.cuda.runtime.malloc(n_bytes)
    except ImportError:
        pass
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cuda_runtime", "lib")
    candidates = [os.path.join(lib_dir, n) for n in sorted(os.listdir(lib_dir))] if os.path.isdir(lib_dir) else []
    for path in [*candidates, "libcudart.so"]:
        try:
            cudart = ctypes.CDLL(path)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("neither CuPy nor libcudart found")
    pointer = ctypes.c_void_p()
    status = cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(n_bytes))
    if status != 0:
        raise MemoryError(f"cudaMalloc({n_bytes}) failed with status {status}")
    return pointer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-bytes", type=int)
    args = parser.parse_args()
    torch.cuda.init()
    _, total = torch.cuda.mem_get_info(0)
    if args.budget_bytes:
        torch.cuda.set_per_process_memory_fraction(args.budget_bytes / total, 0)
    held = [torch.ones(1, device="cuda")]
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    reply({"pid": os.getpid(), "uuid": uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", "ready": True})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "alloc":
            try:
                held.append(torch.empty(int(rest[0]), dtype=torch.uint8, device="cuda"))
                torch.cuda.synchronize()
                reply({"ok": True, "reserved": torch.cuda.memory_reserved(0)})
            except torch.OutOfMemoryError as error:
                reply({"oom": str(error).splitlines()[0]})
        elif command == "raw":
            held.append(raw_malloc(int(rest[0])))
            reply({"ok": True})
        elif command == "compute":
            a = torch.randn(2048, 2048, device="cuda")
            value = float((a @ a).sum().item())
            reply({"ok": True, "value": value})
        elif command == "meminfo":
            free, total = torch.cuda.mem_get_info(0)
            reply({"free": free, "total": total})
        elif command == "exit":
            return


def reply(data: dict) -> None:
    print(json.dumps(data), flush=True)


if __name__ == "__main__":
    main()
