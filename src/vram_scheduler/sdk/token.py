"""The client side of the controller API's token (SDK, CLI, inference helpers): an explicit token,
else `$RAY_VRAM_CONTROLLER_TOKEN`, else the installation's token file when it exists.

Standard library only: the SDK imports it on machines without Ray.
"""

from __future__ import annotations

import os

from ..core.installation import TOKEN_ENV, token_file


def client_token(explicit: str | None = None) -> str | None:
    """The token a client sends: `explicit`, else $RAY_VRAM_CONTROLLER_TOKEN, else the local token file."""
    if explicit:
        return explicit.strip()
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    try:
        return token_file().read_text().strip() or None
    except OSError:
        return None


def auth_headers(explicit: str | None = None) -> dict[str, str]:
    token = client_token(explicit)
    return {"Authorization": f"Bearer {token}"} if token else {}


def where_to_find_token() -> str:
    """Client-side advice for a refused call."""
    return (
        f"pass the controller token (token=, --token, or ${TOKEN_ENV}); `ray-vram up` keeps it in "
        f"{token_file()}, a Helm release in its Secret <release>-ray-vram-auth: kubectl -n NAMESPACE get secret "
        "<release>-ray-vram-auth -o jsonpath='{.data.controller-token}' | base64 -d"
    )
