"""Random-weight vision-language and speech-to-text demo models, generated without a model hub.

The multimodal serving paths (image content parts in chat, `/v1/audio/transcriptions`) need real
models that vLLM's CPU backend loads in seconds. The architectures are ones vLLM serves on CPU
without torchvision (which the CPU environment cannot carry beside torch+cpu):

- vision: Idefics3 (the SmolVLM family): a SigLIP-style image encoder, a pixel-shuffle connector
  and a Llama language model. Images are split into tiles plus a global view, so the number of
  image tokens grows with the image, as in real VLMs.
- audio: Whisper, encoder-decoder, with a log-mel feature extractor and Whisper's task tokens.

Both use the shared offline tokenizer (`demo_parts`). Answers and transcripts are gibberish by
design.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .parts import DEMO_SHAPES, language_model_fields, train_tokenizer, write_model


class VisionShape(NamedTuple):
    """Image encoder sizes. Tokens per tile: (image_size / patch)² / scale_factor²."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch: int
    scale_factor: int
    max_tiles_per_side: int


class AudioShape(NamedTuple):
    """Whisper sizes (encoder and decoder alike)."""

    d_model: int
    ffn: int
    layers: int
    heads: int
    mel_bins: int


#: tiny: 64-pixel tiles of 4 tokens, up to 2×2 tiles + the global view; gpu: SmolVLM's 512-pixel
#: tiles of 64 tokens, up to 4×4 + 1, with a 12-layer 768-wide encoder.
VISION_SHAPES = {
    "tiny": VisionShape(64, 128, 2, 2, 64, 16, 2, 2),
    "gpu": VisionShape(768, 3072, 12, 12, 512, 16, 4, 4),
}
#: tiny: 2+2 layers of width 128 (head size 32); gpu: whisper-small's sizes (about 240M parameters).
AUDIO_SHAPES = {
    "tiny": AudioShape(128, 256, 2, 4, 80),
    "gpu": AudioShape(768, 3072, 12, 12, 80),
}
#: Whisper's audio window: 30 s at 16 kHz, 100 mel frames a second, 1500 encoder positions.
WHISPER_SAMPLE_RATE = 16000
WHISPER_CHUNK_S = 30
WHISPER_DECODER_POSITIONS = 448


def write_vision_model(directory: Path, seed: int, shape: str) -> None:
    """An Idefics3 model (tokenizer, processor, config, weights) into `directory`."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3 import Idefics3VisionConfig

    try:  # transformers 5 without torchvision: the PIL processor, saved under the generic name
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4 (CUDA images): the PIL-based processor is the default
        from transformers import Idefics3ImageProcessor as ImageProcessor

    lm, enc = DEMO_SHAPES[shape], VISION_SHAPES[shape]
    tiles = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = train_tokenizer(
        seed, lm.max_position, ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *tiles]
    )
    text = LlamaConfig(**language_model_fields(lm, tokenizer), tie_word_embeddings=False)
    vision = Idefics3VisionConfig(
        hidden_size=enc.hidden,
        intermediate_size=enc.intermediate,
        num_hidden_layers=enc.layers,
        num_attention_heads=enc.heads,
        image_size=enc.image_size,
        patch_size=enc.patch,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=enc.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=lm.dtype,
    )
    write_model(directory, shape, Idefics3ForConditionalGeneration, config, tokenizer)
    image_processor = ImageProcessor(
        size={"longest_edge": enc.image_size * enc.max_tiles_per_side},
        max_image_size={"longest_edge": enc.image_size},
        do_image_splitting=True,
    )
    tokens_per_tile = (enc.image_size // enc.patch) ** 2 // enc.scale_factor**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=tokens_per_tile,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(directory)


def write_audio_model(directory: Path, seed: int, shape: str) -> None:
    """A Whisper model (tokenizer with Whisper's task tokens, feature extractor, config, weights)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    dims, dtype = AUDIO_SHAPES[shape], DEMO_SHAPES[shape].dtype
    # vLLM writes "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>" and, without a
    # `language`, lets the model pick one of the language tokens.
    task_tokens = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    special = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *task_tokens, "<|notimestamps|>"]
    end = "<|endoftext|>"
    tokenizer = train_tokenizer(seed, WHISPER_DECODER_POSITIONS, [end, *special], bos=end, eos=end, pad=end, unk=end)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=dims.mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.layers,
        decoder_layers=dims.layers,
        encoder_attention_heads=dims.heads,
        decoder_attention_heads=dims.heads,
        encoder_ffn_dim=dims.ffn,
        decoder_ffn_dim=dims.ffn,
        max_source_positions=WHISPER_CHUNK_S * 100 // 2,
        max_target_positions=WHISPER_DECODER_POSITIONS,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=None,  # the real Whisper's ids lie outside this vocabulary
        begin_suppress_tokens=None,
        torch_dtype=dtype,
    )
    write_model(directory, shape, WhisperForConditionalGeneration, config, tokenizer)
    features = WhisperFeatureExtractor(
        feature_size=dims.mel_bins,
        sampling_rate=WHISPER_SAMPLE_RATE,
        hop_length=WHISPER_SAMPLE_RATE // 100,
        chunk_length=WHISPER_CHUNK_S,
        n_fft=400,
    )
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(directory)
