"""Writes charts/ray-vram/README.md from the `# --` comments of charts/ray-vram/values.yaml, and
refuses a values.yaml with a key that has no comment (a section key may go without one when every
key under it has one).

Usage: python ci/chart-docs.py [--check]   (--check: exit 1 when README.md differs or a key lacks a comment)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "ray-vram"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?: |$)")


@dataclass
class Key:
    path: str
    description: str | None


def parse_keys(text: str) -> list[Key]:
    """Every mapping key of a values file with the `# --` comment above it (list items are values)."""
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    list_owner_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if list_owner_indent is not None and stripped and indent > list_owner_indent:
            continue  # inside a list value
        list_owner_indent = None
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
        elif stripped.startswith("#"):
            if pending:
                pending.append(stripped[1:].strip())
        elif not stripped:
            pending = []
        elif stripped.startswith("- "):
            list_owner_indent = stack[-1][0] if stack else -1
            pending = []
        elif match := KEY_LINE.match(line):
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match["key"]))
            keys.append(Key(".".join(k for _, k in stack), " ".join(pending) or None))
            pending = []
    return keys


def undocumented(keys: list[Key]) -> list[str]:
    """Keys that need a comment and lack one: a key is documented by its own comment, by one on an
    ancestor (it is part of that value), or by every key under it having one."""
    by_path = {k.path: k for k in keys}
    children: dict[str, list[str]] = {}
    for k in keys:
        children.setdefault(k.path.rpartition(".")[0], []).append(k.path)

    def covered(path: str) -> bool:
        kids = children.get(path, [])
        return bool(by_path[path].description) or (bool(kids) and all(covered(kid) for kid in kids))

    def ancestor_documented(path: str) -> bool:
        parts = path.split(".")
        return any(by_path[".".join(parts[:i])].description for i in range(1, len(parts)))

    return [k.path for k in keys if not ancestor_documented(k.path) and not covered(k.path)]


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def render(text: str) -> str:
    values = yaml.safe_load(text)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    rows = []
    for key in parse_keys(text):
        if not key.description:
            continue
        default = json.dumps(lookup(values, key.path), separators=(", ", ": "))
        if len(default) > 80:
            default = default[:77] + "..."
        cells = [f"`{key.path}`", f"`{default}`", key.description]
        rows.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
    deps = "\n".join(f"| {d['name']} | {d['version']} | {d['repository']} |" for d in chart.get("dependencies", []))
    return (
        f"""# ray-vram Helm chart

{chart["description"]}

Version {chart["version"]}, application version {chart["appVersion"]}, Kubernetes {chart["kubeVersion"]}.

```bash
helm install ray-vram charts/ray-vram -n ray-vram --create-namespace -f values/gpu-workstation.yaml
helm upgrade ray-vram charts/ray-vram -n ray-vram -f my-values.yaml   # changed models: only the controller restarts
helm test ray-vram -n ray-vram   # /v1/models, one completion per model, allocator state
```

Examples: `values/k3s-3cpu-3gpu-metallb.yaml` (3 CPU + 3 GPU nodes, MetalLB, host-mounted driver),
`values/gpu-workstation.yaml` (one node, NVIDIA runtime), `values/cpu-only.yaml`; more combinations
in `ci/*-values.yaml`. `values.schema.json` checks every key; its `models`, `placement` and
`serving` sections are generated from ray-vram's configuration models (`python ci/gen-values-schema.py`).

## Dependencies

| chart | version | repository |
|---|---|---|
{deps}

The dependency is vendored (`charts/kuberay-operator-1.7.0.tgz`, with `Chart.lock`): installing
needs no access to the chart repository. `hack/vendor-kuberay-operator.sh` rebuilds both from
KubeRay's git tag with `helm dependency update`.

KubeRay's CRDs: Helm installs a dependency's `crds/` on first install only and never upgrades
them, and they are too large for client-side apply. With `crds.upgradeJob.enabled` (default) a
pre-install/pre-upgrade hook Job applies the same CRDs with `kubectl apply --server-side`. Without
it, upgrade them yourself: `helm pull`/untar the kuberay-operator chart and run
`kubectl apply --server-side --force-conflicts -f kuberay-operator/crds/`.

## Values

Generated from the comments in `values.yaml` by `python ci/chart-docs.py`.

| key | default | description |
|---|---|---|
"""
        + "\n".join(rows)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate charts/ray-vram/README.md from values.yaml comments.")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale or a key lacks a comment")
    args = parser.parse_args()
    text = (CHART / "values.yaml").read_text()
    missing = undocumented(parse_keys(text))
    if missing:
        print("values.yaml keys without a `# --` comment: " + ", ".join(missing), file=sys.stderr)
        return 1
    readme = render(text)
    target = CHART / "README.md"
    if args.check:
        if not target.exists() or target.read_text() != readme:
            print(f"{target} is out of date: run python ci/chart-docs.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
