"""Soak client process: a few concurrent streams of requests against the OpenAI endpoint until a
stop file appears, one JSON line per request (what the soak counts; nothing is kept in memory).

Each stream sends to one model and cycles through the four request shapes (completion, streamed
completion, chat, streamed chat), so every stream exercises both the JSON and the SSE path.

Usage: python -m bench.soak.client BASE OUT STOP --models alpha,beta --streams 4 --first 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import IO, Any

import httpx

from bench.serving.load import Outcome, prompt, request, request_body

#: (api, stream) in the order a stream cycles through them.
SHAPES = (("completions", False), ("completions", True), ("chat", False), ("chat", True))
#: A request slower than this counts as failed; generous: a 2-core machine shared with other vLLM
#: runs answers a 16-token request in well under a second when idle, in tens of seconds when not.
TIMEOUT_S = 300


def record(model: str, api: str, stream: bool, start: float, outcome: Outcome) -> dict[str, Any]:
    """The JSON line written for one request (times are wall-clock seconds)."""
    line: dict[str, Any] = {"model": model, "api": api, "stream": stream, "start": round(start, 3)}
    line |= {"end": round(time.time(), 3), "kind": outcome.kind}
    if outcome.kind == "ok":
        line["latency_ms"] = round(outcome.latency_ms or 0.0, 1)
        if outcome.ttft_ms is not None:
            line["ttft_ms"] = round(outcome.ttft_ms, 1)
    else:
        line["detail"] = outcome.detail
    return line


async def send(client: httpx.AsyncClient, base: str, model: str, shape: int, tag: str, max_tokens: int) -> dict:
    """One request of shape `shape % 4` to `model`; returns its record."""
    api, stream = SHAPES[shape % len(SHAPES)]
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    body = request_body(model, prompt(tag, shape), max_tokens, stream, chat=api == "chat")
    start = time.time()
    outcome = await request(client, base.rstrip("/") + path, body)
    return record(model, api, stream, start, outcome)


async def stream_loop(
    client: httpx.AsyncClient, base: str, model: str, index: int, stop: Path, out: IO[str], max_tokens: int
) -> None:
    """Stream `index`: requests to `model` one after another until `stop` exists."""
    sent = index  # streams start on different shapes
    while not stop.exists():
        line = await send(client, base, model, sent, f"s{index}-", max_tokens)
        out.write(json.dumps(line) + "\n")
        out.flush()
        sent += 1
        if line["kind"] != "ok":
            await asyncio.sleep(0.2)  # a failing endpoint is not hammered


async def burst(base: str, model: str, n: int, max_tokens: int) -> list[dict]:
    """`n` requests to `model`, one at a time, every shape in turn (the added model's check)."""
    async with httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False) as client:
        return [await send(client, base, model, i, "extra-", max_tokens) for i in range(n)]


async def run(base: str, out: Path, stop: Path, models: list[str], streams: int, first: int, max_tokens: int) -> None:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits, trust_env=False) as client:
        with out.open("a") as sink:
            indices = range(first, first + streams)
            await asyncio.gather(
                *(stream_loop(client, base, models[i % len(models)], i, stop, sink, max_tokens) for i in indices)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="OpenAI endpoint without /v1, e.g. http://127.0.0.1:8000")
    parser.add_argument("out", type=Path, help="JSON lines file (appended)")
    parser.add_argument("stop", type=Path, help="the streams end when this file exists")
    parser.add_argument("--models", required=True, help="comma-separated; stream i sends to models[i %% len]")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first stream")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT ends a client quietly
        asyncio.run(
            run(args.base, args.out, args.stop, args.models.split(","), args.streams, args.first, args.max_tokens)
        )


if __name__ == "__main__":
    main()
