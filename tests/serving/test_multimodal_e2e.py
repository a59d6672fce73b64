"""Vision and audio end to end with real vLLM (CPU backend): one stack serving the generated
vision-language model (Idefics3), the speech-to-text model (Whisper) and the text demo model, each
through the router, the official `openai` client, the SDK and `ray-vram chat`; bad images and audio
get a 4xx naming model and limit, and no replica restarts. Answers come from random weights: the
tests check structure, never text.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import docblocks
import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from pydantic import BaseModel
from ray import serve

import vram_scheduler as sdk
from vram_scheduler.monitor.readers import private_memory_bytes
from vram_scheduler.sdk import transcription
from vram_scheduler.serving.app import model_app_name
from vram_scheduler.serving.router.router import replicas_board

from .conftest import ENGINE_KWARGS, Stack, running_stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MEDIA = {"images_per_prompt": 2, "max_item_mb": 1, "max_image_pixels": 1_000_000, "processor_cache_gb": 0.05}
AUDIO_ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}


def spec(model_id: str, model: str, vram_gb: float, **extra: Any) -> dict[str, Any]:
    return {"model_id": model_id, "model": model, "vram_gb": vram_gb, "max_tokens": 8, **extra}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vision model's `media.local_media_dir`, with a good, a huge and a broken image."""
    directory = tmp_path_factory.mktemp("media")
    Image.new("RGB", (90, 60), (0, 128, 255)).save(directory / "small.png")
    Image.new("RGB", (1200, 1000), (0, 0, 0)).save(directory / "huge.png")
    (directory / "broken.png").write_bytes(png(40, 40)[:30])
    return directory


@pytest.fixture(scope="module")
def stack(media_dir: Path) -> Iterator[Stack]:
    models = [
        spec("text", "demo", 1.5, max_model_len=512, engine_kwargs=ENGINE_KWARGS),
        spec(
            "vision",
            "demo-vision",
            1.75,
            max_model_len=512,
            engine_kwargs=ENGINE_KWARGS,
            media=MEDIA | {"local_media_dir": str(media_dir)},
        ),
        # `whisper`: the name docs/multimodal.md sends to, as values/multimodal.yaml calls the model.
        spec("speech", "demo-audio", 1.75, engine_kwargs=AUDIO_ENGINE_KWARGS, media=MEDIA, router_name="whisper"),
    ]
    with running_stack(models) as started:
        yield started


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A tone as 16-bit mono WAV."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).tobytes())
    return buffer.getvalue()


def chat_body(model: str, urls: list[str], text: str = "What is in the picture?") -> dict[str, Any]:
    content = [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def post(stack: Stack, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack.base + "/v1/chat/completions", json=body, timeout=120)


def upload(stack: Stack, model: str, data: bytes, filename: str = "tone.wav") -> httpx.Response:
    files = {"file": (filename, data, "audio/wav")}
    return httpx.post(stack.base + "/v1/audio/transcriptions", data={"model": model}, files=files, timeout=120)


def replica_pids() -> dict[str, list[int]]:
    out = {}
    for model_id in ("text", "vision", "speech"):
        infos = serve.get_app_handle(model_app_name(model_id)).replica_info.remote().result(timeout_s=60)
        out |= {info["replica_id"]: info["pids"] for info in infos}
    return out


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]


# -- what the replicas announce ----------------------------------------------------------------------


def announced() -> list[dict[str, Any]]:
    """Every replica's announcement, as the endpoint board holds it for the routers."""
    import ray

    return ray.get(replicas_board().table.remote(), timeout=60)["endpoints"]


def test_replicas_announce_what_their_models_take(stack: Stack) -> None:
    endpoints = {e["model_id"]: e for e in announced()}
    assert endpoints["vision"]["media"]["items_per_prompt"] == {"image": 2}
    assert "generate" in endpoints["vision"]["tasks"]
    assert endpoints["speech"]["media"]["items_per_prompt"] == {"audio": 1}
    assert "transcription" in endpoints["speech"]["tasks"] and "generate" not in endpoints["speech"]["tasks"]
    assert endpoints["text"]["media"]["items_per_prompt"] == {}
    assert endpoints["vision"]["media"]["local_media_dir"] and endpoints["vision"]["media"]["media_domains"] == []


# -- vision ------------------------------------------------------------------------------------------


