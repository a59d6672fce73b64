"""ray-vram: VRAM-aware LLM serving on Ray."""

__version__ = "0.1.0"
