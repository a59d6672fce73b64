"""Generate the tiny random-weight Qwen2 model + offline-trained BPE tokenizer used by the SDK tests.

Usage: python tests/tiny_model.py OUT_DIR   (no network needed; ~7 s)
Head size 32 because vLLM's CPU attention supports 32, 64, 80, ...
"""

import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

OUT = sys.argv[1] if len(sys.argv) > 1 else "./tiny-model"
VOCAB = 2048
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]

random.seed(0)
torch.manual_seed(0)

# ---- 1. generated English-ish training text -------------------------------
subjects = [
    "the cat",
    "a dog",
    "my friend",
    "the engineer",
    "our team",
    "the server",
    "a small model",
    "the teacher",
    "this program",
    "the robot",
    "she",
    "he",
    "they",
]
verbs = [
    "runs",
    "writes",
    "reads",
    "builds",
    "tests",
    "serves",
    "answers",
    "likes",
    "computes",
    "generates",
    "sends",
    "returns",
    "opens",
    "closes",
]
objects = [
    "the code",
    "a letter",
    "many requests",
    "the answer",
    "some tokens",
    "a story",
    "the json",
    "an apple",
    "the door",
    "a question",
    "the report",
    "numbers",
]
adverbs = ["quickly", "slowly", "every day", "on time", "carefully", "again", "today", "at night"]
words = [
    "hello",
    "world",
    "yes",
    "no",
    "name",
    "value",
    "true",
    "false",
    "city",
    "paris",
    "london",
    "red",
    "green",
    "blue",
    "one",
    "two",
    "three",
    "four",
    "five",
]


def sentence():
    s = f"{random.choice(subjects)} {random.choice(verbs)} {random.choice(objects)} {random.choice(adverbs)}."
    return s[0].upper() + s[1:]


corpus = []
for _ in range(20000):
    corpus.append(" ".join(sentence() for _ in range(random.randint(1, 4))))
for _ in range(3000):
    corpus.append(
        json.dumps(
            {
                random.choice(words): random.choice([*words, str(random.randint(0, 999))])
                for _ in range(random.randint(1, 3))
            }
        )
    )
syll = ["ka", "lo", "mi", "ne", "tar", "sun", "vel", "dor", "pi", "qua", "rex", "zo", "ban", "ter", "gli", "fu"]
for _ in range(8000):  # pseudo-words so the BPE vocab actually reaches ~VOCAB
    corpus.append(
        " ".join(
            "".join(random.choice(syll) for _ in range(random.randint(1, 4))) for _ in range(random.randint(3, 12))
        )
    )
corpus.append("".join(chr(c) for c in range(32, 127)))  # cover all printable ASCII

# ---- 2. byte-level BPE tokenizer ------------------------------------------
tok = Tokenizer(models.BPE(unk_token=None))
tok.normalizer = normalizers.NFC()
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
)
tok.train_from_iterator(corpus, trainer=trainer)

chat_template = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
hf_tok = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<|bos|>",
    eos_token="<|eos|>",
    pad_token="<|pad|>",
    unk_token="<|unk|>",
    additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    model_max_length=512,
)
hf_tok.chat_template = chat_template
os.makedirs(OUT, exist_ok=True)
hf_tok.save_pretrained(OUT)

# ---- 3. tiny Qwen2 model with random weights --------------------------------
vocab_size = len(hf_tok)
cfg = Qwen2Config(
    vocab_size=vocab_size,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim = 32 (vLLM CPU attention supports 32,64,80,...)
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=hf_tok.bos_token_id,
    eos_token_id=hf_tok.eos_token_id,
    pad_token_id=hf_tok.pad_token_id,
    torch_dtype="float32",
)
model = Qwen2ForCausalLM(cfg)
model.save_pretrained(OUT, safe_serialization=True)
# generation_config: eos so vLLM stops
model.generation_config.eos_token_id = hf_tok.eos_token_id
model.generation_config.bos_token_id = hf_tok.bos_token_id
model.generation_config.pad_token_id = hf_tok.pad_token_id
model.generation_config.save_pretrained(OUT)

print(f"saved to {OUT}: vocab={vocab_size} files={sorted(os.listdir(OUT))}")
