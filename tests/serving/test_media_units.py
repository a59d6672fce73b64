"""The multimodal parts that need no engine: media limits in the spec, what they become for vLLM and
for sizing, the router's refusals (over ASGI, before any replica), multipart forms, the SDK's image
inputs, and the generated vision and speech models as transformers reads them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from vram_scheduler.core.config import GIB, ModelSpec, ServingSettings
from vram_scheduler.core.contract import EndpointTable, MediaAccepts, ReplicaEndpoint
from vram_scheduler.sdk.media_inputs import ImageInputError, image_url, with_images
from vram_scheduler.serving.replica.engine_args import NO_MEDIA_DOMAIN, parse_server_args, server_argv
from vram_scheduler.serving.replica.media_budget import MEDIA_RUNTIME_BYTES, encoder_modalities, media_need
from vram_scheduler.serving.replica.sizing import CPU_RUNTIME_BYTES, BudgetTooSmall, size_engine
from vram_scheduler.serving.router.media_checks import MediaRejected, audio_format, check_chat
from vram_scheduler.serving.router.multipart import add_field, parse_form
from vram_scheduler.serving.router.router import OpenAIRouter

from .test_units import call


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming `width`×`height` pixels with only its first row of data: what a decompression
    bomb's header says, without writing the image out."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    first_row = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", first_row) + chunk(b"IEND", b"")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(model: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


VISION = MediaAccepts(
    items_per_prompt={"image": 2}, max_item_bytes=2**20, max_image_pixels=10_000, local_media_dir="/data/img"
)

# -- the spec and what it becomes ------------------------------------------------------------------


def test_media_settings_are_checked_and_media_engine_kwargs_are_refused() -> None:
    spec = ModelSpec(model_id="v", model="demo-vision", vram_gb=2)
    assert spec.media.images_per_prompt == 4 and spec.media.media_domains == [] and spec.media.local_media_dir is None
    with pytest.raises(ValidationError, match="sets it from the model's `media` settings"):
        ModelSpec(model_id="v", model="m", vram_gb=2, engine_kwargs={"limit_mm_per_prompt": {"image": 9}})
    with pytest.raises(ValidationError, match="absolute path"):
        ModelSpec(model_id="v", model="m", vram_gb=2, media={"local_media_dir": "images"})
    with pytest.raises(ValidationError):
        ModelSpec(model_id="v", model="m", vram_gb=2, media={"max_image_pixels": 10**9})  # over Pillow's bomb limit


def test_media_settings_become_vllms_flags_and_vllm_accepts_them() -> None:
    spec = ModelSpec(
        model_id="v",
        model="demo-vision",
        vram_gb=2,
        media={"images_per_prompt": 3, "processor_cache_gb": 0.5, "local_media_dir": "/tmp"},
    )
    argv = server_argv(spec, "/models/v", size_engine("v", spec.vram_bytes, "cpu", 24 * GIB))
    joined = " ".join(argv)
    assert '--limit-mm-per-prompt {"image": 3, "audio": 1, "video": 0}' in joined
    assert "--mm-processor-cache-gb 0.5" in joined and "--allowed-local-media-path /tmp" in joined
    assert f"--allowed-media-domains {NO_MEDIA_DOMAIN}" in joined  # no downloads unless hosts are listed
    args = parse_server_args(argv)
    assert args.limit_mm_per_prompt == {"image": 3, "audio": 1, "video": 0} and args.mm_processor_cache_gb == 0.5
    assert args.allowed_media_domains == [NO_MEDIA_DOMAIN]
    hosts = spec.model_copy(update={"media": spec.media.model_copy(update={"media_domains": ["img.example"]})})
    budget = size_engine("v", 2 * GIB, "cpu", 24 * GIB)
    assert "--allowed-media-domains img.example" in " ".join(server_argv(hosts, "/m", budget))


def test_encoders_are_read_from_config_json() -> None:
    assert encoder_modalities({"model_type": "idefics3", "vision_config": {"hidden_size": 64}}) == ["image"]
    assert encoder_modalities({"model_type": "whisper", "num_mel_bins": 80}) == ["audio"]
    assert encoder_modalities({"model_type": "qwen2", "hidden_size": 128}) == []


def test_cpu_sizing_counts_the_encoder_and_its_caches() -> None:
    spec = ModelSpec(model_id="v", model="m", vram_gb=2, max_model_len=512, media={"processor_cache_gb": 0.25})
    config = {"vision_config": {"hidden_size": 64}, "text_config": {"hidden_size": 1024}, "torch_dtype": "bfloat16"}
    need = media_need(spec, config)
    assert need.modalities == ["image"] and need.processor_cache_bytes == GIB // 4
    assert need.encoder_cache_bytes == 8192 * 1024 * 2  # vLLM's default batch of tokens × width × bf16
    assert need.runtime_bytes == MEDIA_RUNTIME_BYTES
    text = size_engine("v", 2 * GIB, "cpu", 24 * GIB, weight_bytes=100 * 2**20)
    vision = size_engine("v", 2 * GIB, "cpu", 24 * GIB, weight_bytes=100 * 2**20, media=need)
    assert text.kv_cache_memory_bytes is not None and vision.kv_cache_memory_bytes is not None
    assert text.kv_cache_memory_bytes - vision.kv_cache_memory_bytes == need.cpu_bytes
    assert media_need(spec, {"hidden_size": 1024}).cpu_bytes == 0  # a text model pays nothing
    with pytest.raises(BudgetTooSmall, match="image/audio encoder and caches") as error:
        size_engine("v", CPU_RUNTIME_BYTES + 200 * 2**20, "cpu", 24 * GIB, media=need)
    assert "media.processor_cache_gb" in str(error.value)
    cuda = size_engine("v", 20 * GIB, "cuda", 80 * GIB, weight_bytes=3 * GIB, media=need)
    assert cuda.gpu_memory_utilization == pytest.approx(0.25)  # vLLM's profiling counts the encoder on the GPU


# -- the router's checks -----------------------------------------------------------------------------


def rejected(body: dict[str, Any], accepts: MediaAccepts = VISION) -> MediaRejected:
    with pytest.raises(MediaRejected) as error:
        check_chat(body, "v", accepts)
    return error.value


def test_chat_media_checks_name_what_where_and_by_how_much() -> None:
    check_chat(chat("v", image(data_url(png(50, 50))), image("file:///data/img/a/b.png")), "v", VISION)
    text_only = rejected(chat("t", image(data_url(png(5, 5)))), MediaAccepts())
    assert text_only.status == 400 and "does not take image input (it takes text only)" in str(text_only)
    assert text_only.param == "messages[0].content[1]"
    assert "1 too many" in str(rejected(chat("v", *[image(data_url(png(5, 5)))] * 3)))
    pixels = rejected(chat("v", image(data_url(png(200, 100)))))
    assert pixels.status == 413 and "200×100 = 20,000 pixels" in str(pixels) and "by 10,000" in str(pixels)
    size = rejected(chat("v", image(data_url(os.urandom(2 * 2**20)))))
    assert size.status == 413 and "over the 1.00 MiB limit" in str(size) and "by 1.00 MiB" in str(size)
    assert "not an image" in str(rejected(chat("v", image(data_url(b"GIF89a broken")))))
    assert "outside" in str(rejected(chat("v", image("file:///data/img/../secret.png"))))
    assert "outside" in str(rejected(chat("v", image("file:///data/imgs/x.png"))))
    assert "does not download" in str(rejected(chat("v", image("http://example.com/x.png"))))
    no_files = MediaAccepts(items_per_prompt={"image": 1})
    assert "reads no local files" in str(rejected(chat("v", image("file:///x.png")), no_files))
    allowed = MediaAccepts(items_per_prompt={"image": 1}, media_domains=["img.example"])
    check_chat(chat("v", image("https://IMG.example/x.png")), "v", allowed)
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    assert "does not take audio input (it takes up to 2 image(s))" in str(rejected(chat("v", audio)))
    # Over Pillow's bomb limit, in 138 bytes (under the 1 MiB item limit): refused from its header alone.
    bomb = rejected(chat("v", image(data_url(png_header_only(20000, 20000)))))
    assert bomb.status == 413 and "pixels, over the 10,000-pixel limit" in str(bomb), str(bomb)


def test_audio_formats_are_told_by_their_first_bytes() -> None:
    assert audio_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "wav"
    assert audio_format(b"fLaC\x00") == "flac" and audio_format(b"OggS\x00") == "ogg"
    assert audio_format(b"ID3\x04") == "mp3" and audio_format(b"\xff\xfb\x90") == "mp3"
    assert audio_format(b"\x00\x00\x00\x20ftypM4A ") == "mp4" and audio_format(b"\x1a\x45\xdf\xa3") == "webm"
    assert audio_format(png(2, 2)) is None and audio_format(b"") is None


def test_multipart_forms_are_read_and_extended_without_touching_the_upload() -> None:
    data = os.urandom(300_000)
    request = httpx.Request("POST", "http://x", data={"model": "s", "language": "en"}, files={"file": ("a.wav", data)})
    body, content_type = request.read(), request.headers["content-type"]
    form = parse_form(content_type, body)
    assert form.fields == {"model": "s", "language": "en"}
    assert [(u.name, u.filename, u.data == data) for u in form.files] == [("file", "a.wav", True)]
    extended = parse_form(content_type, add_field(content_type, body, "max_completion_tokens", "12"))
    assert extended.fields["max_completion_tokens"] == "12" and extended.files[0].data == data


def endpoint(model: str, tasks: list[str], media: MediaAccepts) -> ReplicaEndpoint:
    return ReplicaEndpoint(
        replica_id=f"{model}-0",
        model_id=model,
        names=[model],
        url="http://127.0.0.1:9",
        max_ongoing_requests=4,
        max_tokens=8,
        node="n",
        gpu_uuid="GPU-x",
        gpu_index=0,
        bytes=GIB,
        pids=[1],
        tasks=tasks,
        media=media,
    )


def test_router_refuses_media_a_model_does_not_take_before_any_replica_sees_it() -> None:
    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None))
    speech = MediaAccepts(items_per_prompt={"audio": 1}, max_item_bytes=1000)
    endpoints = [
        endpoint("text", ["generate"], MediaAccepts()),
        endpoint("vision", ["generate"], VISION),
        endpoint("speech", ["transcription"], speech),
    ]
    router.registry.sync(EndpointTable(version=1, endpoints=endpoints))
    answer = call(router, "POST", "/v1/chat/completions", json=chat("text", image(data_url(png(4, 4)))))
    assert answer.status_code == 400 and "does not take image input" in answer.json()["error"]["message"]
    answer = call(router, "POST", "/v1/chat/completions", json=chat("vision", image(data_url(png(300, 300)))))
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "RequestTooLargeError"
    answer = call(router, "POST", "/v1/chat/completions", json={"model": "speech", "messages": []})
    assert answer.status_code == 400 and "does not serve chat completions" in answer.json()["error"]["message"]

    def transcribe(model: str, data: bytes) -> httpx.Response:
        return call(router, "POST", "/v1/audio/transcriptions", data={"model": model}, files={"file": ("f", data)})

    wav = b"RIFF\x00\x00\x00\x00WAVEfmt "
    assert "does not serve audio transcriptions" in transcribe("text", wav).json()["error"]["message"]
    assert transcribe("speech", b"\x00" * 10).status_code == 415
    assert transcribe("speech", wav + b"\x00" * 2000).status_code == 413
    assert transcribe("nope", wav).status_code == 404
    no_model = call(router, "POST", "/v1/audio/transcriptions", files={"file": ("f", wav)})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    no_file = call(router, "POST", "/v1/audio/transcriptions", data={"model": "speech"}, files={"x": ("f", b"")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    # Accepted ones go on to the replica (here a closed port: dropped, then 503).
    assert transcribe("speech", wav).status_code == 503


# -- the SDK's image inputs ---------------------------------------------------------------------------


def test_images_become_data_urls_or_pass_as_urls(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png(3, 3))
    assert image_url(path).startswith("data:image/png;base64,")
    assert image_url(str(path)) == image_url(png(3, 3)) == image_url(Image.open(path))
    jpeg = io.BytesIO()
    Image.new("RGB", (3, 3)).save(jpeg, "JPEG")
    assert image_url(jpeg.getvalue()).startswith("data:image/jpeg;base64,")
    for url in ("data:image/png;base64,AAAA", "file:///data/a.png", "https://example.com/a.png"):
        assert image_url(url) == url
    with pytest.raises(ImageInputError, match="No such file"):
        image_url(str(tmp_path / "missing.png"))
    with pytest.raises(ImageInputError, match="not a PNG, JPEG"):
        image_url(b"hello")
    messages = with_images([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], [png(2, 2)])
    assert [p["type"] for p in messages[1]["content"]] == ["text", "image_url"]
    with pytest.raises(ImageInputError, match="must be a list"):
        with_images([{"role": "user", "content": "q"}], str(path))  # type: ignore[arg-type]


# -- the generated models ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vision", "audio"])
def test_generated_models_load_with_their_processors(kind: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    from vram_scheduler.tools.demo.model import generate_demo_model, is_generated

    started = time.monotonic()
    directory = generate_demo_model(tmp_path / kind, kind=kind)  # type: ignore[arg-type]
    assert time.monotonic() - started < 60 and is_generated(directory, kind) and not is_generated(directory)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size < 20 * 2**20
    config = AutoConfig.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["architectures"] == [
        "Idefics3ForConditionalGeneration" if kind == "vision" else "WhisperForConditionalGeneration"
    ]
    if kind == "vision":
        inputs = processor(text=["<image>hi"], images=[[Image.new("RGB", (100, 60))]])
        assert inputs["pixel_values"].shape[1] == 5  # scaled to 128×77, padded to 2×2 tiles of 64, + the global view
        assert config.text_config.hidden_size // config.text_config.num_attention_heads == 32
    else:
        tokens = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>"])
        assert processor.tokenizer.unk_token_id not in tokens
        assert processor.feature_extractor.sampling_rate == 16000


# -- file:// media on the replica's node (LocalMediaGuard) -------------------------------------------


def guarded_chat(guard: Any, *parts: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.post("/v1/chat/completions", json=chat("vision", *parts))

    return asyncio.run(go())


def test_local_media_is_a_regular_file_under_the_directory_checked_before_it_is_opened(tmp_path: Path) -> None:
    """Links are resolved first; missing, outside, linked outside, a directory, a FIFO and a device all
    get one refusal (nothing tells whether a file exists elsewhere), and none of them is read."""
    from vram_scheduler.serving.router.local_media import LocalMediaGuard

    media, elsewhere = tmp_path / "media", tmp_path / "elsewhere"
    media.mkdir()
    elsewhere.mkdir()
    (media / "ok.png").write_bytes(png(4, 4))
    (elsewhere / "secret.png").write_bytes(png(4, 4))
    (media / "sub").mkdir()
    (media / "to-secret.png").symlink_to(elsewhere / "secret.png")
    (media / "to-zero").symlink_to("/dev/zero")
    (media / "to-ok.png").symlink_to(media / "ok.png")
    os.mkfifo(media / "fifo")
    reached: list[bytes] = []

    async def vllm(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    accepts = VISION.model_copy(update={"local_media_dir": str(media), "items_per_prompt": {"image": 2, "audio": 1}})
    guard = LocalMediaGuard(vllm, "vision", accepts)
    assert guarded_chat(guard, image(f"file://{media}/ok.png"), image(f"file://{media}/to-ok.png")).status_code == 200
    refused = {
        "missing": f"{media}/missing.png",
        "outside": f"{elsewhere}/secret.png",
        "dotdot": f"{media}/../elsewhere/secret.png",
        "linked outside": f"{media}/to-secret.png",
        "device": "/dev/zero",
        "linked device": f"{media}/to-zero",
        "dotdot device": f"{media}/../../../../dev/zero",
        "directory": f"{media}/sub",
        "the directory": str(media),
        "fifo": f"{media}/fifo",
    }
    messages = {}
    for case, path in refused.items():
        answer = guarded_chat(guard, image(f"file://{path}"))
        assert answer.status_code == 400, (case, answer.text)
        messages[case] = answer.json()["error"]["message"].replace(path, "<path>", 1)
    assert len(set(messages.values())) == 1, messages
    assert messages["missing"] == (
        f"messages[0].content[1]: file <path> is not a readable file in model `vision`'s media directory {media} "
        "(media.local_media_dir)"
    )
    audio = {"type": "audio_url", "audio_url": {"url": f"file://{media}/to-secret.png"}}
    assert guarded_chat(guard, audio).status_code == 400  # audio and video URLs too
    assert len(reached) == 1
