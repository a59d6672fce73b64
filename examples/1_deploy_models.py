"""Deploy every model of a config file (the values-file schema) and wait until they are ready.

    python examples/1_deploy_models.py [examples/models.yaml]

All models are planned together first: if not every replica fits, nothing is deployed and the
error says which model needs how much and where the largest free slot is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vram_scheduler import PlacementError, VRAMScheduler
from vram_scheduler.core.config import load_config

DEFAULT = Path(__file__).with_name("models.yaml")


def main(path: str | Path = DEFAULT) -> int:
    config = load_config(path)
    with VRAMScheduler() as scheduler:
        try:
            results = scheduler.deploy(config.models)  # progress: reserved → loading → ready
        except PlacementError as error:
            print(error, file=sys.stderr)
            return 3
        for result in results:
            print(result.summary())
        scheduler.display_vram_state()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT))
