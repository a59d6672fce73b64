"""A vision-language model packed beside text models on one real GPU, each inside its reservation
(run on the GPU machine, CUDA vLLM).

One local stack on GPU 0: 2 replicas of the text demo model of real size and 1 replica of the
vision demo model (`ray-vram demo-model --kind vision --shape gpu`: an Idefics3 with a 12-layer
image encoder and 512-pixel tiles), each with the same budget. While `vllm bench serve` loads the
text replicas, a client sends chat completions with a distinct image each (so vLLM's processor
cache never spares the encoder) through the router. An NVML sampler runs from before the first
replica starts: every replica's process tree must peak at or under its reservation.

Results (JSON) go to $RAY_VRAM_GPU_RESULTS/multimodal.json.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("RAY_VRAM_GPU_RESULTS", ROOT / ".work" / "gpu-results"))
OVERHEAD_GB = 2.0
IMAGE_REQUESTS, IMAGE_CONCURRENCY = 384, 32


def _png(seed: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (512, 512), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    image.putpixel((seed % 512, (seed // 512) % 512), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def _image_load(base: str, n: int, concurrency: int) -> dict[str, Any]:
    import httpx

    outcomes: list[tuple[int, float]] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        url = "data:image/png;base64," + base64.b64encode(_png(i)).decode()
        body = {
            "model": "vision",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Describe picture {i}."},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            "max_tokens": 64,
            "ignore_eos": True,
        }
        async with gate:
            start = time.monotonic()
            try:
                response = await client.post(base + "/v1/chat/completions", json=body)
                outcomes.append((response.status_code, time.monotonic() - start))
            except httpx.HTTPError:
                outcomes.append((0, time.monotonic() - start))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    wall = time.monotonic() - started
    latencies = sorted(s for code, s in outcomes if code == 200)
    return {
        "requests": n,
        "ok": len(latencies),
        "failed": n - len(latencies),
        "statuses": sorted({code for code, _ in outcomes}),
        "req_per_s": round(len(latencies) / wall, 1),
        "median_latency_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
    }


def test_a_vision_model_packed_beside_text_models_stays_inside_its_reservation(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from bench.gpu.measured_stack import (
        generated_model,
        measured_stack,
        replica_budget_gb,
        replica_infos,
        replica_peaks,
    )
    from bench.gpu.tools import bench_serve, gpus, summarize, write_json

    text_dir = generated_model(Path(os.environ.get("RAY_VRAM_GPU_MODEL") or tmp_path_factory.mktemp("t") / "m"))
    vision_dir = generated_model(tmp_path_factory.mktemp("vision") / "model", "vision")
    gpu = gpus()[0]
    budget_gb = replica_budget_gb(gpu["total_bytes"])
    common = {"vram_gb": budget_gb, "max_model_len": 2048, "max_tokens": 64}
    models = [
        {"model_id": "text", "model": str(text_dir), "replicas": 2, **common},
        {
            "model_id": "vision",
            "model": str(vision_dir),
            "replicas": 1,
            "media": {"images_per_prompt": 1, "max_item_mb": 4},
            **common,
        },
    ]
    with measured_stack(models, OVERHEAD_GB) as stack:
        ready_s = stack.ready_s
        print(f"3 replicas (2 text, 1 vision) of {budget_gb} GiB ready in {ready_s}s", flush=True)
        infos = replica_infos(["text", "vision"])
        text_targets = [(i["url"], "text") for i in infos if i["model_id"] == "text"]
        text_load: dict[str, Any] = {}

        def load_text() -> None:
            text_load.update(summarize(bench_serve(text_targets, str(text_dir), "mm-text", 600, 64)))

        loader = threading.Thread(target=load_text)
        loader.start()
        image_load = asyncio.run(_image_load(stack.router_base, IMAGE_REQUESTS, IMAGE_CONCURRENCY))
        loader.join()
        replicas = replica_peaks(stack.sampler, infos, OVERHEAD_GB)
    result = {
        "gpu": gpu,
        "budget_gb": budget_gb,
        "overhead_gb": OVERHEAD_GB,
        "ready_s": ready_s,
        "text_load": text_load,
        "image_load": image_load,
        "replicas": replicas,
    }
    write_json(RESULTS / "multimodal.json", result)
    print("GPU-MULTIMODAL-RESULT", {k: v for k, v in result.items() if k not in ("gpu", "text_load")})
    print("text load", {k: v for k, v in text_load.items() if k != "clients"})
    assert image_load["failed"] == 0, image_load
    assert text_load["failed"] == 0
    over = [r for r in replicas if r["nvml_peak_bytes"] > r["reservation_bytes"]]
    assert not over, f"replicas over their reservation: {over}"
