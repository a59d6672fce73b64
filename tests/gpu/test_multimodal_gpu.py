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
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vram_scheduler.loopback import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RESULTS = Path(os.environ.get("RAY_VRAM_GPU_RESULTS", ROOT / ".work" / "gpu-results"))
GIB = 1024**3
OVERHEAD_GB = 2.0
IMAGE_REQUESTS, IMAGE_CONCURRENCY = 384, 32


def _generated(directory: Path, kind: str) -> Path:
    """A demo model of real size, made in a child process (no CUDA context in this one)."""
    if not (directory / "config.json").exists():
        code = (
            "import sys; from vram_scheduler.demo_model import generate_demo_model as g; "
            "g(sys.argv[1], shape='gpu', kind=sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(directory), kind], check=True)
    return directory


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
    from ray import serve

    from bench.gpu.tools import NVMLSampler, bench_serve, gpus, process_tree, summarize, write_json
    from vram_scheduler.config import parse_config
    from vram_scheduler.serving.app import model_app_name
    from vram_scheduler.serving.local import LocalStack

    text_dir = _generated(Path(os.environ.get("RAY_VRAM_GPU_MODEL") or tmp_path_factory.mktemp("t") / "m"), "text")
    vision_dir = _generated(tmp_path_factory.mktemp("vision") / "model", "vision")
    gpu = gpus()[0]
    budget_gb = math.floor(gpu["total_bytes"] / GIB * 0.1 * 2) / 2  # a tenth of the GPU, in half GiB
    common = {"vram_gb": budget_gb, "max_model_len": 2048, "max_tokens": 64}
    config = parse_config(
        {
            "models": [
                {"model_id": "text", "model": str(text_dir), "replicas": 2, **common},
                {
                    "model_id": "vision",
                    "model": str(vision_dir),
                    "replicas": 1,
                    "media": {"images_per_prompt": 1, "max_item_mb": 4},
                    **common,
                },
            ],
            "placement": {"replica_overhead_gb": OVERHEAD_GB},
            "serving": {"host": "127.0.0.1", "port": free_port(), "max_ongoing_requests": 512},
        }
    )
    local = LocalStack(config, controller_port=free_port())
    with NVMLSampler() as sampler:
        started = time.monotonic()
        try:
            local.start(progress=print)
            local.controller.wait_ready(timeout_s=540)
            ready_s = round(time.monotonic() - started, 1)
            print(f"3 replicas (2 text, 1 vision) of {budget_gb} GiB ready in {ready_s}s", flush=True)
            infos = [
                info
                for model_id in ("text", "vision")
                for info in serve.get_app_handle(model_app_name(model_id)).replica_info.remote().result(timeout_s=60)
            ]
            base = local.controller.endpoint.removesuffix("/v1")
            text_targets = [(i["url"], "text") for i in infos if i["model_id"] == "text"]
            text_load: dict[str, Any] = {}

            def load_text() -> None:
                text_load.update(summarize(bench_serve(text_targets, str(text_dir), "mm-text", 600, 64)))

            loader = threading.Thread(target=load_text)
            loader.start()
            image_load = asyncio.run(_image_load(base, IMAGE_REQUESTS, IMAGE_CONCURRENCY))
            loader.join()
            replicas = []
            for info in infos:
                tree = sorted({p for pid in info["pids"] for p in process_tree(pid)})
                peak = sampler.tree_peak(tree)
                reservation = info["bytes"] + int(OVERHEAD_GB * GIB)
                replicas.append(
                    {
                        "replica_id": info["replica_id"],
                        "gpu_uuid": info["gpu_uuid"],
                        "budget_bytes": info["bytes"],
                        "reservation_bytes": reservation,
                        "nvml_peak_bytes": peak,
                        "peak_minus_budget_gib": round((peak - info["bytes"]) / GIB, 3),
                    }
                )
        finally:
            local.stop()
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
