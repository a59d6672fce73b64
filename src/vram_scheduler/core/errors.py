"""The one base of every error ray-vram raises on purpose.

`except RayVramError` catches any of them; each specific error also keeps its former base
(ValueError, RuntimeError), so existing `except ValueError` clauses still catch it.
"""

from __future__ import annotations


class RayVramError(Exception):
    """Base of ray-vram's own errors; the message names what, where and by how much."""