def test_openai_client_sends_an_image(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base + "/v1", api_key="unused")
    messages: Any = chat_body("vision", [data_url(png(200, 120))])["messages"]
    answer = client.chat.completions.create(model="vision", messages=messages, max_tokens=6)
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].finish_reason in {"length", "stop"}
    text_only = client.chat.completions.create(
        model="vision", messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=6
    )
    assert answer.usage is not None and text_only.usage is not None
    # The image became tokens of the prompt: a 200×120 image is 2×2 tiles plus the global view.
    assert answer.usage.prompt_tokens > text_only.usage.prompt_tokens + 10
    # Images are scaled to 128 pixels on their long side and cut into 64-pixel tiles: a square one
    # makes 2×2 tiles, a wide strip 2×1.
    square = client.chat.completions.create(
        model="vision", messages=chat_body("vision", [data_url(png(128, 128))])["messages"], max_tokens=2
    )
    strip = client.chat.completions.create(
        model="vision", messages=chat_body("vision", [data_url(png(256, 32))])["messages"], max_tokens=2
    )
    assert square.usage is not None and strip.usage is not None
    assert square.usage.prompt_tokens > strip.usage.prompt_tokens


def test_the_docs_examples_run_as_written(stack: Stack, media_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/multimodal.md's requests (the blocks marked as run here), as written, in reading order:
    shell blocks with bash, Python blocks as notebook cells, in the vision model's media directory
    (so its `file://` example is inside `media.local_media_dir`), the endpoint in $RAY_VRAM_ENDPOINT."""
    monkeypatch.chdir(media_dir)
    monkeypatch.setenv("RAY_VRAM_ENDPOINT", stack.base + "/v1")
    sdk.forget_endpoints()
    # `python` and `ray-vram` as the docs' shell blocks call them: this environment's.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    blocks = docblocks.tested_by(__file__)
    assert {b.lang for b in blocks} == {"bash", "python"}, [b.where for b in blocks]
    for block in blocks:
        if block.lang == "python":
            docblocks.run_python(block.code, {})
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=media_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0 and done.stdout.strip(), f"{block.where}: {done.stderr[-3000:]}"
        if done.stdout.startswith("{"):
            answer = json.loads(done.stdout)
            assert "error" not in answer and ("choices" in answer or "text" in answer), f"{block.where}: {answer}"


def test_example_request_and_response_of_each_kind(stack: Stack) -> None:
    """The request and answer docs/multimodal.md shows, as sent and as answered (printed with -s)."""
    body = chat_body("vision", [data_url(png(64, 48))]) | {"max_tokens": 8}
    response = post(stack, body)
    assert response.status_code == 200, response.text
    shown = json.loads(json.dumps(body))
    url = shown["messages"][0]["content"][1]["image_url"]["url"]
    shown["messages"][0]["content"][1]["image_url"]["url"] = url[:40] + f"...({len(url)} chars)"
    print("\nVISION REQUEST", json.dumps(shown), "\nVISION RESPONSE", response.text)
    response = httpx.post(
        stack.base + "/v1/audio/transcriptions",
        data={"model": "speech", "language": "en"},
        files={"file": ("tone.wav", wav(), "audio/wav")},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)
    print("AUDIO REQUEST multipart: model=speech language=en file=tone.wav", "\nAUDIO RESPONSE", response.text)


def test_images_from_paths_bytes_pil_and_urls_through_the_sdk(stack: Stack, media_dir: Path) -> None:
    endpoint = stack.base + "/v1"
    picture = Image.new("RGB", (100, 80), (10, 200, 10))
    inputs: list[Any] = [
        media_dir / "small.png",  # a local path: sent as a data URL
        str(media_dir / "small.png"),
        png(50, 50),  # bytes
        picture,  # a PIL image
        data_url(png(70, 30)),  # a data URL
        f"file://{media_dir / 'small.png'}",  # a file on the model's node, inside its media directory
    ]
    for image in inputs:
        answer = sdk.inference("Describe it.", "vision", images=[image], base_url=endpoint, max_tokens=4)
        assert isinstance(answer, str), image
    two = sdk.inference("Compare them.", "vision", images=[picture, png(30, 30)], base_url=endpoint, max_tokens=4)
    assert isinstance(two, str)


def test_batch_async_and_structured_output_with_images(stack: Stack) -> None:
    endpoint = stack.base + "/v1"

    class Caption(BaseModel):  # closed choices: random weights finish the JSON within max_tokens
        color: Literal["red", "green", "blue"]
        round: bool

    answers = sdk.inference_batch(
        ["first?", "second?", "no image"],
        "vision",
        images=[[png(40, 40)], [png(60, 20), png(20, 60)], None],
        base_url=endpoint,
        max_tokens=4,
    )
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)

    async def both() -> list[Any]:
        return await asyncio.gather(
            sdk.a_inference("one", "vision", images=[png(30, 30)], base_url=endpoint, max_tokens=4),
            sdk.a_inference(
                "caption it", "vision", structured_output=Caption, images=[png(9, 9)], base_url=endpoint, max_tokens=64
            ),
        )

    text, caption = asyncio.run(both())
    assert isinstance(text, str)
    assert isinstance(caption, Caption)  # grammar-constrained JSON, parsed and validated
    streamed = "".join(sdk.stream("and now?", "vision", images=[png(30, 30)], base_url=endpoint, max_tokens=4))
    assert isinstance(streamed, str)
    with pytest.raises(ValueError, match="one entry per prompt"):
        sdk.inference_batch(["a", "b"], "vision", images=[[png(4, 4)]], base_url=endpoint)


def test_chat_command_sends_an_image(stack: Stack, media_dir: Path) -> None:
    command = [sys.executable, "-m", "vram_scheduler.cli", "chat", "vision", "--endpoint", stack.base]
    command += ["--image", str(media_dir / "small.png"), "--max-tokens", "4"]
    lines = f"what is this?\n/image {media_dir / 'small.png'}\nand this one?\n/exit\n"
    result = subprocess.run(
        command, input=lines, capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2  # two answers, each ended by a newline (more if an answer has some)
    refused = subprocess.run(
        [*command[:4], "text", *command[5:]],
        input="what is this?\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=os.environ,
        check=False,
    )
    assert refused.returncode == 1 and "does not take image input" in refused.stderr


def test_bad_images_get_a_4xx_and_no_replica_restarts(stack: Stack, media_dir: Path) -> None:
    before = replica_pids()
    ok = data_url(png(90, 60))
    assert_refused(post(stack, chat_body("text", [ok])), 400, "`text` does not take image input", "text only")
    assert_refused(post(stack, chat_body("vision", [ok] * 3)), 400, "at most 2 image(s)", "1 too many")
    too_many_bytes = data_url(os.urandom(2 * 2**20))
    assert_refused(post(stack, chat_body("vision", [too_many_bytes])), 413, "over the 1.00 MiB limit", "max_item_mb")
    huge = data_url(png(1200, 1000))
    assert_refused(post(stack, chat_body("vision", [huge])), 413, "1200×1000", "1,000,000-pixel limit", "by 200,000")
    corrupt = data_url(png(40, 40)[:30])
    assert_refused(post(stack, chat_body("vision", [corrupt])), 400, "not an image that can be read")
    not_an_image = data_url(b"plain text, not an image at all")
    assert_refused(post(stack, chat_body("vision", [not_an_image])), 400, "not an image that can be read")
    assert_refused(post(stack, chat_body("vision", ["file:///etc/passwd"])), 400, "outside", str(media_dir))
    escape = f"file://{media_dir}/../../../etc/passwd"
    assert_refused(post(stack, chat_body("vision", [escape])), 400, "outside")
    assert_refused(post(stack, chat_body("vision", ["https://example.com/cat.png"])), 400, "does not download")
    # Files on the replica's node are checked there.
    huge_file = f"file://{media_dir / 'huge.png'}"
    assert_refused(post(stack, chat_body("vision", [huge_file])), 413, "1200×1000", "max_image_pixels")
    broken_file = f"file://{media_dir / 'broken.png'}"
    assert_refused(post(stack, chat_body("vision", [broken_file])), 400, "not an image that can be read")
    missing = f"file://{media_dir / 'missing.png'}"
    assert_refused(post(stack, chat_body("vision", [missing])), 400, "is not a readable file")
    # The SDK raises the router's words.
    with pytest.raises(sdk.InvalidRequestError, match="does not take image input") as raised:
        sdk.inference("hi", "text", images=[png(10, 10)], base_url=stack.base + "/v1")
    assert raised.value.status == 400
    with pytest.raises(sdk.InvalidRequestError, match="max_image_pixels"):
        sdk.inference("hi", "vision", images=[png(1200, 1000)], base_url=stack.base + "/v1")
    # Still the same processes, still answering.
    assert replica_pids() == before
    assert post(stack, chat_body("vision", [ok]) | {"max_tokens": 2}).status_code == 200
    assert all(r.state == "ready" for m in stack.controller.status().models for r in m.replicas)


# -- audio -------------------------------------------------------------------------------------------


def test_openai_client_transcribes_an_audio_file(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.base + "/v1", api_key="unused")
    transcript = client.audio.transcriptions.create(model="speech", file=("tone.wav", wav(), "audio/wav"))
    assert isinstance(transcript.text, str)
    verbose = client.audio.transcriptions.create(
        model="speech", file=("tone.wav", wav(2.0), "audio/wav"), response_format="verbose_json", language="en"
    )
    assert verbose.duration == pytest.approx(2.0) and verbose.language == "en" and isinstance(verbose.text, str)
    # Other sample rates are resampled to Whisper's 16 kHz.
    resampled = client.audio.transcriptions.create(model="speech", file=("tone.wav", wav(1.0, 44100), "audio/wav"))
    assert isinstance(resampled.text, str)


def test_sdk_transcribes_paths_bytes_and_files(stack: Stack, tmp_path: Path) -> None:
    endpoint = stack.base + "/v1"
    path = tmp_path / "tone.wav"
    path.write_bytes(wav())
    assert isinstance(transcription.transcribe(path, "speech", base_url=endpoint), str)
    assert isinstance(transcription.transcribe(wav(), "speech", base_url=endpoint, language="en"), str)
    with path.open("rb") as file:
        assert isinstance(transcription.transcribe(file, "speech", base_url=endpoint), str)
    verbose = transcription.transcribe(str(path), "speech", base_url=endpoint, response_format="verbose_json")
    assert set(verbose) >= {"text", "duration", "language"}

    async def three() -> list[Any]:
        return await asyncio.gather(*(transcription.a_transcribe(wav(), "speech", base_url=endpoint) for _ in range(3)))

    texts = asyncio.run(three())
    assert all(isinstance(text, str) for text in texts)


def test_bad_audio_gets_a_4xx_and_no_replica_restarts(stack: Stack) -> None:
    before = replica_pids()
    assert_refused(upload(stack, "text", wav()), 400, "`text` does not serve audio transcriptions")
    assert_refused(upload(stack, "vision", wav()), 400, "`vision` does not serve audio transcriptions")
    assert_refused(upload(stack, "speech", png(8, 8), "picture.png"), 415, "not an audio format", "wav, flac")
    assert_refused(upload(stack, "speech", os.urandom(64)), 415, "not an audio format")
    assert_refused(upload(stack, "speech", wav(40.0)), 413, "over the 1.00 MiB limit", "by ")
    damaged = wav()[:44] + b"\x00\x01" * 3 + b"RIFF"  # a WAV header and almost nothing after it
    assert upload(stack, "speech", b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk").status_code == 400  # vLLM: unreadable
    assert upload(stack, "speech", damaged).status_code in {200, 400}  # decodable or not, never a crash
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav()).decode(), "format": "wav"}}
    body = {"model": "vision", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio_part]}]}
    assert_refused(post(stack, body), 400, "`vision` does not take audio input", "up to 2 image(s)")
    with pytest.raises(sdk.InvalidRequestError, match="not an audio format") as raised:
        transcription.transcribe(b"definitely not audio", "speech", base_url=stack.base + "/v1")
    assert raised.value.status == 415
    assert replica_pids() == before
    assert upload(stack, "speech", wav()).status_code == 200


# -- budgets -----------------------------------------------------------------------------------------


def test_multimodal_replicas_stay_inside_their_budgets(stack: Stack) -> None:
    """What the host-memory monitor counts for each replica, after the requests above, against its
    budget (and how much more a vision or speech replica holds than a text one)."""
    used = {}
    for replica_id, pids in replica_pids().items():
        used[replica_id] = sum(private_memory_bytes(pid) or 0 for pid in pids)
    budgets = {e["replica_id"]: e["bytes"] for e in announced()}
    print("\nREPLICA MEMORY", {r: f"{b / 2**30:.2f} of {budgets[r] / 2**30:.2f} GiB" for r, b in used.items()})
    print("MEDIA EXTRA", {r: f"{(b - used['text-0']) / 2**20:.0f} MiB" for r, b in used.items() if r != "text-0"})
    for replica_id, n_bytes in used.items():
        assert 0 < n_bytes <= budgets[replica_id], replica_id
