"""The `sizes` stage of the GPU benchmark: `ray-vram measure` on three model sizes, as docs/cli.md
tells a user to run it (max_model_len 4096, concurrency 32), and what each size used beyond its
share: the data behind the overheads `capacity` derives from a model's weights.

Models are random-weight checkpoints of real size, made on the GPU in a child process (this one
never holds a CUDA context) and kept in `--model-root` between runs:

- ``qwen2-1.5b``: the demo model's GPU shape (28 layers, hidden 1536, about 2.9 GB in bf16);
- ``llama-7b``: Llama, hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 11008 (about 11.4 GB);
- ``llama-14b``: Llama, hidden 5120, 40 layers, 40 heads, 8 KV heads, intermediate 13824 (about 22 GB).

Each measurement starts vLLM twice (the sizing run, then the replica run at the recommended
`vram_gb` under the replica's share and MPS cap), about 60-90 s per start on an H100: run one size
per command (`python -m bench.gpu.run sizes --size llama-7b`) to stay within a command's time.
Results: `<results>/sizes-<size>.json`; `report` merges them into bench/results/gpu.json.

Usage (on the GPU machine):
  python -m bench.gpu.run sizes [--size NAME] [--model-root DIR] [--results DIR]
  python -m bench.gpu.sizes make DIR HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE   (the child process)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: name -> (maker, shape): "demo" is the demo model's GPU shape; "llama" takes
#: (hidden, layers, heads, kv heads, intermediate).
SIZES: dict[str, tuple[str, tuple[int, ...]]] = {
    "qwen2-1.5b": ("demo", ()),
    "llama-7b": ("llama", (4096, 32, 32, 8, 11008)),
    "llama-14b": ("llama", (5120, 40, 40, 8, 13824)),
}
#: The workload docs/cli.md's measure example uses for these sizes.
MAX_MODEL_LEN, CONCURRENCY = 4096, 32
#: Extra `ray-vram measure` flags (e.g. "--no-replica-run" where device time is short).
MEASURE_ARGS_ENV = "RAY_VRAM_SIZES_MEASURE_ARGS"
MPS_PIPE, MPS_LOGS = "/tmp/rv-bench-mps/pipe", "/tmp/rv-bench-mps/log"


def make_llama(directory: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> None:
    """A random-weight Llama of this shape in bf16, made on the GPU, with the demo model's offline
    tokenizer (runs in the child process `python -m bench.gpu.sizes make ...`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vram_scheduler.tools.demo.parts import train_tokenizer

    tokenizer = train_tokenizer(0, MAX_MODEL_LEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    staging = directory.with_name(directory.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)


def ensure_model(name: str, root: Path) -> Path:
    """The model of size `name` under `root`, made first (in a child process) if missing."""
    directory = root / name
    if (directory / "config.json").exists():
        return directory
    maker, shape = SIZES[name]
    started = time.monotonic()
    print(f"sizes: making {name} in {directory} …", flush=True)
    if maker == "demo":
        from .measured_stack import generated_model

        generated_model(directory)
    else:
        command = [sys.executable, "-m", "bench.gpu.sizes", "make", str(directory), *map(str, shape)]
        subprocess.run(command, check=True)
    print(f"sizes: {name} made in {time.monotonic() - started:.0f}s", flush=True)
    return directory


def measure_command(model: Path, log_file: Path) -> list[str]:
    """`ray-vram measure` as docs/cli.md tells a user to run it, with JSON output."""
    return [
        sys.executable, "-m", "vram_scheduler.cli", "measure", "--model", str(model),
        "--max-model-len", str(MAX_MODEL_LEN), "--concurrency", str(CONCURRENCY),
        "--log-file", str(log_file), "--output", "json",
        *os.environ.get(MEASURE_ARGS_ENV, "").split(),
    ]  # fmt: skip


def weights_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.iterdir() if f.suffix == ".safetensors")


def measure_size(name: str, root: Path, logs: Path) -> dict[str, Any]:
    """Make (if needed) and measure one size; the recommendation and what the replica run saw."""
    model = ensure_model(name, root)
    logs.mkdir(parents=True, exist_ok=True)
    command = measure_command(model, logs / f"measure-{name}.log")
    print(f"sizes: {' '.join(command)}", flush=True)
    started = time.monotonic()
    # progress goes to stderr, shown as it comes; the result is the JSON on stdout
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    outcome: dict[str, Any] = {
        "size": name,
        "model": str(model),
        "weights_bytes": weights_bytes(model),
        "exit_code": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
    }
    try:
        result = json.loads(done.stdout)
    except ValueError:
        outcome["error"] = f"no JSON from ray-vram measure (exit {done.returncode}); log: {logs}"
        return outcome
    replica = result.get("replica_run") or {}
    outcome.update(
        {
            "vram_gb": result["vram_gb"],
            "overhead_gb": result["overhead_gb"],
            "reservation_gb": result["reservation_gb"],
            "peak_over_share_gib": round(result["peak_over_share_bytes"] / 2**30, 3),
            "sizing_peak_gib": round(result["peak_bytes"] / 2**30, 3),
            "replica_peak_gib": round(replica.get("peak_bytes", 0) / 2**30, 3),
            "replica_mps_capped": replica.get("mps_capped"),
            "replica_failed": replica.get("failed"),
            "replica_errors": replica.get("errors", []),
            "failed": result["failed"],
            "errors": result["errors"],
            "measure": result,
        }
    )
    print(
        f"sizes: {name}: vram_gb {outcome['vram_gb']}, peak over the share "
        f"{outcome['peak_over_share_gib']} GiB -> overhead_gb {outcome['overhead_gb']} "
        f"(reservation {outcome['reservation_gb']} GiB) in {outcome['seconds']}s",
        flush=True,
    )
    return outcome


def run_sizes(names: list[str], root: Path, results: Path) -> dict[str, Any]:
    """Measure each size in turn under an MPS daemon (the replicas' cap), writing each as it ends."""
    from vram_scheduler.serving.replica import mps

    from .tools import write_json

    started_mps = mps.start_daemon(MPS_PIPE, MPS_LOGS)
    os.environ[mps.PIPE_DIR_ENV] = MPS_PIPE  # measure's replica run becomes an MPS client
    out: dict[str, Any] = {}
    try:
        for name in names:
            out[name] = measure_size(name, root, results / "logs")
            write_json(results / f"sizes-{name}.json", out[name])
    finally:
        if started_mps:
            mps.stop_daemon(MPS_PIPE, MPS_LOGS)
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 8 and argv[1] == "make":
        make_llama(Path(argv[2]), *(int(x) for x in argv[3:8]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
