"""`python -m vram_scheduler.monitor`: the same as `ray-vram monitor`, importing only the monitor."""

import sys

from .command import main

sys.exit(main())
