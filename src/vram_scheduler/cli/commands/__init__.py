"""Sub-commands of `ray-vram`; see `vram_scheduler.cli.main.COMMANDS`."""
