"""`ray-vram measure`: the KV-cache arithmetic and rounding (pure), bad input (exit 2), and one real
measurement of the demo model on vLLM's CPU backend."""

from __future__ import annotations

import json

import pytest
from stack import run_cli

from vram_scheduler.core import capacity
from vram_scheduler.core.config import GIB, ModelSpec
from vram_scheduler.serving.replica.mps import client_env
from vram_scheduler.serving.replica.sizing import CPU_RUNTIME_BYTES, size_engine
from vram_scheduler.tools.measure import (
    CUDA_CONTEXT_BYTES,
    EngineServer,
    build_prompts,
    check_workload,
    error_lines,
    gpu_memory_utilization,
    kv_bytes_per_token,
    kv_cache_bytes,
    model_id_for,
    model_shape,
    recommend_vram_gb,
    round_up_gb,
)

MIB = 2**20
#: The generated demo model's config.json (what matters of it).
DEMO_CONFIG = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "dtype": "float32",
}
#: Qwen2.5-7B-Instruct's shape: 28 layers, 4 KV heads of 128, bf16.
QWEN_7B = {
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


def test_kv_bytes_per_token_follows_vllms_dtype_choice() -> None:
    # float32 checkpoints are served in 16 bits by vLLM's "auto": 2 × 2 layers × 2 heads × 32 × 2 B
    assert kv_bytes_per_token(model_shape(DEMO_CONFIG)) == 512
    assert kv_bytes_per_token(model_shape(DEMO_CONFIG, {"dtype": "float32"})) == 1024
    assert kv_bytes_per_token(model_shape(DEMO_CONFIG, {"dtype": "float32", "kv_cache_dtype": "fp8"})) == 256
    # 2 × 28 × 4 × 128 × 2 B = 56 KiB per token
    assert kv_bytes_per_token(model_shape(QWEN_7B)) == 57344


def test_head_dim_from_config_wins_and_text_config_is_read() -> None:
    config = {**QWEN_7B, "head_dim": 256}
    assert model_shape(config).head_dim == 256
    nested = {"text_config": QWEN_7B, "architectures": ["SomethingForConditionalGeneration"]}
    assert model_shape(nested) == model_shape(QWEN_7B)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model_shape({"hidden_size": 64})


def test_kv_cache_is_whole_blocks_plus_vllms_null_block() -> None:
    # 2 sequences of 512 tokens in blocks of 128: 8 blocks + 1 = 1,152 tokens (what vLLM's CPU
    # backend reports for this cache: "CPU KV cache size: 1,152 tokens").
    assert kv_cache_bytes(2, 512, 512, 128) == 9 * 128 * 512
    # 500 tokens still take 4 whole blocks of 128 per sequence
    assert kv_cache_bytes(2, 500, 512, 128) == kv_cache_bytes(2, 512, 512, 128)
    # Qwen 7B, 16 × 8192 tokens in blocks of 16: 8193 blocks × 16 × 56 KiB ≈ 7 GiB
    assert kv_cache_bytes(16, 8192, 57344, 16) == (16 * 512 + 1) * 16 * 57344
    with pytest.raises(ValueError):
        kv_cache_bytes(0, 512, 512, 128)


def test_round_up_to_half_gib_steps() -> None:
    assert round_up_gb(1) == 0.5
    assert round_up_gb(0.5 * GIB) == 0.5
    assert round_up_gb(0.5 * GIB + 1) == 1.0
    assert round_up_gb(17.01 * GIB) == 17.5
    assert round_up_gb(3 * GIB) == 3.0


def test_recommendation_per_device() -> None:
    # CUDA: the CUDA context (which replica_overhead_gb covers) comes off the peak
    assert recommend_vram_gb("cuda", int(18.4 * GIB)) == 18.0
    assert recommend_vram_gb("cuda", int(18.6 * GIB)) == 18.5
    assert recommend_vram_gb("cuda", int(18.6 * GIB)) * GIB >= 18.6 * GIB - CUDA_CONTEXT_BYTES
    # CPU: the resident peak, and never less than what the CPU replica's sizing needs
    assert recommend_vram_gb("cpu", int(1.37 * GIB)) == 1.5
    floor = 100 * MIB + CPU_RUNTIME_BYTES + 600 * MIB
    assert recommend_vram_gb("cpu", int(1.37 * GIB), floor) == 2.0


def test_gpu_memory_utilization_passes_the_free_memory_check() -> None:
    total, free = 80 * GIB, 60 * GIB
    share = gpu_memory_utilization(free, total)
    assert share * total <= free - GIB
    assert share > 0.73
    with pytest.raises(ValueError, match="free"):
        gpu_memory_utilization(GIB // 2, total)


def test_workload_problems_name_the_value_and_the_limit() -> None:
    shape = model_shape(DEMO_CONFIG)
    assert check_workload(shape, 512, 2, 128, 8) == []
    (problem,) = check_workload(shape, 4096, 2, 128, 8)
    assert "4096" in problem and "2048" in problem and "max_position_embeddings" in problem
    (problem,) = check_workload(shape, 512, 0, 128, 8)
    assert "concurrency = 0" in problem
    (problem,) = check_workload(shape, 512, 2, 512, 8)
    assert "max_tokens = 512" in problem


def test_model_id_and_snippet_are_valid_config() -> None:
    assert model_id_for("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b-instruct"
    assert model_id_for("/models/My Model/") == "my-model"
    ModelSpec(model_id=model_id_for("/srv/__weird__name__"), model="x", vram_gb=1)


def test_error_lines_are_vllms_not_a_traceback_tail() -> None:
    log = "\n".join(
        [
            "(APIServer pid=1) INFO 11-27 13:37:10 [api_utils.py:347] version 0.32.0",
            "(APIServer pid=1) WARNING 11-27 13:37:10 [system_utils.py:255] Found ulimit of 20000: "
            "this can cause fd limit errors like `OSError: [Errno 24] Too many open files`.",
            "(EngineCore pid=2) ERROR 11-27 13:38:15 [core.py:900] EngineCore failed to start.",
            "Traceback (most recent call last):",
            '  File "/x/vllm/v1/core/kv_cache_utils.py", line 700, in check_enough_kv_cache_memory',
            "    raise ValueError(",
            "ValueError: To serve at least one request with the models's max seq len (512), (0.25 MiB KV "
            "cache is needed, which is larger than the available KV cache memory (0.06 MiB).",
            "RuntimeError: Engine core initialization failed. See root cause above.",
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig",
            "  Value error, Cannot find the config file for awq [type=value_error]",
            "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
        ]
    )
    lines = error_lines(log)
    assert lines[0].endswith("EngineCore failed to start.")
    assert any(line.startswith("ValueError: To serve at least one request") for line in lines)
    assert lines[-1] == "Value error, Cannot find the config file for awq [type=value_error]"
    assert not any("Traceback" in line or line.startswith("File ") or "ulimit" in line for line in lines)


def test_prompts_are_distinct_and_fit_the_token_limit() -> None:
    from transformers import AutoTokenizer

    from vram_scheduler.tools.demo.model import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
    prompts = build_prompts(tokenizer, len(tokenizer), 6, 300)
    lengths = [len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    assert len(set(prompts)) == 6
    assert all(294 <= n <= 300 for n in lengths), lengths


# -- the command: bad input (exit 2, before anything starts) ------------------------------------


def test_max_model_len_over_the_models_own_maximum_is_refused() -> None:
    done = run_cli("measure", "--model", "demo", "--max-model-len", "4096", "--concurrency", "2", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert "max_model_len = 4096" in done.stderr and "2048" in done.stderr


def test_concurrency_below_one_is_refused() -> None:
    done = run_cli("measure", "--model", "demo", "--max-model-len", "512", "--concurrency", "0", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert "concurrency = 0" in done.stderr and "≥ 1" in done.stderr


def test_unknown_model_path_is_refused(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    done = run_cli("measure", "--model", str(missing), "--max-model-len", "512", "--concurrency", "1")
    assert done.returncode == 2, done.stderr
    assert str(missing) in done.stderr and "does not exist" in done.stderr


def test_budget_arguments_in_engine_kwargs_are_refused() -> None:
    done = run_cli(
        "measure", "--model", "demo", "--max-model-len", "512", "--concurrency", "1",
        "--engine-kwargs", '{"kv_cache_memory_bytes": 1000}',
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "kv_cache_memory_bytes" in done.stderr


# -- the command on the real engine ---------------------------------------------------------------


@pytest.mark.slow
def test_measure_demo_model_on_cpu(tmp_path) -> None:
    done = run_cli(
        "measure", "--model", "demo", "--max-model-len", "512", "--concurrency", "2", "--num-prompts", "4",
        "--max-tokens", "32", "--device", "cpu", "--engine-kwargs", '{"enforce_eager": true}',
        "--log-file", str(tmp_path / "vllm.log"), "--output", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["device"] == "cpu" and result["model"] == "demo"
    assert (result["max_model_len"], result["concurrency"], result["num_prompts"]) == (512, 2, 4)
    assert result["completed"] == 4 and result["failed"] == 0
    assert 480 - 10 <= result["prompt_tokens_max"] <= 480
    assert result["kv_cache_bytes"] == 9 * 128 * 512  # 2 × 512 tokens of 512 B, whole blocks
    assert result["weights_bytes"] > 0
    assert result["peak_bytes"] > result["weights_bytes"]
    assert result["peak_bytes"] == max(result["peak_start_bytes"], result["peak_load_bytes"])
    assert result["peak_load_bytes"] > 0 and result["idle_bytes"] > 0
    assert result["vram_gb"] * GIB >= result["peak_bytes"]
    assert result["vram_gb"] * GIB >= result["sizing_floor_bytes"]
    assert result["vram_gb"] % 0.5 == 0
    # a CPU replica runs as the sizing run did (KV cache in bytes): the peak over its budget is that
    # run's, and the overhead covers it with the margin
    assert result["replica_run"] is None
    assert result["peak_over_share_bytes"] == result["peak_bytes"] - round(result["vram_gb"] * GIB)
    assert result["overhead_gb"] == capacity.recommend_overhead_gb(result["peak_over_share_bytes"])
    assert result["overhead_gb"] * GIB >= result["peak_over_share_bytes"] + capacity.MARGIN_GB * GIB
    assert result["reservation_gb"] == pytest.approx(result["vram_gb"] + result["overhead_gb"])
    entry = result["models_entry"]
    spec = ModelSpec(**entry)  # the printed entry is valid configuration
    assert spec.vram_gb == result["vram_gb"] and spec.max_model_len == 512
    assert spec.overhead_gb == result["overhead_gb"]
    assert "models:" in result["snippet"] and f"vram_gb: {result['vram_gb']}" in result["snippet"]
    # the server's log was kept where asked, and its process group is gone
    assert "kv_cache_memory_bytes" in (tmp_path / "vllm.log").read_text()


@pytest.mark.slow
def test_engine_that_fails_to_start_exits_1_with_vllms_own_error(tmp_path) -> None:
    done = run_cli(
        "measure", "--model", "demo", "--max-model-len", "512", "--concurrency", "1", "--device", "cpu",
        "--engine-kwargs", '{"quantization": "awq"}', "--log-file", str(tmp_path / "vllm.log"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "exited with code" in done.stderr and "Cannot find the config file for awq" in done.stderr
    assert "Traceback" not in done.stderr and str(tmp_path / "vllm.log") in done.stderr


def test_the_replica_run_sizes_the_engine_as_a_replica_does(tmp_path) -> None:
    """The second run: vLLM at the replica's share (no KV cache in bytes), an MPS client at the cap."""
    share = size_engine("m", 10 * GIB, "cuda", 80 * GIB, 3 * GIB, capacity.derived_overhead_bytes(3 * GIB))
    assert share.cap_bytes == capacity.cap_bytes(10 * GIB, capacity.derived_overhead_bytes(3 * GIB), 80 * GIB)
    server = EngineServer(
        model_source="/models/m",
        max_model_len=512,
        kv_cache_bytes=None,
        device="cuda",
        log_path=tmp_path / "vllm.log",
        gpu_uuid="GPU-1",
        gpu_memory_utilization=share.gpu_memory_utilization,
        extra_env=client_env("/run/mps", "GPU-1", share.cap_bytes or 0),
    )
    argv = " ".join(server.argv())
    assert "kv-cache-memory-bytes" not in argv and f"{share.gpu_memory_utilization}" in argv
    env = server.env()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1" and env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"GPU-1={(share.cap_bytes or 0) // MIB}M"
