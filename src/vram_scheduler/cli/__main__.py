"""`python -m vram_scheduler.cli`: the same as `ray-vram`."""

import sys

from .main import main

sys.exit(main())
