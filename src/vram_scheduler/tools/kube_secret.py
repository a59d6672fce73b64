"""Create the release's generated Secret in Kubernetes when it is missing, add keys it lacks, and
never change a key it has: what the chart's pre-install/pre-upgrade hook Job runs.

Why a Job and not the template: a random value in a template (`randAlphaNum`) changes on every
`helm template`, so GitOps tools would see a new Secret on every render, and `lookup` returns
nothing there. Generated here, inside the cluster, the rendered manifests carry no random data and
stay the same across renders, while the values survive upgrades (only missing keys are created).
Rotation is removing a key and running the Job again (`helm upgrade`).

Talks to the API server with the pod's service account (token and CA from the standard mount) over
httpx, which the package depends on anyway; no Kubernetes client library needed.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..core.errors import RayVramError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER_API = "https://kubernetes.default.svc"


class KubeSecretError(RayVramError, RuntimeError):
    """The API server refused or failed a Secret call."""


@dataclass(frozen=True)
class KubeAPI:
    """Where the API server is and how this process proves who it is."""

    server: str = IN_CLUSTER_API
    token_file: Path = SERVICE_ACCOUNT / "token"
    ca_file: Path = SERVICE_ACCOUNT / "ca.crt"

    def client(self) -> httpx.Client:
        token = self.token_file.read_text().strip()
        return httpx.Client(
            base_url=self.server.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            verify=str(self.ca_file),
            timeout=30.0,
        )


def random_value() -> str:
    """64 hex digits (256 bits)."""
    return secrets.token_hex(32)


def _decoded(secret: dict, key: str) -> str | None:
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise KubeSecretError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")


def ensure_secret(
    api: KubeAPI,
    namespace: str,
    name: str,
    keys: list[str],
    copy_from: dict[str, tuple[str, str]] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Make Secret `namespace/name` hold every one of `keys`: existing values kept, missing ones
    generated, or taken from another Secret first (`copy_from`: key -> (secret, key), used when an
    earlier release kept that value elsewhere). Returns {"created": [...], "kept": [...], "copied": [...]}."""
    path = f"/api/v1/namespaces/{namespace}/secrets"
    copied: list[str] = []
    with api.client() as client:
        response = client.get(f"{path}/{name}")
        exists = response.status_code == 200
        if not exists and response.status_code != 404:
            _check(response, f"reading Secret {namespace}/{name}")
        current = response.json() if exists else {}
        kept = [key for key in keys if _decoded(current, key)]
        values: dict[str, str] = {}
        for key in keys:
            if key in kept:
                continue
            source = (copy_from or {}).get(key)
            if source is not None:
                old = client.get(f"{path}/{source[0]}")
                if old.status_code == 200 and _decoded(old.json(), source[1]):
                    values[key] = _decoded(old.json(), source[1]) or ""
                    copied.append(key)
                    continue
                if old.status_code not in (200, 404):
                    _check(old, f"reading Secret {namespace}/{source[0]}")
            values[key] = random_value()
        data = {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}
        if not exists:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
                "type": "Opaque",
                "data": data,
            }
            _check(client.post(path, json=body), f"creating Secret {namespace}/{name}")
        elif data:
            patch = client.patch(
                f"{path}/{name}", json={"data": data}, headers={"Content-Type": "application/merge-patch+json"}
            )
            _check(patch, f"adding {sorted(data)} to Secret {namespace}/{name}")
    return {"created": sorted(set(values) - set(copied)), "kept": kept, "copied": copied}
