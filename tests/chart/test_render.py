"""The chart lints and renders with Helm 4 and Helm 3 for every values file, and every rendered object
is valid: built-in kinds against Kubernetes 1.28 and 1.35 (strict), custom resources against their
CRDs with unknown fields forbidden; a kind with no schema fails."""

from __future__ import annotations

from functools import cache

import jsonschema
import kubernetes_validate
import pytest

from vram_scheduler.cli.main import build_parser
from vram_scheduler.core.config import parse_config

from .helm import CHART, VALUES_FILES, custom_resource_schemas, key, kuberay_values, render, run, tools

CASES = [None, *VALUES_FILES]


@cache
def crd_validator(api: tuple[str, str]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(custom_resource_schemas()[api])


IDS = ["defaults", *(p.name for p in VALUES_FILES)]
KUBE_VERSIONS = ["1.28.0", "1.35.0"]


def test_every_example_and_scenario_exists() -> None:
    names = {p.name for p in VALUES_FILES}
    assert {"k3s-3cpu-3gpu-metallb.yaml", "gpu-workstation.yaml", "cpu-only.yaml"} <= names
    assert len([n for n in names if n.endswith("-values.yaml")]) >= 4, names


@pytest.mark.parametrize("helm", ["helm", "helm3"])
@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_lint_strict_and_template(helm: str, values) -> None:
    binary = getattr(tools(), helm)
    args = [binary, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run(args)
    assert "0 chart(s) failed" in result.stdout, result.stdout
    docs = render(helm=binary, values=[values] if values else [])
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Deployment", "ConfigMap", "Service"} <= kinds, kinds


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_models_in_values_are_valid_config(values) -> None:
    """The same values the chart accepts, the controller's own schema (pydantic) accepts."""
    import yaml

    data = yaml.safe_load(values.read_text()) if values else {}
    config = parse_config({k: data[k] for k in ("models", "placement", "serving") if k in data}, str(values))
    assert config.models or values is None or "models" not in data


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_every_object_validates(values, kube_version: str) -> None:
    docs = render(values=[values] if values else [], kube_version=kube_version)
    problems = []
    for doc in docs:
        api = (doc["apiVersion"], doc["kind"])
        if api in custom_resource_schemas():
            for error in crd_validator(api).iter_errors(doc):
                where = ".".join(str(p) for p in error.absolute_path) or "(root)"
                problems.append(f"{key(doc)}: {where}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{key(doc)} ({api[0]}): no Kubernetes {kube_version} schema and no CRD")
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.absolute_path) or "(root)"
            problems.append(f"{key(doc)}: {where}: {error.message}")
    assert not problems, "\n".join(problems)


def test_validation_catches_unknown_fields_and_kinds() -> None:
    """The checks above are not vacuous: an unknown RayCluster field, an unknown Deployment field and
    an unknown kind are each reported."""
    schemas = custom_resource_schemas()
    docs = render()
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    errors = list(jsonschema.Draft7Validator(schemas[("ray.io/v1", "RayCluster")]).iter_errors(cluster))
    assert any("rayStartParam" in e.message for e in errors), [e.message for e in errors]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and "controller" in d["metadata"]["name"])
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.35.0", strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "example.com/v1", "kind": "Widget"}, "1.35.0", strict=True)


def _ray_vram_commands(node) -> list[list[str]]:
    """Every container `command` + `args` of a rendered object that runs the `ray-vram` CLI."""
    if isinstance(node, list):
        return [c for item in node for c in _ray_vram_commands(item)]
    if not isinstance(node, dict):
        return []
    command = node.get("command")
    own = [command + node.get("args", [])] if isinstance(command, list) and command[:1] == ["ray-vram"] else []
    return own + [c for value in node.values() for c in _ray_vram_commands(value)]


def test_the_charts_ray_vram_commands_use_the_canonical_flags(capsys) -> None:
    """The containers call the CLI with today's flags (-f/--values, --ray-address), never a deprecated
    spelling: parsing each command prints no warning."""
    docs = render(sets=["tests.stress.enabled=true"])
    commands = _ray_vram_commands(docs)
    assert {c[1] for c in commands} >= {"serve", "monitor", "check"}, commands
    capsys.readouterr()
    for command in commands:
        build_parser().parse_args(command[1:])
    assert capsys.readouterr().err == ""


def _paths(data, prefix: str = ""):
    if isinstance(data, dict):
        for name, value in data.items():
            path = f"{prefix}.{name}" if prefix else name
            yield path
            yield from _paths(value, path)


#: kuberay-operator keys holding Kubernetes objects: their inner fields are the API server's to check.
KUBERNETES_OBJECT_KEYS = {
    "resources",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
}


def _lookup(data, path: str) -> bool:
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        if part in KUBERNETES_OBJECT_KEYS:
            return True
        node = node[part]
    return True


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_kuberay_operator_overrides_are_real_keys(values) -> None:
    import yaml

    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    sources = [chart_values] + ([yaml.safe_load(values.read_text())] if values else [])
    reference = kuberay_values()
    unknown = [
        f"kuberay-operator.{path}"
        for source in sources
        for path in _paths(source.get("kuberay-operator") or {})
        # `enabled` is the dependency's condition in Chart.yaml, not a value of the subchart.
        if path != "enabled" and not _lookup(reference, path)
    ]
    assert not unknown, f"not keys of kuberay-operator 1.7.0's values.yaml: {unknown}"
    assert chart_values["kuberay-operator"].keys() - {"enabled"}, "the chart overrides some operator keys"
