"""Running the real Helm/kubectl binaries on the chart, and the reference data the tests check against."""

from __future__ import annotations

import copy
import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ray-vram"
DATA = Path(__file__).resolve().parent / "data"
KUBERAY_TGZ = CHART / "charts" / "kuberay-operator-1.7.0.tgz"
#: Where CI keeps the reference copy of KubeRay's release data (beside the clone); optional.
SHARED_KUBERAY = ROOT.parent / "shared" / "kuberay-v1.7.0"
#: Values files rendered by every test: the chart's defaults, the examples and the CI scenarios.
VALUES_FILES = sorted(
    [
        *(ROOT / "values").glob("k3s-*.yaml"),
        ROOT / "values" / "gpu-workstation.yaml",
        ROOT / "values" / "cpu-only.yaml",
        *(CHART / "ci").glob("*-values.yaml"),
    ]
)

Doc = dict[str, Any]
#: libyaml's loader: the rendered chart holds ~250 kB of base64 that the pure-Python parser takes seconds on.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=_LOADER)


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_LOADER))


@dataclass(frozen=True)
class Tools:
    helm: str
    helm3: str
    kubectl: str


@cache
def tools() -> Tools:
    """Install (cached) Helm 4, Helm 3 and kubectl with the project's script."""
    out = subprocess.run(
        ["bash", str(ROOT / "ci" / "install-helm.sh")], check=True, capture_output=True, text=True
    ).stdout
    bin_dir = Path(out.strip().splitlines()[-1])
    return Tools(str(bin_dir / "helm"), str(bin_dir / "helm3"), str(bin_dir / "kubectl"))


def helm_env(home: Path | None = None) -> dict[str, str]:
    """Helm's own folders in one place, away from the user's (no repositories, no plugins)."""
    base = home or (ROOT / ".work" / "helm-home")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(base / "cache"),
        "HELM_CONFIG_HOME": str(base / "config"),
        "HELM_DATA_HOME": str(base / "data"),
    }


def run(cmd: Sequence[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, env=env or helm_env(), cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr}\n{result.stdout[-2000:]}")
    return result


def template_args(
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
    api_versions: Iterable[str] = (),
    kube_version: str | None = None,
    release: str = "rv",
    namespace: str = "ray-vram",
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    for api in api_versions:
        args += ["--api-versions", api]
    if kube_version:
        args += ["--kube-version", kube_version]
    return args


def render(*, helm: str | None = None, **kwargs: Any) -> list[Doc]:
    """`helm template` → the list of rendered objects (hooks and tests included)."""
    out = run([helm or tools().helm, *template_args(**kwargs)]).stdout
    return [doc for doc in load_all(out) if doc]


def render_fails(*, helm: str | None = None, **kwargs: Any) -> str:
    """`helm template` that must fail → its error output."""
    result = run([helm or tools().helm, *template_args(**kwargs)], check=False)
    assert result.returncode != 0, f"helm template accepted values it should refuse: {kwargs}"
    return result.stderr


def key(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def by_key(docs: Iterable[Doc]) -> dict[str, Doc]:
    return {key(doc): doc for doc in docs}


def find(docs: Iterable[Doc], kind: str, suffix: str = "") -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"expected one {kind} named *{suffix}, got {[key(d) for d in matches]}"
    return matches[0]


def is_hook(doc: Doc) -> bool:
    return "helm.sh/hook" in (doc.get("metadata", {}).get("annotations") or {})


@cache
def kuberay_chart_files() -> dict[str, bytes]:
    """Every file of the vendored kuberay-operator chart, by path inside the archive."""
    with tarfile.open(KUBERAY_TGZ) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


@cache
def kuberay_crds() -> dict[str, Doc]:
    """KubeRay 1.7.0's CRDs (from the vendored chart), by file name."""
    files = kuberay_chart_files()
    return {
        Path(name).name: load(data)
        for name, data in files.items()
        if name.startswith("kuberay-operator/crds/") and name.endswith(".yaml")
    }


@cache
def kuberay_values() -> Doc:
    return load(kuberay_chart_files()["kuberay-operator/values.yaml"])


@cache
def monitoring_crds() -> dict[str, Doc]:
    """The Prometheus Operator CRDs the chart creates objects of (tests/chart/data, gzipped)."""
    return {
        path.name.removesuffix(".gz"): load(gzip.decompress(path.read_bytes()))
        for path in sorted(DATA.glob("monitoring.coreos.com_*.yaml.gz"))
    }


def closed_schema(schema: Doc) -> Doc:
    """A CRD's structural schema with unknown fields forbidden wherever the CRD does not keep
    them (`x-kubernetes-preserve-unknown-fields`): the API server would silently drop them."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if (
            node.get("type") == "object"
            and "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node
        ):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        for name in ("items", "additionalProperties"):
            if isinstance(node.get(name), dict):
                walk(node[name])
        for name in ("allOf", "anyOf", "oneOf"):
            for child in node.get(name, []):
                walk(child)

    walk(schema)
    return schema


@cache
def custom_resource_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) → closed openAPIV3Schema, for KubeRay's and the Prometheus Operator's kinds."""
    schemas = {}
    for crd in [*kuberay_crds().values(), *monitoring_crds().values()]:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if schema:
                schemas[(f"{group}/{version['name']}", kind)] = closed_schema(schema)
    return schemas


def for_k8s120(crd: Doc) -> Doc:
    """A CRD the 1.20 API server of the tests accepts: without CEL rules (`x-kubernetes-validations`),
    empty-string defaults (read as null there) and list-map keys that then lack a default. Everything
    else (types, enums, required fields) the server still enforces."""
    crd = copy.deepcopy(crd)

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("x-kubernetes-validations", None)
            if node.get("x-kubernetes-list-type") == "map":
                node.pop("x-kubernetes-list-type")
                node.pop("x-kubernetes-list-map-keys", None)
            if "default" in node and node["default"] in (None, ""):
                node.pop("default")
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(crd)
    return crd


def dump_all(docs: Iterable[Doc]) -> str:
    stream = io.StringIO()
    yaml.safe_dump_all(list(docs), stream, sort_keys=False)
    return stream.getvalue()
