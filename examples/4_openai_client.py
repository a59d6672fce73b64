"""The OpenAI endpoint works with the official `openai` client and LangChain's `ChatOpenAI`.

    python examples/4_openai_client.py [MODEL_ID]

The base URL comes from the serving controller (`resolve_endpoint`); the API key from
$RAY_VRAM_API_KEY when the endpoint requires one.
"""

from __future__ import annotations

import os
import sys

from langchain_openai import ChatOpenAI
from openai import OpenAI

from vram_scheduler import resolve_endpoint


def main(model_id: str = "demo") -> None:
    base_url = resolve_endpoint(model_id)
    api_key = os.environ.get("RAY_VRAM_API_KEY") or "not-needed"
    print("endpoint:", base_url)

    client = OpenAI(base_url=base_url, api_key=api_key)
    print("models:", [m.id for m in client.models.list().data])
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    print("chat:", repr(chat.choices[0].message.content), chat.usage.completion_tokens, "tokens")
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Stream"}], max_tokens=8, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    print("streamed pieces:", len(pieces))
    completion = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8)
    print("completion:", repr(completion.choices[0].text))

    llm = ChatOpenAI(model=model_id, base_url=base_url, api_key=api_key, max_tokens=8)
    reply = llm.invoke("Hello from LangChain")
    print("langchain:", type(reply).__name__, repr(reply.content))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
