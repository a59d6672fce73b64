"""What a replica inherits from whoever asks for it: the caller's cache paths, offline-hub and vLLM
settings, through the replica's Ray runtime env, and never a secret.

The controller passes this process's variables along with each deploy (`ControllerClient`, the
SDK on a Ray address), so a replica sees the environment of the process that deployed it.
Standard library only: the SDK imports it on machines without Ray.
"""

from __future__ import annotations

import os

from .config import ServingSettings

#: Environment variable holding the cluster's internal key (the same on every Ray node), which a
#: replica requires of the routers (`serving.internal_key`): a secret, never in a runtime env.
INTERNAL_KEY_ENV = "RAY_VRAM_INTERNAL_KEY"

#: Environment a replica inherits from whoever deploys it (caches, offline hub, vLLM knobs).
PASSED_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "RAY_VRAM_", "OMP_", "CUDA_DEVICE_ORDER")
PASSED_ENV = {"TMPDIR", "XDG_CACHE_HOME", "DO_NOT_TRACK", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "HOME"}
#: Secrets never passed: a Ray runtime env is stored in the GCS in plain text and shown to anyone
#: who can list actors. Replicas inherit these from their Ray node instead (the chart sets them
#: on every Ray container from Secrets). Besides these names, any variable with one of
#: `SECRET_WORDS` between its underscores (VLLM_API_KEY, ...) and the variable `serving.api_key_env`
#: names stay behind.
SECRET_ENV = frozenset(
    {"RAY_VRAM_API_KEY", INTERNAL_KEY_ENV, "RAY_VRAM_CONTROLLER_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
)
SECRET_WORDS = frozenset({"TOKEN", "KEY", "APIKEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"})


def is_secret(name: str) -> bool:
    """Whether the variable `name` may hold a secret (and so never goes into a runtime env)."""
    if name in SECRET_ENV:
        return True
    return name not in PASSED_ENV and not SECRET_WORDS.isdisjoint(name.upper().split("_"))


def without_secrets(env: dict[str, str], serving: ServingSettings | None = None) -> dict[str, str]:
    """`env` less every secret (`is_secret`, and the API key's variable `serving.api_key_env`)."""
    api_key_env = serving.api_key_env if serving is not None else None
    return {k: v for k, v in env.items() if not is_secret(k) and k != api_key_env}


def replica_env() -> dict[str, str]:
    """What replicas get from this process's environment through their runtime env (no secret)."""
    return without_secrets(
        {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)}
    )
