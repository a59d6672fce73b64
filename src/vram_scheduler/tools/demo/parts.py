"""What every generated demo model shares: the offline tokenizer, the language model's shapes, writing.

No model hub is needed: the byte-level BPE vocabulary is learnt in about a second from sentences,
JSON objects and pseudo-words, so chat and structured output work on it. Each kind of demo model
adds the special tokens its architecture needs (an image placeholder, Whisper's task tokens) on top
of the chat ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, NamedTuple


class DemoShape(NamedTuple):
    """Layer sizes of a generated language model (random weights either way)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_position: int
    dtype: str


#: "tiny": 2 layers, head size 32 (vLLM's CPU attention supports it), loads in seconds on any CPU.
#: "gpu": a language model of real size (28 layers, hidden 1536, about 1.5B parameters, 3 GB in
#: bf16), for measuring budgets and throughput on a GPU where no model hub is reachable.
DEMO_SHAPES = {
    "tiny": DemoShape(128, 256, 2, 4, 2, 2048, "float32"),
    "gpu": DemoShape(1536, 8960, 28, 12, 2, 4096, "bfloat16"),
}

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
#: ChatML with string content: vLLM puts each image's placeholder into the text it hands the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_corpus(rng: random.Random) -> list[str]:
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


def train_tokenizer(
    seed: int,
    max_length: int,
    extra_special: list[str] | None = None,
    *,
    bos: str = "<|bos|>",
    eos: str = "<|eos|>",
    pad: str = "<|pad|>",
    unk: str = "<|unk|>",
) -> Any:
    """A `PreTrainedTokenizerFast` with the chat special tokens, `extra_special` ones and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [token for token in extra_special or [] if token not in SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE + len(extra),
        special_tokens=SPECIAL_TOKENS + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(random.Random(seed)), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
        model_max_length=max_length,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def random_init_device(shape: str) -> Any:
    """Where random weights are made: the GPU when there is one (seconds instead of minutes for "gpu")."""
    import torch

    return torch.device("cuda" if shape != "tiny" and torch.cuda.is_available() else "cpu")


def language_model_fields(dims: DemoShape, tokenizer: Any) -> dict[str, Any]:
    """The config fields of a decoder-only language model of `dims` (Qwen2's and Llama's alike)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "max_position_embeddings": dims.max_position,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_model(directory: Path, shape: str, model_class: Any, config: Any, tokenizer: Any) -> None:
    """Random weights of `model_class(config)` in the dtype of `shape`, saved with `tokenizer`: every
    kind of demo model is written this way, its processor (if any) added afterwards."""
    import torch

    with random_init_device(shape):
        model = model_class(config).to(getattr(torch, DEMO_SHAPES[shape].dtype))
    save_model(model, directory, tokenizer)


def save_model(model: Any, directory: Path, tokenizer: Any) -> None:
    """Weights (safetensors), config and a generation config whose special tokens are the tokenizer's."""
    model.save_pretrained(directory, safe_serialization=True)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
