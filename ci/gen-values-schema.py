"""Writes charts/ray-vram/values.schema.json: the chart's own keys (strict, written here) merged with
the `models`, `placement` and `serving` sections generated from the pydantic models in
vram_scheduler.core.config, so that `helm install` rejects what the controller would reject.

JSON schema cannot say everything pydantic checks; the rules it can say are added here:
`replicas` and `max_replicas: true` together, and engine_kwargs keys that ray-vram sets itself
(from vram_gb/model/max_model_len, and from `media`).
(Unique model names are checked by the chart's templates.)

Usage: python ci/gen-values-schema.py [--check]   (--check: exit 1 when the committed file differs)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from vram_scheduler.core.config import config_json_schema
from vram_scheduler.core.engine_guard import ENGINE_ARG_ALIASES, OWNED_ENGINE_ARGS

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "charts" / "ray-vram" / "values.schema.json"


def owned_key_pattern() -> str:
    """Every spelling of an owned engine argument (what ModelSpec refuses after normalising keys):
    leading dashes, dashes or underscores, a `no-` prefix, a `.key` suffix, vLLM's aliases."""
    names = sorted({*OWNED_ENGINE_ARGS, *(a for a, d in ENGINE_ARG_ALIASES.items() if d in OWNED_ENGINE_ARGS)})
    words = "|".join(name.replace("_", "[-_]") for name in names)
    return f"^-*(no[-_])?({words})([.].*)?$"


Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None, description: str = "") -> Schema:
    """A closed object: unknown keys are errors."""
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def string(pattern: str | None = None, enum: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", **extra}
    if pattern:
        schema["pattern"] = pattern
    if enum:
        schema["enum"] = enum
    return schema


def integer(minimum: int | None = None, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


BOOL: Schema = {"type": "boolean"}
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_SHORT = r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$"
IPV4 = r"^$|^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$"
LOOPBACK_HOST = r"^(127\.[0-9.]+|::1|\[::1\]|localhost)$"
DURATION = r"^([0-9]+(ms|s|m|h))+$"
SECRET_NAME = r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
IMAGE = r"^[a-z0-9][a-zA-Z0-9./_:@-]*$"
PORT = integer(1, 65535)
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
# Kubernetes objects the chart passes through as they are (the API server validates them).
K8S_OBJECT: Schema = {"type": "object"}
K8S_LIST: Schema = {"type": "array", "items": {"type": "object"}}
RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
        "limits": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
    }
)

CPU_GROUP = obj(
    {
        "name": string(DNS_LABEL_SHORT),
        "replicas": integer(0, 1000),
        "minReplicas": integer(0, 1000),
        "maxReplicas": integer(0, 1000),
        "resources": RESOURCES,
        "nodeSelector": STRING_MAP,
        "tolerations": K8S_LIST,
        "routers": {"type": "boolean"},
    },
    required=["name"],
)
GPU_GROUP = obj(
    {
        "name": string(DNS_LABEL_SHORT),
        "replicas": integer(0, 1000),
        "gpusPerNode": integer(1, 16),
        "resources": RESOURCES,
        "nodeSelector": STRING_MAP,
        "tolerations": K8S_LIST,
    },
    required=["name"],
)


