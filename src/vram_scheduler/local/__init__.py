"""Local mode (`ray-vram up`): one machine's Ray, monitor, controller and router."""
