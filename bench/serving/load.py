"""Bounded load against an OpenAI-compatible `/v1/completions`: N requests at concurrency C,
non-streaming then streaming (time to first token), same prompts for every stack."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


WORDS = "the cat runs the dog builds a team that serves many requests every day"


def prompt(tag: str, i: int) -> str:
    """A prompt of the shared shape, index first: no shared prefix between requests."""
    return f"{tag}{i} {WORDS}"


def prompts(tag: str, n: int) -> list[str]:
    """Distinct prompts of equal shape."""
    return [prompt(tag, i) for i in range(n)]


@dataclass
class Phase:
    requests: int = 0
    ok: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {
            "requests": self.requests,
            "ok": self.ok,
            "errors": len(self.errors),
            "req_per_s": round(self.ok / self.wall_s, 2) if self.wall_s else None,
            "tok_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else None,
            "p50_ms": _round(percentile(self.latencies_ms, 50)),
            "p99_ms": _round(percentile(self.latencies_ms, 99)),
            "mean_ms": _round(statistics.fmean(self.latencies_ms)) if self.latencies_ms else None,
        }
        if self.ttft_ms:
            out["ttft_p50_ms"] = _round(percentile(self.ttft_ms, 50))
            out["ttft_p99_ms"] = _round(percentile(self.ttft_ms, 99))
        if self.errors:
            out["error_examples"] = self.errors[:3]
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class Outcome:
    """One request: `kind` is "ok" or what went wrong ("http 503", "ReadTimeout", "stream error", ...)."""

    kind: str
    detail: str = ""
    latency_ms: float | None = None
    ttft_ms: float | None = None
    tokens: int = 0


async def request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Outcome:
    """One completion or chat completion, streamed or not; a stream counts only if it ends with
    [DONE] after a first token and carries no error event."""
    started = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post(url, json=body)
            if response.status_code != 200:
                return Outcome(f"http {response.status_code}", f"{response.status_code} {response.text[:200]}")
            tokens = response.json()["usage"]["completion_tokens"]
            return Outcome("ok", latency_ms=(time.perf_counter() - started) * 1000, tokens=tokens)
        first = None
        done = False
        tokens = 0
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread())[:200]
                return Outcome(f"http {response.status_code}", f"{response.status_code} {text!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    return Outcome("stream error", json.dumps(chunk["error"])[:200])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                if first is None and any(_text(c) for c in chunk.get("choices") or []):
                    first = time.perf_counter()
        if not done or first is None:
            return Outcome("incomplete stream", f"incomplete stream (done={done}, first token={first is not None})")
        now = time.perf_counter()
        return Outcome("ok", latency_ms=(now - started) * 1000, ttft_ms=(first - started) * 1000, tokens=tokens)
    except httpx.HTTPError as error:
        return Outcome(type(error).__name__, repr(error)[:200])


def _text(choice: dict[str, Any]) -> str:
    """A streamed choice's new text: `text` (completions) or `delta.content` (chat)."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], phase: Phase) -> None:
    outcome = await request(client, url, body)
    if outcome.kind != "ok":
        phase.errors.append(outcome.detail)
        return
    phase.tokens += outcome.tokens
    if outcome.ttft_ms is not None:
        phase.ttft_ms.append(outcome.ttft_ms)
    phase.latencies_ms.append(outcome.latency_ms or 0.0)
    phase.ok += 1


async def run_phase(base: str, model: str, texts: list[str], concurrency: int, max_tokens: int, stream: bool) -> Phase:
    url = base.rstrip("/") + "/v1/completions"
    phase = Phase(requests=len(texts))
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        for text in texts[:3]:  # warm-up, not measured
            await _one(client, url, request_body(model, text, max_tokens, stream), Phase())

        async def worker() -> None:
            while not queue.empty():
                text = queue.get_nowait()
                await _one(client, url, request_body(model, text, max_tokens, stream), phase)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.wall_s = time.perf_counter() - started
    return phase


def request_body(model: str, text: str, max_tokens: int, stream: bool, chat: bool = False) -> dict[str, Any]:
    """`/v1/completions` body (or `/v1/chat/completions` with `chat`): exactly `max_tokens` tokens."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body
