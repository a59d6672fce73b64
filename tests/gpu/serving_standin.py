"""A stand-in engine for the replica's GPU path where vLLM cannot be installed (the GPU machine):
the same `VLLMReplica` start-up — reservation, pinning by UUID, startup lock, PyTorch memory cap,
process attachment, release — with a small transformers model instead of vLLM, plus a buffer of
half the budget that stands in for the KV cache vLLM would size from it."""

from __future__ import annotations

import os
from typing import Any

from vram_scheduler.serving.replica import VLLMReplica, node_ip_address
from vram_scheduler.serving.sizing import EngineBudget

KV_SHARE = 0.5


class StandInReplica(VLLMReplica):
    def prepare(self, model_source: str, budget: EngineBudget) -> None:
        self.model_source = model_source

    async def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_source)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_source, dtype=torch.float16).to("cuda")
        self.kv = torch.empty(int(self.budget.budget_bytes * KV_SHARE), dtype=torch.uint8, device="cuda")
        self.engine = self.model

    async def serve_http(self) -> str:
        return f"http://{node_ip_address()}:0"

    async def _heartbeat(self) -> None:  # no router in these tests
        return None

    async def where(self) -> dict[str, Any]:
        import torch

        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_device_uuid": "GPU-" + str(torch.cuda.get_device_properties(0).uuid),
            "torch_reserved_bytes": torch.cuda.memory_reserved(0),
            "budget_bytes": self.budget.budget_bytes,
            "torch_memory_fraction": self.budget.torch_memory_fraction,
        }

    async def generate(self, tokens: int = 8) -> int:
        import torch

        inputs = self.tokenizer("the cat runs", return_tensors="pt").to("cuda")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    async def allocate(self, n_bytes: int) -> str:
        """Try to take `n_bytes` more on the GPU: 'oom' when the budget's cap stops it."""
        import torch

        try:
            block = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError as error:
            return "oom: " + str(error).splitlines()[0][:200]
        del block
        torch.cuda.empty_cache()
        return "allocated"

    async def check_health(self) -> None:
        return None