def chart_properties() -> dict[str, Schema]:
    """Every chart key except the generated configuration sections."""
    return {
        "global": {"type": "object"},
        "nameOverride": string(r"^$|" + DNS_LABEL),
        "fullnameOverride": string(r"^$|" + DNS_LABEL),
        "commonLabels": STRING_MAP,
        "image": obj({"repository": string(IMAGE), "tag": string(), "pullPolicy": string(enum=PULL_POLICIES)}),
        "imagePullSecrets": {"type": "array", "items": obj({"name": string()}, required=["name"])},
        # The subchart's own keys: any key of the kuberay-operator chart's values.
        "kuberay-operator": {"type": "object", "properties": {"enabled": BOOL}, "additionalProperties": True},
        "crds": obj(
            {
                "upgradeJob": obj(
                    {
                        "enabled": BOOL,
                        "image": string(IMAGE),
                        "unpackImage": string(IMAGE),
                        "ttlSecondsAfterFinished": integer(0),
                        "resources": RESOURCES,
                    }
                )
            }
        ),
        "rayCluster": obj(
            {
                "enabled": BOOL,
                "rayVersion": string(r"^[0-9]+\.[0-9]+\.[0-9]+$"),
                "tokenAuth": BOOL,
                "gcsFaultTolerance": {
                    **obj(
                        {
                            "enabled": BOOL,
                            "redisAddress": string(r"^$|^[A-Za-z0-9.-]+:[0-9]{1,5}$"),
                            "redisPasswordSecret": obj({"name": string(), "key": string()}),
                        }
                    ),
                    "if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
                    "then": {"properties": {"redisAddress": {"minLength": 1}}},
                },
                "head": obj(
                    {
                        "resources": RESOURCES,
                        "rayStartParams": {
                            "type": "object",
                            "additionalProperties": {"type": ["string", "number", "boolean"]},
                        },
                        "nodeSelector": STRING_MAP,
                        "tolerations": K8S_LIST,
                        "env": K8S_LIST,
                    }
                ),
                "cpuGroups": {"type": "array", "items": CPU_GROUP},
                "gpuGroups": {"type": "array", "items": GPU_GROUP},
                "podDisruptionBudget": obj({"enabled": BOOL}),
            }
        ),
        "gpu": obj(
            {
                "mode": string(enum=["runtimeClass", "hostMounts"]),
                "runtimeClassName": string(r"^$|" + DNS_LABEL),
                "resourceName": string(r"^[a-z0-9.-]+/[a-z0-9._-]+$"),
                "hostMounts": obj(
                    {"driverLibPath": string(r"^/"), "driverBinPath": string(r"^/"), "ldLibraryPath": string()}
                ),
                "cudaEnv": {
                    "type": "object",
                    "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                    "additionalProperties": {"type": ["string", "number", "boolean"]},
                },
            }
        ),
        "vllm": obj(
            {
                "source": string(enum=["image", "initContainer"]),
                "initContainer": obj(
                    {
                        "package": string(minLength=1),
                        "pipArgs": {"type": "array", "items": {"type": "string"}},
                        "volumeSize": string(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"),
                    }
                ),
            }
        ),
        "monitor": obj(
            {
                "enabled": BOOL,
                "image": obj({"repository": string(IMAGE), "tag": string()}),
                "port": PORT,
                "publish": BOOL,
                "extraArgs": {"type": "array", "items": {"type": "string"}},
                "nodeSelector": STRING_MAP,
                "tolerations": K8S_LIST,
                "resources": RESOURCES,
            }
        ),
        "controller": obj(
            {
                "enabled": BOOL,
                "extraArgs": {"type": "array", "items": {"type": "string"}},
                "resources": RESOURCES,
                "nodeSelector": STRING_MAP,
                "tolerations": K8S_LIST,
            }
        ),
        "apiKey": obj({"create": BOOL, "value": string(), "existingSecret": string(SECRET_NAME)}),
        "auth": obj(
            {
                "existingSecret": string(SECRET_NAME),
                "secretJob": obj({"enabled": BOOL, "ttlSecondsAfterFinished": integer(0), "resources": RESOURCES}),
                "controllerHosts": {"type": "array", "items": string(r"^[a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?$")},
            }
        ),
        "hfToken": obj({"existingSecret": string(SECRET_NAME), "key": string(r"^[-._a-zA-Z0-9]+$")}),
        "services": obj(
            {
                "dashboard": obj(
                    {"type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]), "annotations": STRING_MAP}
                ),
                "openai": obj(
                    {
                        "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                        "port": PORT,
                        "loadBalancerIP": string(IPV4),
                        "metallb": obj({"addressPool": string(), "allowSharedIP": string()}),
                        "annotations": STRING_MAP,
                    }
                ),
            }
        ),
        "networkPolicy": obj(
            {
                "enabled": BOOL,
                "openaiFrom": K8S_LIST,
                "dashboardFrom": K8S_LIST,
                "metricsFrom": K8S_LIST,
                "controllerFrom": K8S_LIST,
            }
        ),
        "monitoring": obj(
            {
                "prometheusOperator": string(enum=["auto", "always", "never"]),
                "labels": STRING_MAP,
                "interval": string(DURATION),
                "alerts": obj({"overBudgetFor": string(DURATION), "staleMonitorSeconds": integer(1)}),
                "dashboards": obj({"enabled": BOOL, "labels": STRING_MAP}),
            }
        ),
        "tests": obj(
            {
                "image": string(r"^$|" + IMAGE),
                "timeoutSeconds": integer(1),
                "stress": obj(
                    {
                        "enabled": BOOL,
                        "seconds": integer(1),
                        "gpuFraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.95},
                        "slowRatio": {"type": "number", "minimum": 0, "maximum": 1},
                        "nodes": {"type": "array", "items": string(minLength=1)},
                    }
                ),
            }
        ),
    }


PULL_POLICIES = ["Always", "IfNotPresent", "Never"]


def config_defs() -> dict[str, Schema]:
    """The pydantic models' schemas, with the rules JSON schema can say but pydantic does not emit."""
    defs = copy.deepcopy(config_json_schema("models")["$defs"])
    spec = defs["ModelSpec"]
    spec["not"] = {
        "required": ["replicas", "max_replicas"],
        "properties": {"max_replicas": {"const": True}},
    }
    spec["description"] += " Set either `replicas` or `max_replicas: true`, not both."
    # One never-valid schema per owned key, so that the error names the key itself, and a pattern
    # for every other spelling of it. Code-loading arguments depend on serving.allow_remote_code:
    # the controller refuses those when it reads the values.
    spec["properties"]["engine_kwargs"]["properties"] = {
        name: {"not": {}, "description": f"{why}; remove it"} for name, why in sorted(OWNED_ENGINE_ARGS.items())
    }
    spec["properties"]["engine_kwargs"]["propertyNames"] = {"not": {"pattern": owned_key_pattern()}}
    # An endpoint beyond loopback (the default host 0.0.0.0 is) needs api_key_env (ServingSettings).
    serving = defs["ServingSettings"]
    serving["if"] = {"not": {"required": ["host"], "properties": {"host": {"pattern": LOOPBACK_HOST}}}}
    serving["then"] = {"properties": {"api_key_env": {"type": "string", "minLength": 1}}}
    return defs


def build() -> Schema:
    properties = chart_properties()
    properties["models"] = {
        "type": "array",
        "description": "Models to serve (ray-vram's ModelSpec).",
        "items": {"$ref": "#/$defs/ModelSpec"},
    }
    properties["placement"] = {"$ref": "#/$defs/PlacementSettings"}
    properties["serving"] = {"$ref": "#/$defs/ServingSettings"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "ray-vram chart values",
        "description": "Generated by ci/gen-values-schema.py from the chart's keys and vram_scheduler.core.config.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "$defs": config_defs(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="Generate charts/ray-vram/values.schema.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python ci/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
