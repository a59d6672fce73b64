"""A test double of an OpenAI-compatible engine: a real HTTP server on 127.0.0.1 that answers chat
completions (not streamed) with a fixed text, for tests whose subject is the client side of the
HTTP exchange (the SDK's retries behind `stack.BusyFront`), never the engine.

It generates nothing: everything about what an engine answers is tested against real vLLM (the
session's local stack, tests/conftest.py `local_stack`). Requests for another model get vLLM's 404.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any

#: What every answer says.
TEXT = "fake engine answer"


class FakeOpenAIEngine:
    """Serves `model` at `url` (ending in /v1) until the `with` block ends; counts the requests."""

    def __init__(self, model: str):
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                with engine._lock:
                    engine.requests.append(request)
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})
                    return
                if request.get("model") != engine.model:
                    message = f"The model `{request.get('model')}` does not exist."
                    self._send(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                    return
                if request.get("stream"):
                    self._send(400, {"error": {"message": "the fake engine does not stream", "code": 400}})
                    return
                self._send(200, engine.completion())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-engine", daemon=True)

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": "fake-0", "object": kind, "created": int(time.time()), "model": self.model, "choices": choices}

    def completion(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": TEXT}
        answer = self.envelope("chat.completion", [{"index": 0, "message": message, "finish_reason": "stop"}])
        return answer | {"usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}

    def __enter__(self) -> FakeOpenAIEngine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
