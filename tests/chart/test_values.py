"""Bad values are refused by `helm template` (schema or template checks) with the key named;
values.schema.json is what the generator writes; the schema and pydantic agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vram_scheduler.core.config import ConfigError, parse_config

from .helm import CHART, ROOT, render_fails, tools

MODEL = "models[0].model_id=m,models[0].model=org/m"

# (case id, --set values, the key the message must name: Helm 4 says /a/0/b, Helm 3 says a.0.b)
BAD_VALUES = [
    ("negative-vram", [MODEL, "models[0].vram_gb=-3"], "models/0/vram_gb"),
    ("zero-replicas", [MODEL, "models[0].vram_gb=4", "models[0].replicas=0"], "models/0/replicas"),
    (
        "replicas-and-max-replicas",
        [MODEL, "models[0].vram_gb=4", "models[0].replicas=2", "models[0].max_replicas=true"],
        "models/0",
    ),
    (
        "bad-model-id",
        ["models[0].model_id=Qwen_7B", "models[0].model=org/m", "models[0].vram_gb=4"],
        "models/0/model_id",
    ),
    ("missing-vram", [MODEL], "models/0"),
    ("unknown-model-key", [MODEL, "models[0].vram_gb=4", "models[0].vram=4"], "models/0"),
    (
        "engine-kwargs-owned",
        [MODEL, "models[0].vram_gb=4", "models[0].engine_kwargs.gpu_memory_utilization=0.9"],
        "models/0/engine_kwargs/gpu_memory_utilization",
    ),
    ("unknown-top-key", ["modles[0].model_id=x"], "modles"),
    ("unknown-nested-key", ["rayCluster.head.replicas=2"], "rayCluster/head"),
    ("wrong-gpu-mode", ["gpu.mode=passthrough"], "gpu/mode"),
    (
        "malformed-ip",
        ["services.openai.type=LoadBalancer", "services.openai.loadBalancerIP=10.0.0.300"],
        "services/openai/loadBalancerIP",
    ),
    ("service-type", ["services.openai.type=Ingress"], "services/openai/type"),
    ("monitor-port", ["monitor.port=70000"], "monitor/port"),
    ("vllm-source", ["vllm.source=conda"], "vllm/source"),
    (
        "gpus-per-node",
        ["rayCluster.gpuGroups[0].name=gpu", "rayCluster.gpuGroups[0].gpusPerNode=0"],
        "rayCluster/gpuGroups/0/gpusPerNode",
    ),
    ("group-name", ["rayCluster.gpuGroups[0].name=GPU_Big"], "rayCluster/gpuGroups/0/name"),
    ("token-auth-type", ["rayCluster.tokenAuth=maybe"], "rayCluster/tokenAuth"),
    ("prometheus-mode", ["monitoring.prometheusOperator=yes"], "monitoring/prometheusOperator"),
    ("negative-overhead", ["placement.replica_overhead_gb=-1"], "placement/replica_overhead_gb"),
    ("serving-port", ["serving.port=0"], "serving/port"),
    ("redis-required", ["rayCluster.gcsFaultTolerance.enabled=true"], "rayCluster/gcsFaultTolerance"),
    ("pull-policy", ["image.pullPolicy=Sometimes"], "image/pullPolicy"),
    ("scrape-interval", ["monitoring.interval=30"], "monitoring/interval"),
]


def names_key(message: str, path: str) -> bool:
    dotted = path.replace("/", ".")
    return f"/{path}" in message or dotted in message


@pytest.mark.parametrize("helm", ["helm", "helm3"])
@pytest.mark.parametrize(("sets", "path"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(helm: str, sets: list[str], path: str) -> None:
    message = render_fails(helm=getattr(tools(), helm), sets=sets)
    assert names_key(message, path), f"message does not name {path}:\n{message}"


def test_at_least_twelve_bad_values() -> None:
    assert len(BAD_VALUES) >= 12


def test_duplicate_model_names_are_refused_naming_both() -> None:
    sets = [MODEL, "models[0].vram_gb=4", "models[1].model_id=n", "models[1].model=org/n", "models[1].vram_gb=4"]
    message = render_fails(sets=[*sets, "models[1].router_name=m"])
    assert 'models[1]: model name "m" is already used by models[0]' in message, message


def test_schema_file_is_generated() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "gen-values-schema.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_schema_model_section_comes_from_pydantic() -> None:
    from vram_scheduler.core.config import config_json_schema

    schema = json.loads((CHART / "values.schema.json").read_text())
    generated = config_json_schema("models")["$defs"]
    for name, definition in generated.items():
        ours = schema["$defs"][name]
        assert ours["properties"].keys() == definition["properties"].keys(), name
        assert ours.get("required") == definition.get("required"), name
    assert schema["properties"]["models"]["items"] == {"$ref": "#/$defs/ModelSpec"}


@pytest.mark.parametrize(
    "model",
    [
        {"model_id": "m", "model": "org/m", "vram_gb": 4, "replicas": 2, "max_replicas": True},
        {"model_id": "m", "model": "org/m", "vram_gb": 4, "engine_kwargs": {"kv_cache_memory_bytes": 1}},
        {"model_id": "m", "model": "org/m", "vram_gb": 0},
    ],
    ids=["replicas-and-max", "owned-engine-kwarg", "zero-vram"],
)
def test_schema_rules_match_pydantic(model: dict, tmp_path: Path) -> None:
    """Each rule the generator adds is one pydantic enforces too: chart and controller agree."""
    with pytest.raises(ConfigError):
        parse_config({"models": [model]})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"models": [model]}))
    render_fails(values=[values])


@pytest.mark.parametrize(
    "serving",
    [{"api_key_env": None}, {"host": "10.0.0.5", "api_key_env": ""}],
    ids=["default-host-no-key", "address-empty-key"],
)
def test_an_endpoint_beyond_loopback_without_api_key_env_is_refused_by_both(serving: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"serving\.api_key_env"):
        parse_config({"serving": serving})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"serving": serving}))
    assert names_key(render_fails(values=[values]), "serving/api_key_env")


def test_a_loopback_endpoint_without_api_key_env_is_accepted(tmp_path: Path) -> None:
    from .helm import render

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"serving": {"host": "127.0.0.1", "api_key_env": None}}))
    render(values=[values])


def test_max_replicas_alone_and_replicas_alone_are_accepted(tmp_path: Path) -> None:
    from .helm import render

    values = tmp_path / "values.yaml"
    models = [
        {"model_id": "a", "model": "org/a", "vram_gb": 4, "max_replicas": True},
        {"model_id": "b", "model": "org/b", "vram_gb": 4, "replicas": 3, "max_replicas": False},
    ]
    values.write_text(yaml.safe_dump({"models": models}))
    parse_config({"models": models})
    assert render(values=[values])
