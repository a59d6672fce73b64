"""What a vision or speech model holds beside its weights and KV cache, so its budget counts it.

A multimodal replica keeps three things a text model does not:

- the encoder cache: encoder outputs (image or audio embeddings) waiting for the language model, at
  most max(max_num_batched_tokens, one item's tokens) embeddings of the model's width (vLLM's
  `compute_mm_encoder_budget`);
- the processor cache (`media.processor_cache_gb`, vLLM's mm_processor_cache_gb): preprocessed
  inputs kept to skip preprocessing a repeated image, in host memory;
- the encoder's activations and the decoding libraries (PIL, libsndfile, the processor): measured,
  `MEDIA_RUNTIME_BYTES`.

On CUDA, vLLM's profiling pass runs the encoder on the most items a prompt may carry
(`media.images_per_prompt`, `media.audios_per_prompt`) before it sizes the KV cache, so the share
of the GPU already covers encoder activations and the encoder cache; the processor cache lies in
host memory there, outside the VRAM budget. On CPU all of it is host memory: the KV cache gets the
budget minus all of it.

Which models are multimodal is read from config.json (an encoder sub-config), before vLLM loads:
sizing comes first. The replica checks the guess against vLLM's own view once the engine is up.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ...core.config import GIB, ModelSpec

MIB = 1024**2
#: Host memory a multimodal CPU replica holds beyond a text one: encoder activations, the processor
#: and the image/audio decoders. Measured with the generated models after
#: tests/serving/test_multimodal_e2e.py's requests (private memory, as the monitor counts it): the
#: vision replica held 19 MiB and the speech replica 52 MiB more than the text one, with KV caches
#: ~60 MiB smaller (so about 80 and 110 MiB). 256 MiB leaves room for larger images and encoders.
MEDIA_RUNTIME_BYTES = 256 * MIB
#: vLLM's max_num_batched_tokens when the engine arguments set none (8192 on large GPUs, 2048 on CPU).
DEFAULT_BATCHED_TOKENS = 8192

#: config.json keys of an image encoder, and of an audio encoder (Whisper: its mel-bin count).
_VISION_KEYS = ("vision_config", "vision_tower", "mm_vision_tower", "visual", "vision_encoder")
_AUDIO_KEYS = ("audio_config", "speech_config", "audio_encoder", "num_mel_bins")


class MediaNeed(BaseModel):
    """The multimodal part of a replica's memory (all zero for a text-only model)."""

    modalities: list[str] = []
    encoder_cache_bytes: int = 0
    processor_cache_bytes: int = 0
    runtime_bytes: int = 0

    @property
    def cpu_bytes(self) -> int:
        """What it takes from a CPU replica's budget (host memory holds everything)."""
        return self.encoder_cache_bytes + self.processor_cache_bytes + self.runtime_bytes


def encoder_modalities(config: dict[str, Any]) -> list[str]:
    """The input kinds a model's config.json shows an encoder for: "image", "audio", both or none."""
    found = []
    if any(config.get(key) for key in _VISION_KEYS):
        found.append("image")
    if any(config.get(key) for key in _AUDIO_KEYS):
        found.append("audio")
    return found


def _width(config: dict[str, Any]) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return int(text.get("hidden_size") or config.get("d_model") or 0)


def _dtype_bytes(spec: ModelSpec, config: dict[str, Any]) -> int:
    dtype = str(spec.engine_kwargs.get("dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 4 if "32" in dtype or dtype == "float" else 2


def media_need(spec: ModelSpec, config: dict[str, Any] | None) -> MediaNeed:
    """The multimodal memory of a replica of `spec` whose config.json is `config` (None: unknown, none)."""
    modalities = encoder_modalities(config or {})
    if not modalities or config is None:
        return MediaNeed()
    batched = int(spec.engine_kwargs.get("max_num_batched_tokens") or DEFAULT_BATCHED_TOKENS)
    tokens = max(batched, spec.max_model_len or 0)
    return MediaNeed(
        modalities=modalities,
        encoder_cache_bytes=tokens * _width(config) * _dtype_bytes(spec, config),
        processor_cache_bytes=round(spec.media.processor_cache_gb * GIB),
        runtime_bytes=MEDIA_RUNTIME_BYTES,
    )
