"""`ray-vram demo-model`: generate the tiny random-weight demo model (no model hub needed)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..demo_model import DEMO_SHAPES, default_demo_dir, ensure_demo_model, generate_demo_model
from ..exit_codes import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model",
        help="generate the tiny random-weight demo model that `model: demo` serves",
        description="Generate a tiny Qwen2 model with random weights and an offline-trained tokenizer.\n"
        "It answers gibberish, fast, on any CPU: for trying ray-vram without a GPU or a model hub.\n\n"
        "examples:\n  ray-vram demo-model            # into $RAY_VRAM_CACHE/models/demo\n"
        "  ray-vram demo-model ./tiny --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", help=f"output directory (default {default_demo_dir()})")
    parser.add_argument("--force", action="store_true", help="regenerate even if a current copy exists")
    parser.add_argument(
        "--shape",
        choices=sorted(DEMO_SHAPES),
        default="tiny",
        help="tiny (default: 2 layers, any CPU) or gpu (about 1.5B parameters in bf16, for GPU measurements)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory) if args.directory else default_demo_dir()
    start = time.monotonic()
    if args.force or args.shape != "tiny":
        generate_demo_model(directory, shape=args.shape)
    else:
        ensure_demo_model(directory)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    print(f"demo model ready in {directory} ({size / 2**20:.1f} MiB, {time.monotonic() - start:.1f}s)")
    return ExitCode.OK
