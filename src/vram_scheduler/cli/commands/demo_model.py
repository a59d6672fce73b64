"""`ray-vram demo-model`: generate a tiny random-weight demo model (no model hub needed)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ...core.exit_codes import ExitCode
from ...tools.demo.model import (
    DEMO_KINDS,
    DEMO_SHAPES,
    default_demo_dir,
    demo_name,
    ensure_demo_model,
    generate_demo_model,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model",
        help="generate a tiny random-weight demo model (`model: demo`, `demo-vision` or `demo-audio`)",
        description="Generate a model with random weights and an offline-trained tokenizer. It answers\n"
        "gibberish, fast, on any CPU: for trying ray-vram without a GPU or a model hub.\n"
        "  --kind text    a Qwen2 chat model            (values: model: demo)\n"
        "  --kind vision  an Idefics3 vision-language model, images in chat (model: demo-vision)\n"
        "  --kind audio   a Whisper speech-to-text model, /v1/audio/transcriptions (model: demo-audio)\n\n"
        "examples:\n  ray-vram demo-model                 # into $RAY_VRAM_CACHE/models/demo\n"
        "  ray-vram demo-model --kind vision   # into $RAY_VRAM_CACHE/models/demo-vision\n"
        "  ray-vram demo-model ./tiny --force\n"
        "  ray-vram demo-model /models/vlm --kind vision --shape gpu",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", help="output directory (default $RAY_VRAM_CACHE/models/<name>)")
    parser.add_argument("--kind", choices=DEMO_KINDS, default="text", help="text (default), vision or audio")
    parser.add_argument("--force", action="store_true", help="regenerate even if a current copy exists")
    parser.add_argument(
        "--shape",
        choices=sorted(DEMO_SHAPES),
        default="tiny",
        help="tiny (default: 2 layers, any CPU) or gpu (a 1.5B language model in bf16; vision: a 12-layer "
        "image encoder; audio: whisper-small's sizes), for GPU measurements",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory) if args.directory else default_demo_dir(args.kind)
    start = time.monotonic()
    if args.force or args.shape != "tiny":
        generate_demo_model(directory, shape=args.shape, kind=args.kind)
    else:
        ensure_demo_model(directory, kind=args.kind)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    print(
        f"{args.kind} demo model ready in {directory} ({size / 2**20:.1f} MiB, {time.monotonic() - start:.1f}s); "
        f"values: model: {demo_name(args.kind) if not args.directory else directory}"
    )
    return ExitCode.OK
