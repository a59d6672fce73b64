"""A tiny random-weight chat model that vLLM can serve on any CPU, generated without a model hub.

Local mode and the tests need a real model that loads in seconds on a laptop or a 2-core CI
machine with no network: a 2-layer Qwen2 (head size 32, which vLLM's CPU attention supports)
with random weights, and a byte-level BPE tokenizer trained here on generated text, with a
ChatML template so `/v1/chat/completions` works. Its answers are gibberish by design: it
exercises every serving path, not language.

Values files name it with ``model: demo`` (see `DEMO_MODEL_NAME`); `ray-vram up` generates it on
first use under ``$RAY_VRAM_CACHE/models/demo``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

#: The `model` value that means "the generated demo model".
DEMO_MODEL_NAME = "demo"
#: Bumped whenever the generated files change, so cached copies are regenerated.
DEMO_MODEL_VERSION = 1
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MARKER = "ray-vram-demo.json"


class DemoShape(NamedTuple):
    """Layer sizes of a generated model (random weights either way)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_position: int
    dtype: str


#: "tiny": 2 layers, head size 32 (vLLM's CPU attention supports it), loads in seconds on any CPU.
#: "gpu": a Qwen2 of real size (28 layers, hidden 1536, about 1.5B parameters, 3 GB in bf16), for
#: measuring budgets and throughput on a GPU where no model hub is reachable.
DEMO_SHAPES = {
    "tiny": DemoShape(128, 256, 2, 4, 2, 2048, "float32"),
    "gpu": DemoShape(1536, 8960, 28, 12, 2, 4096, "bfloat16"),
}


def default_demo_dir() -> Path:
    cache = Path(os.environ.get("RAY_VRAM_CACHE", Path.home() / ".cache" / "ray-vram"))
    return cache / "models" / DEMO_MODEL_NAME


def is_demo_model(model: str) -> bool:
    return model == DEMO_MODEL_NAME


def is_generated(directory: Path) -> bool:
    marker = directory / _MARKER
    try:
        return json.loads(marker.read_text()).get("version") == DEMO_MODEL_VERSION
    except (OSError, ValueError):
        return False


def ensure_demo_model(directory: Path | None = None) -> Path:
    """The demo model's directory, generated if missing or from an older version."""
    directory = Path(directory or default_demo_dir())
    if not is_generated(directory):
        generate_demo_model(directory)
    return directory


def resolve_model_source(model: str) -> str:
    """What vLLM should load for a configured `model`: the demo directory for ``demo``."""
    return str(ensure_demo_model()) if is_demo_model(model) else model


def _training_corpus(rng: random.Random) -> list[str]:
    subjects = ["the cat", "a dog", "my friend", "the engineer", "our team", "the server", "a small model", "they"]
    verbs = ["runs", "writes", "reads", "builds", "tests", "serves", "answers", "computes", "returns"]
    objects = ["the code", "a letter", "many requests", "the answer", "some tokens", "the json", "a question"]
    adverbs = ["quickly", "slowly", "every day", "on time", "carefully", "again", "today"]
    words = ["hello", "world", "yes", "no", "name", "value", "true", "false", "city", "paris", "london", "red"]
    syllables = ["ka", "lo", "mi", "ne", "tar", "sun", "vel", "dor", "pi", "qua", "rex", "zo", "ban", "ter", "fu"]

    def sentence() -> str:
        text = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(adverbs)}."
        return text[0].upper() + text[1:]

    corpus = [" ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(12000)]
    values = [*words, *(str(n) for n in range(100))]
    for _ in range(3000):
        corpus.append(json.dumps({rng.choice(words): rng.choice(values) for _ in range(rng.randint(1, 3))}))
    # Pseudo-words let the BPE vocabulary actually fill up to VOCAB_SIZE.
    corpus += [
        " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 12)))
        for _ in range(6000)
    ]
    corpus.append("".join(chr(code) for code in range(32, 127)))
    return corpus


def generate_demo_model(directory: Path, seed: int = 0, shape: str = "tiny") -> Path:
    """Write tokenizer, config and random weights of `shape` (`DEMO_SHAPES`) to `directory`
    (atomically replaced)."""
    if shape not in DEMO_SHAPES:
        raise ValueError(f"demo model shape {shape!r} is not one of {', '.join(DEMO_SHAPES)}")
    dims = DEMO_SHAPES[shape]
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=directory.parent))
    staging.chmod(0o755)
    try:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(_training_corpus(rng), trainer=trainer)
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<|bos|>",
            eos_token="<|eos|>",
            pad_token="<|pad|>",
            unk_token="<|unk|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            model_max_length=dims.max_position,
        )
        hf_tokenizer.chat_template = CHAT_TEMPLATE
        hf_tokenizer.save_pretrained(staging)

        config = Qwen2Config(
            vocab_size=len(hf_tokenizer),
            hidden_size=dims.hidden,
            intermediate_size=dims.intermediate,
            num_hidden_layers=dims.layers,
            num_attention_heads=dims.heads,
            num_key_value_heads=dims.kv_heads,
            max_position_embeddings=dims.max_position,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            bos_token_id=hf_tokenizer.bos_token_id,
            eos_token_id=hf_tokenizer.eos_token_id,
            pad_token_id=hf_tokenizer.pad_token_id,
            torch_dtype=dims.dtype,
        )
        # Random weights are made on the GPU when there is one (seconds instead of minutes for "gpu").
        with torch.device("cuda" if shape != "tiny" and torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config).to(getattr(torch, dims.dtype))
        model.save_pretrained(staging, safe_serialization=True)
        generation = model.generation_config
        generation.eos_token_id = hf_tokenizer.eos_token_id
        generation.bos_token_id = hf_tokenizer.bos_token_id
        generation.pad_token_id = hf_tokenizer.pad_token_id
        generation.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"version": DEMO_MODEL_VERSION, "seed": seed, "shape": shape}))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory
