"""`ray-vram chat MODEL_ID`: an interactive, streaming chat with a served model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ...core.exit_codes import ExitCode
from ...sdk import endpoints
from ...sdk.inference_errors import EndpointNotFoundError, InferenceError, ModelNotFoundError
from ...sdk.media_inputs import ImageInputError, with_images
from ...sdk.streaming import stream


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a served model (streaming; reads lines from the terminal or stdin)",
        description="Interactive chat: each line you type is sent with the conversation so far and the\n"
        "answer streams back. /reset forgets the conversation, /exit (or Ctrl-D) quits.\n"
        "Vision models: --image PATH (repeatable) goes with your first message; /image PATH goes with\n"
        "the next one. Images travel inside the request (the model may be on another machine).\n\n"
        "exit codes: 0 done, 1 the endpoint failed, 2 unknown model\n\n"
        "examples:\n"
        "  ray-vram chat demo\n"
        "  echo 'hello' | ray-vram chat demo --max-tokens 32\n"
        "  ray-vram chat qwen --system 'Answer in French.' --temperature 0.2\n"
        "  echo 'what is in this picture?' | ray-vram chat vision --image cat.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_id", help="model id (or router name) to talk to")
    parser.add_argument("--system", help="system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="image for the first message (repeatable): a local file, or a data:/file:///http(s):// URL",
    )
    parser.add_argument("--endpoint", help="OpenAI base URL (default: discovered from the controller/Serve)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    try:
        base_url = endpoints.resolve_endpoint(args.model_id, args.endpoint)
        _check_served(args.model_id, base_url)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INVALID
    except InferenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INVALID if isinstance(error, EndpointNotFoundError) and not args.endpoint else ExitCode.FAILURE
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    sampling = {"temperature": args.temperature} if args.temperature is not None else {}
    images: list[str] = list(args.image)
    if interactive:
        print(f"chatting with {args.model_id} at {base_url} — /image PATH, /reset, /exit", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return ExitCode.OK
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return ExitCode.OK
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if text.startswith("/image "):
            images.append(text.removeprefix("/image ").strip())
            continue
        try:
            history += with_images([{"role": "user", "content": text}], images)
        except ImageInputError as error:
            print(f"error: {error}", file=sys.stderr)
            images = []
            if not interactive:
                return ExitCode.INVALID
            continue
        images = []
        answer = []
        try:
            for piece in stream(history, args.model_id, base_url=base_url, max_tokens=args.max_tokens, **sampling):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except InferenceError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return ExitCode.FAILURE
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(answer)})


def _check_served(model_id: str, base_url: str) -> None:
    """Fail before the first prompt when the endpoint does not know the model."""
    import httpx

    headers = endpoints.auth_headers(None)
    try:
        response = httpx.get(f"{base_url}/models", headers=headers, timeout=10)
    except httpx.HTTPError as error:
        raise EndpointNotFoundError(f"cannot reach {base_url}: {error}", model=model_id, url=base_url) from None
    if response.status_code == 200:
        served = [item.get("id") for item in response.json().get("data", [])]
        if model_id not in served:
            raise ModelNotFoundError(
                f"model {model_id!r} is not served at {base_url}; served: {', '.join(served) or 'none'}",
                model=model_id,
                url=base_url,
                status=404,
            )
