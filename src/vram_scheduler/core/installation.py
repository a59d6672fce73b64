"""Where an installation keeps what outlives caches and runs: its configuration directory and the
controller token's file and environment variable, named once for the server side
(`serving.controller.auth`) and the client side (`sdk.token`).

Standard library only: the SDK imports it on machines without Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "RAY_VRAM_CONTROLLER_TOKEN"
TOKEN_FILE = "controller-token"


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/ray-vram` (default `~/.config/ray-vram`): what outlives caches and runs."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ray-vram"


def token_file() -> Path:
    return config_dir() / TOKEN_FILE
