"""The `pack` stage of the GPU benchmark: models sized by `ray-vram measure` (the `sizes` stage's
results) declared together on one GPU until the last one no longer fits; what a user sees, and each
replica's NVML peak against its reservation under load.

1. `huge` (14B-class Llama, when measured) and `big` (7B class), copies of them as models of their
   own while they fit, then `small` (1.5B Qwen2) and its copies until one does not fit, one replica
   each, each with the `vram_gb` and `overhead_gb` its measurement recommended: the last is pending,
   with the planner's reason in the controller's status and in the router's 503;
2. `vllm bench serve` loads the first two models through the router (one client process per model);
3. `big` is removed through the controller's HTTP API: the controller places the pending model in
   the room that appeared, with no restart;
4. `vllm bench serve` loads the once-pending model and the first model;
5. every replica's NVML peak (its process tree, sampled from before the first engine started)
   against its reservation, and every failed request's kind.

Usage (on the GPU machine, after `sizes` or `session.sh recorded`):
  python -m bench.gpu.run pack [--model-root DIR] [--results DIR]
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .measured_stack import declared_as_measured, measured_stack, replica_infos, replica_peaks
from .tools import bench_serve, summarize, write_json

#: model_id -> the `sizes` stage's model it is
ROLES = {"huge": "llama-14b", "big": "llama-7b", "small": "qwen2-1.5b"}
MAX_MODEL_LEN = 4096
PROMPTS, CONCURRENCY = 320, 64


#: Set: every engine runs without CUDA graphs (starts in seconds, not minutes; peaks a little lower
#: than the measured sizes assumed), for a device session too short for CUDA-graph starts.
EAGER_ENV = "RAY_VRAM_BENCH_PACK_EAGER"


def _declared(model_id: str, size: str, root: Path, results: Path) -> dict[str, Any]:
    declared = declared_as_measured(model_id, size, root, results, MAX_MODEL_LEN)
    if os.environ.get(EAGER_ENV):
        declared["engine_kwargs"] = {"enforce_eager": True}
    return declared


def declared_models(root: Path, results: Path, gpu_total_gib: float) -> list[dict[str, Any]]:
    """The models as a user declares them after measuring each (the recommended sizes): `huge` (when
    the 14B class was measured) and `big`, then more copies of them as models of their own (the
    planner places one replica of every model before any second one) while they fit the GPU, then
    `small` and its copies until one no longer fits: that last one is pending."""
    large = [_declared("big", ROLES["big"], root, results)]
    if (results / f"sizes-{ROLES['huge']}.json").exists():
        large.insert(0, _declared("huge", ROLES["huge"], root, results))
    small = _declared("small", ROLES["small"], root, results)

    def need(model: dict[str, Any]) -> float:
        return model["vram_gb"] + model["overhead_gb"]

    room = gpu_total_gib - 0.5  # what ray-vram does not manage (the MPS server, the CUDA driver)
    declared, used = list(large), sum(need(m) for m in large)
    for copy in range(2, 6):
        extra = large[copy % len(large)]
        extra = extra | {"model_id": f"{extra['model_id']}-{copy}"}
        if used + need(extra) > room:
            break
        declared.append(extra)
        used += need(extra)
    for copy in range(1, 20):
        extra = small if copy == 1 else small | {"model_id": f"small-{copy}"}
        declared.append(extra)
        used += need(extra)
        if used > room:
            break
    return declared


def _load(base_url: str, targets: list[tuple[str, str]], tag: str) -> dict[str, Any]:
    """One `vllm bench serve` client per (model, tokenizer), all at once, through the router at `base_url`
    (without /v1: the bench adds its endpoint path)."""
    out: dict[str, Any] = {}

    def one(model_id: str, tokenizer: str) -> None:
        results = bench_serve([(base_url, model_id)], tokenizer, f"{tag}-{model_id}", PROMPTS, CONCURRENCY)
        out[model_id] = summarize(results)

    threads = [threading.Thread(target=one, args=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for model_id, summary in out.items():
        print(f"pack: {tag}: {model_id}: {json.dumps({k: v for k, v in summary.items() if k != 'clients'})}")
    return out


def _request(method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _status(local: Any) -> dict[str, Any]:
    return {model["model_id"]: model for model in local.controller.status().model_dump(mode="json")["models"]}


def models_placed(status: dict[str, Any]) -> list[str]:
    """The models with a ready replica (a pending model has no Serve replica to ask)."""
    return [model_id for model_id, model in status.items() if any(r["state"] == "ready" for r in model["replicas"])]


def run_pack(root: Path, results: Path) -> dict[str, Any]:

    from vram_scheduler.sdk.token import auth_headers

    from .sizes import ensure_model
    from .tools import gpus

    for size in ROLES.values():  # the measured sizes' models, made first on a fresh machine
        if (results / f"sizes-{size}.json").exists():
            ensure_model(size, root)
    models = declared_models(root, results, gpus()[0]["total_bytes"] / 2**30)
    print(f"pack: declaring {json.dumps(models)}", flush=True)
    outcome: dict[str, Any] = {"models": models, "eager": bool(os.environ.get(EAGER_ENV))}
    with measured_stack(models, None, ready_timeout_s=float(os.environ.get("RAY_VRAM_BENCH_READY_S", "540"))) as stack:
        local = stack.local
        outcome["ready_s"] = stack.ready_s
        before = _status(local)
        pending_id = models[-1]["model_id"]
        small = before[pending_id]
        outcome["pending_before"] = {
            "replicas": small["replicas"],
            "unplaced": small["unplaced"],
            "resolved": {m: before[m].get("resolved") for m in before},
        }
        print(f"pack: {pending_id} before removal: {json.dumps(outcome['pending_before'])}", flush=True)
        chat = json.dumps({"model": pending_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        code, text = _request(
            "POST", stack.router_base + "/v1/chat/completions", {"content-type": "application/json"}, chat.encode()
        )
        outcome["router_before"] = {"status": code, "body": text[:2000]}
        print(f"pack: router for {pending_id} before removal: {code} {text[:600]}", flush=True)
        write_json(results / "pack.json", outcome)  # each phase as it ends: a cut-off run keeps its data

        outcome["load_before"] = _load(
            stack.router_base,
            [(m["model_id"], m["model"]) for m in models[:2]],
            "pack-a",
        )
        big_rows = replica_peaks(stack.sampler, replica_infos(["big"]))  # before its processes end
        outcome["replicas"] = [*replica_peaks(stack.sampler, replica_infos(models_placed(before)))]
        write_json(results / "pack.json", outcome)

        controller = f"http://127.0.0.1:{local.controller_port}"
        removed = time.monotonic()
        code, text = _request("DELETE", controller + "/v1/deployments/big", auth_headers())
        outcome["remove_big"] = {"status": code, "body": text[:1000]}
        print(f"pack: DELETE /v1/deployments/big: {code} {text[:300]}", flush=True)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            replicas = _status(local)[pending_id]["replicas"]
            if replicas and all(r["state"] == "ready" for r in replicas):
                break
            time.sleep(2)
        after = _status(local)
        outcome["small_ready_after_removal_s"] = round(time.monotonic() - removed, 1)
        outcome["small_after"] = {"replicas": after[pending_id]["replicas"], "events": after[pending_id].get("events")}
        waited = outcome["small_ready_after_removal_s"]
        print(f"pack: {pending_id} after removal ({waited}s): {json.dumps(outcome['small_after'])}", flush=True)
        write_json(results / "pack.json", outcome)

        outcome["load_after"] = _load(
            stack.router_base,
            [(pending_id, models[-1]["model"]), (models[0]["model_id"], models[0]["model"])],
            "pack-b",
        )
        serving = [m["model_id"] for m in models if m["model_id"] != "big"]
        rows = [*replica_peaks(stack.sampler, replica_infos(serving)), *big_rows]
        outcome["replicas"] = rows
        outcome["vram"] = local.controller.allocator.vram_state().model_dump(mode="json")
    for row in rows:
        print(
            f"pack: {row['replica_id']}: peak {row['nvml_peak_bytes'] / 2**30:.2f} GiB, reservation "
            f"{row['reservation_bytes'] / 2**30:.2f} GiB ({row['peak_minus_reservation_gib']:+.3f}), "
            f"over budget {row['peak_minus_budget_gib']:+.3f} GiB: {row['verdict']}"
        )
    return outcome
