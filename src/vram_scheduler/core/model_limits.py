"""A model's own context limit, read from its config.json, so `max_model_len` is never more than it.

`max_model_len` defaults to 8192 or the model's maximum, whichever is smaller, and an explicit
value above the maximum is refused before anything is reserved, naming both numbers. The maximum
is derived the way vLLM derives it (the smallest of the usual length keys of the text config,
scaled by a RoPE factor where vLLM scales it, capped by the tokenizer's `model_max_length`), from
files only: a local directory or the Hugging Face cache. Where the
config cannot be read without downloading, the check is left to the replica, which may download.

The same files tell the size of the model's weights, from which a model without a measured
`overhead_gb` gets its overhead (`capacity.resolve_overhead`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import capacity
from .config import ConfigError, ModelSpec, PlacementSettings
from .contract import ResolvedSizes

#: The original design's default, kept for models that allow at least as much.
DEFAULT_MAX_MODEL_LEN = 8192

#: vLLM's keys for a model's maximum length (vllm/transformers_utils/model_arch_config_convertor.py).
_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
#: RoPE types whose max_position_embeddings is already scaled (vLLM does not multiply them).
_PRESCALED_ROPE = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}


class ModelLimit(BaseModel):
    """A model's maximum length and where it was read."""

    tokens: int
    source: str


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    for key in ("text_config", "language_config", "llm_config"):
        nested = config.get(key)
        if isinstance(nested, dict):
            return nested
    return config


def max_len_of(config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> tuple[int, str] | None:
    """(tokens, key) of a parsed config.json, or None when no length key is present."""
    text = _text_config(config)
    found = [(int(text[k]), k) for k in _LENGTH_KEYS if isinstance(text.get(k), int | float) and text[k] > 0]
    if not found:
        return None
    tokens, key = min(found)
    if isinstance(text.get("model_max_length"), int | float) and text["model_max_length"] > 0:
        tokens, key = int(text["model_max_length"]), "model_max_length"
    rope = text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in str(config.get("model_type", "")):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        factor = rope.get("factor")
        if kind not in _PRESCALED_ROPE and isinstance(factor, int | float) and factor > 0:
            tokens, key = int(tokens * factor), f"{key} × rope factor {factor:g}"
    limit = (tokenizer_config or {}).get("model_max_length")
    if isinstance(limit, int | float) and 0 < limit < tokens:
        tokens, key = int(limit), "model_max_length in tokenizer_config.json"
    return tokens, key


def _local_files(model: str) -> Path | None:
    """The directory holding the model's config.json without downloading anything, if there is one."""
    directory = Path(model).expanduser()
    if (directory / "config.json").is_file():
        return directory
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a repository name (a missing path, say)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _download_config(model: str) -> Path | None:
    """config.json (and tokenizer_config.json) of a hub model, fetched as vLLM would fetch them."""
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
        with contextlib.suppress(Exception):  # optional file
            hf_hub_download(model, "tokenizer_config.json")
        return path.parent
    except Exception:  # offline, gated, not a hub name: vLLM reports it when it loads
        return None


def _read_config(directory: Path | None) -> dict[str, Any] | None:
    """`directory`'s config.json as a dict; None when there is none that reads as one."""
    if directory is None:
        return None
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def local_config(model: str) -> dict[str, Any] | None:
    """The model's config.json when it can be read without downloading (a local or cached model)."""
    return _read_config(_local_files(model))


def model_limit(model: str, download: bool = False) -> ModelLimit | None:
    """The model's maximum length from its files; None when they cannot be read (or name no length)."""
    directory = _local_files(model) or (_download_config(model) if download else None)
    config = _read_config(directory)
    if directory is None or config is None:
        return None
    tokenizer_config: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    found = max_len_of(config, tokenizer_config)
    if found is None:
        return None
    tokens, key = found
    return ModelLimit(tokens=tokens, source=f"{key} in {directory / 'config.json'}")


def effective_max_model_len(spec: ModelSpec, download: bool = False) -> int:
    """`spec.max_model_len`, or min(8192, the model's maximum) when unset; refuses more than the model allows.

    Raises `ConfigError` naming both numbers when an explicit value exceeds the model's maximum.
    """
    limit = model_limit(spec.model, download=download)
    if spec.max_model_len is None:
        return min(DEFAULT_MAX_MODEL_LEN, limit.tokens) if limit else DEFAULT_MAX_MODEL_LEN
    if limit is not None and spec.max_model_len > limit.tokens:
        raise ConfigError(
            f"model {spec.model_id!r}",
            [
                f"max_model_len = {spec.max_model_len} exceeds the model's maximum of {limit.tokens} tokens "
                f"({limit.source}); set max_model_len to {limit.tokens} or less, or leave it out "
                f"(default: {DEFAULT_MAX_MODEL_LEN} or the model's maximum, whichever is smaller)"
            ],
        )
    return spec.max_model_len


def weights_bytes(model: str) -> int | None:
    """Bytes of the model's weight files where they can be read without downloading; None otherwise."""
    directory = _local_files(model)
    found = checkpoint_bytes(directory) if directory is not None else 0
    return found or None


def resolve_overheads(specs: Iterable[ModelSpec], settings: PlacementSettings) -> dict[str, capacity.Overhead]:
    """Each model's overhead and where it came from (`capacity.resolve_overhead`), by model id; a
    model's weights are read only when neither it nor `settings` states an overhead."""
    out = {}
    for spec in specs:
        weights = None if capacity.overhead_stated(spec, settings) else weights_bytes(spec.model)
        out[spec.model_id] = capacity.resolve_overhead(spec, settings, weights)
    return out


def resolve_model(spec: ModelSpec, settings: PlacementSettings) -> tuple[ModelSpec, ResolvedSizes]:
    """The model resolved once from its files where they can be read without downloading: the spec
    its replicas get (with the effective `max_model_len` when known) and the sizes to record.
    Raises `ConfigError` for a `max_model_len` over the model's maximum."""
    known = spec.max_model_len is not None or model_limit(spec.model) is not None
    length = effective_max_model_len(spec) if known else None
    weights = weights_bytes(spec.model)
    overhead = capacity.resolve_overhead(spec, settings, weights)
    sizes = ResolvedSizes(
        max_model_len=length,
        budget_bytes=spec.vram_bytes,
        overhead_bytes=overhead.bytes,
        overhead_from=overhead.describe(),
        reservation_bytes=capacity.reservation_bytes(spec.vram_bytes, overhead.bytes),
        weights_bytes=weights,
    )
    return (spec.model_copy(update={"max_model_len": length}) if length else spec), sizes


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Bytes of weight files in a local model directory (0 when it is not local)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        return 0
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            return int(json.loads(index.read_text())["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError):
            pass
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in {".safetensors", ".bin", ".pt"})
