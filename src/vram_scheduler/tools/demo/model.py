"""Tiny random-weight models that vLLM can serve on any CPU, generated without a model hub.

Local mode and the tests need real models that load in seconds on a laptop or a 2-core CI
machine with no network. Three kinds, each named by a `model` value in values files:

- ``demo``: a chat model, a 2-layer Qwen2 (head size 32, which vLLM's CPU attention supports);
- ``demo-vision``: a vision-language model (Idefics3, see `demo_multimodal`) for image inputs;
- ``demo-audio``: a speech-to-text model (Whisper) for ``/v1/audio/transcriptions``.

All have random weights and a byte-level BPE tokenizer trained here on generated text (`demo_parts`),
with a ChatML template. Their answers are gibberish by design: they exercise every serving path,
not language. They are served like any local model, from their directory: `ray-vram up` (and
`ray-vram serve`) generates the ones its values name under ``$RAY_VRAM_CACHE/models/<name>`` and
lists every generated one in ``serving.model_sources`` (`demo_sources`), so that the names resolve
to those directories with `DEMO_ENGINE_KWARGS`; ``ray-vram demo-model --kind`` generates one ahead of
time. Nothing on the serving path knows these names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ...core.config import ModelSource, RayVRAMConfig
from .parts import DEMO_SHAPES, language_model_fields, train_tokenizer, write_model

DemoKind = Literal["text", "vision", "audio"]
#: The `model` value that means "the generated demo chat model".
DEMO_MODEL_NAME = "demo"
#: Every `model` value that names a generated model, and the kind it generates.
DEMO_MODELS: dict[str, DemoKind] = {"demo": "text", "demo-vision": "vision", "demo-audio": "audio"}
DEMO_KINDS: tuple[DemoKind, ...] = ("text", "vision", "audio")
#: Bumped whenever a kind's generated files change, so cached copies are regenerated.
DEMO_MODEL_VERSIONS: dict[DemoKind, int] = {"text": 1, "vision": 1, "audio": 1}
_MARKER = "ray-vram-demo.json"
#: The engine arguments a demo model is served with: it answers fast, and closes structured output
#: (random weights) so that the original quick start runs on it unchanged. A model's own
#: engine_kwargs take precedence.
DEMO_ENGINE_KWARGS: dict[str, object] = {
    "dtype": "float32",
    "enforce_eager": True,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def demo_name(kind: DemoKind) -> str:
    return next(name for name, of in DEMO_MODELS.items() if of == kind)


def default_demo_dir(kind: DemoKind = "text") -> Path:
    cache = Path(os.environ.get("RAY_VRAM_CACHE", Path.home() / ".cache" / "ray-vram"))
    return cache / "models" / demo_name(kind)


def is_generated(directory: Path, kind: DemoKind = "text") -> bool:
    marker = directory / _MARKER
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return found.get("kind", "text") == kind and found.get("version") == DEMO_MODEL_VERSIONS[kind]


def ensure_demo_model(directory: Path | None = None, kind: DemoKind = "text") -> Path:
    """A demo model's directory, generated if missing or from an older version."""
    directory = Path(directory or default_demo_dir(kind))
    if not is_generated(directory, kind):
        generate_demo_model(directory, kind=kind)
    return directory


def demo_sources(
    config: RayVRAMConfig, progress: Callable[[str], None] = print, generate: bool = True
) -> RayVRAMConfig:
    """`config` with its `serving.model_sources` naming the generated demo models: those its models
    name are generated now (when missing or from an older version; not with `generate` off), and
    every other one already generated here is listed too (a later deploy may name it). Sources the
    values set win."""
    named = {spec.model for spec in config.models} & set(DEMO_MODELS)
    sources: dict[str, ModelSource] = {}
    for name, kind in DEMO_MODELS.items():
        directory = default_demo_dir(kind)
        if generate and name in named and not is_generated(directory, kind):
            progress(f"preparing the demo model {name} ...")
            ensure_demo_model(directory, kind)
        if is_generated(directory, kind):
            sources[name] = ModelSource(path=str(directory), engine_kwargs=dict(DEMO_ENGINE_KWARGS))
    serving = config.serving.model_copy(update={"model_sources": sources | config.serving.model_sources})
    return config.model_copy(update={"serving": serving})


def _write_text_model(directory: Path, seed: int, shape: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = DEMO_SHAPES[shape]
    tokenizer = train_tokenizer(seed, dims.max_position)
    config = Qwen2Config(**language_model_fields(dims, tokenizer), tie_word_embeddings=True, torch_dtype=dims.dtype)
    write_model(directory, shape, Qwen2ForCausalLM, config, tokenizer)


def generate_demo_model(directory: Path, seed: int = 0, shape: str = "tiny", kind: DemoKind = "text") -> Path:
    """Write tokenizer, config and random weights of `kind` and `shape` (`DEMO_SHAPES`) to `directory`
    (atomically replaced)."""
    if shape not in DEMO_SHAPES:
        raise ValueError(f"demo model shape {shape!r} is not one of {', '.join(DEMO_SHAPES)}")
    if kind not in DEMO_KINDS:
        raise ValueError(f"demo model kind {kind!r} is not one of {', '.join(DEMO_KINDS)}")
    import torch

    from .multimodal import write_audio_model, write_vision_model

    write = {"text": _write_text_model, "vision": write_vision_model, "audio": write_audio_model}[kind]
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=directory.parent))
    staging.chmod(0o755)
    try:
        torch.manual_seed(seed)
        write(staging, seed, shape)
        marker = {"version": DEMO_MODEL_VERSIONS[kind], "kind": kind, "seed": seed, "shape": shape}
        (staging / _MARKER).write_text(json.dumps(marker))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory
