"""vLLM's sleep and wake as a replica drives them (`vllm_compat.engine_sleep` / `engine_wake`), on a
real GPU with CUDA vLLM (run on the GPU machine).

One engine (`AsyncLLM`, `enable_sleep_mode`) of the random-weight Qwen2 of real size. Greedy tokens
for one prompt are taken awake, then after a level-1 sleep and wake, then after a level-2 sleep and
wake: all three must be the same. Level 2 drops the weights, and vLLM's `wake_up` gives their memory
back uninitialised; `engine_wake` reads them again from the model's files, so a wrong or missing
reload shows as different tokens. Asleep, the engine must hold a small part of what it held awake.
The numbers go to $RAY_VRAM_GPU_RESULTS/sleep-levels.json.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("RAY_VRAM_GPU_RESULTS", ROOT / ".work" / "gpu-results"))
GIB = 1024**3
PROMPT = "The capital of a country is a city where"


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight model of real size, made in a child process (no CUDA context here)."""
    from bench.gpu.measured_stack import generated_model

    return generated_model(Path(os.environ.get("RAY_VRAM_GPU_MODEL") or tmp_path_factory.mktemp("gpu") / "model"))


def gpu_used_bytes() -> int:
    """What NVML counts in use on GPU 0 (the engine is the only process on it in this test)."""
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)


async def greedy_tokens(engine: Any) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    final = None
    async for output in engine.generate(PROMPT, params, request_id=uuid.uuid4().hex):
        final = output
    assert final is not None
    return list(final.outputs[0].token_ids)


async def sleep_and_wake(gpu_model: Path) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vram_scheduler.serving.replica.vllm_compat import engine_sleep, engine_wake

    args = AsyncEngineArgs(
        model=str(gpu_model),
        enable_sleep_mode=True,
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        enforce_eager=True,
    )
    engine = AsyncLLM.from_engine_args(args)
    try:
        awake_tokens = await greedy_tokens(engine)
        record: dict[str, Any] = {"model": str(gpu_model), "awake_gib": round(gpu_used_bytes() / GIB, 2), "levels": {}}
        for level in (1, 2):
            started = time.monotonic()
            await engine_sleep(engine, level)
            slept_s = time.monotonic() - started
            asleep = gpu_used_bytes()
            started = time.monotonic()
            await engine_wake(engine, level)
            woke_s = time.monotonic() - started
            tokens = await greedy_tokens(engine)
            record["levels"][str(level)] = {
                "asleep_gib": round(asleep / GIB, 2),
                "sleep_s": round(slept_s, 3),
                "wake_s": round(woke_s, 3),
                "same_tokens": tokens == awake_tokens,
                "tokens": tokens,
            }
        record["awake_tokens"] = awake_tokens
        return record
    finally:
        engine.shutdown()


def test_woken_engines_give_the_same_tokens_and_sleep_small(gpu_model: Path) -> None:
    from bench.gpu.tools import write_json

    record = asyncio.run(sleep_and_wake(gpu_model))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "sleep-levels.json", record)
    print(record)
    for level, seen in record["levels"].items():
        assert seen["same_tokens"], f"level {level}: {seen['tokens']} != {record['awake_tokens']}"
        assert seen["asleep_gib"] < record["awake_gib"] / 2, (level, seen, record["awake_gib"])
