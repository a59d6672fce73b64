"""Shut down one model, or every model, and show that its VRAM reservations are freed.

    python examples/0_shutdown_models.py              # every model
    python examples/0_shutdown_models.py example-demo # one model

The controller is found at $RAY_VRAM_CONTROLLER (default http://127.0.0.1:8080, `ray-vram up`).
"""

from __future__ import annotations

import sys

from vram_scheduler import VRAMScheduler


def main(model_id: str | None = None) -> None:
    with VRAMScheduler() as scheduler:
        removed = scheduler.shutdown(model_id)  # idempotent: nothing to remove is not an error
        print(f"removed: {', '.join(removed) or 'nothing'}")
        scheduler.display_vram_state()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
