"""The three serving stacks the benchmark compares, started the same way a user would start them."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

#: Identical engine settings for every stack (vLLM CPU backend, demo model).
ENGINE = {
    "dtype": "float32",
    "max_model_len": 512,
    "max_num_seqs": 16,
    "enforce_eager": True,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}
#: KV cache of every stack: 1 GiB (vLLM/Ray Serve LLM via VLLM_CPU_KVCACHE_SPACE, ray-vram from
#: the budget: 2.25 GiB minus the 1.25 GiB CPU runtime allowance).
KV_GIB = 1
RAY_VRAM_BUDGET_GB = 2.25


def ray_vram_model(model_id: str, model_dir: Path) -> dict:
    """A values `models` entry serving the demo model with the benchmark's engine settings."""
    engine = {k: v for k, v in ENGINE.items() if k != "max_model_len"}
    return {
        "model_id": model_id,
        "model": str(model_dir),
        "vram_gb": RAY_VRAM_BUDGET_GB,
        "max_model_len": ENGINE["max_model_len"],
        "engine_kwargs": engine,
    }


def ray_vram_command(model_dir: Path, port: int, controller_port: int, work: Path) -> tuple[list[str], dict[str, str]]:
    values = {"models": [ray_vram_model("demo", model_dir)], "serving": {"host": "127.0.0.1", "port": port}}
    path = work / "ray-vram-values.yaml"
    path.write_text(yaml.safe_dump(values))
    return up_command(path, controller_port), {"VLLM_CPU_KVCACHE_SPACE": ""}


def up_command(values: Path, controller_port: int) -> list[str]:
    """`ray-vram up -f VALUES` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "vram_scheduler.cli",
        "up",
        "-f",
        str(values),
        "--controller-port",
        str(controller_port),
    ]


def vllm_command(model_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "demo"]
    command += ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager"]
    command += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    command += ["--disable-uvicorn-access-log"]
    return command, {"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB)}


def serve_llm_command(model_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "bench.serving.serve_llm", "--model", str(model_dir), "--port", str(port)]
    return command, {"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB)}
