"""Turn a node's GPUs into `ray start` options, so that one pod spec serves any GPU node.

The node entrypoint (`ray-vram node-start`) reads the GPUs it can see through NVML and adds to
the `ray start` command: the GPU count (`--num-gpus`) and node labels with the GPU model and the
Kubernetes node name. The node's VRAM is the allocator's to account (from the monitors'
inventories): no Ray custom resource carries it.
A node without GPUs gets none of the GPU options: whatever the caller passed stays as it is.

The command may come from the caller or from KubeRay: with the pod annotation
``ray.io/overwrite-container-cmd: "true"`` KubeRay leaves the container command alone and puts the
`ray start` command it generated from `rayStartParams` in ``KUBERAY_GEN_RAY_START_CMD``; its
``--num-gpus``, ``--resources`` and ``--labels`` are merged with what was detected here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field

from ..core.config import ConfigError, StrictModel
from ..core.inventory import load_inventory
from ..core.ray_names import LABEL_PREFIX, NODE_NAME_LABEL

#: Where KubeRay puts the `ray start` command it generated for a pod.
KUBERAY_COMMAND_ENV = "KUBERAY_GEN_RAY_START_CMD"


#: Ray's own options that this module sets and therefore merges with the caller's.
_MERGED_OPTIONS = ("--num-gpus", "--resources", "--labels")

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class NodeGPU(StrictModel):
    """What `ray start` needs to know about one GPU of this node."""

    index: int = Field(ge=0)
    uuid: str
    name: str
    total_bytes: int = Field(gt=0)


class NodeStart(StrictModel):
    """The `ray start` command for this node and where its GPU options came from."""

    role: Literal["head", "worker"]
    node_name: str
    gpu_source: Literal["nvml", "file", "none"]
    gpus: list[NodeGPU]
    num_gpus: int | None = Field(description="None on a node without GPUs: Ray's own default applies.")
    resources: dict[str, float]
    labels: dict[str, str]
    command: list[str]
    notes: list[str] = Field(default_factory=list, description="Caller options replaced by detected values.")


def label_value(text: str) -> str:
    """`text` made into a valid Ray/Kubernetes label value ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:63].rstrip("-_.")
    return value or "unknown"


def node_labels(gpus: Sequence[NodeGPU], node_name: str) -> dict[str, str]:
    """The node name always; the GPU model ("mixed" where models differ) and count only where there are GPUs."""
    labels = {NODE_NAME_LABEL: label_value(node_name)}
    if gpus:
        models = {label_value(g.name) for g in gpus}
        labels[f"{LABEL_PREFIX}gpu-model"] = models.pop() if len(models) == 1 else "mixed"
        labels[f"{LABEL_PREFIX}gpu-count"] = str(len(gpus))
    return labels


def kuberay_args(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The arguments of KubeRay's generated `ray start` command, or None where KubeRay set none."""
    environ = os.environ if environ is None else environ
    generated = environ.get(KUBERAY_COMMAND_ENV, "").strip()
    if not generated:
        return None
    try:
        words = shlex.split(generated)
    except ValueError as error:
        raise ConfigError(KUBERAY_COMMAND_ENV, [f"cannot split {generated!r} into words: {error}"]) from None
    if words[:2] != ["ray", "start"]:
        raise ConfigError(KUBERAY_COMMAND_ENV, [f"expected a `ray start ...` command, got {generated!r}"])
    # bash -c "$KUBERAY_GEN_RAY_START_CMD" would expand variables such as $FQ_RAY_IP: do the same.
    return [_expand(word, environ) for word in words[2:]]


def _expand(word: str, environ: Mapping[str, str]) -> str:
    """$NAME and ${NAME} replaced from `environ`; unknown names left as written."""
    return re.sub(
        r"\$(?:\{(\w+)\}|(\w+))",
        lambda m: environ.get(m.group(1) or m.group(2), m.group(0)),
        word,
    )


def _take_options(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split the merged options (`--opt value` or `--opt=value`) out of `args`."""
    rest: list[str] = []
    taken: dict[str, str] = {}
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name in _MERGED_OPTIONS:
            if not eq:
                if i + 1 >= len(words):
                    raise ConfigError("ray start arguments", [f"{name}: missing value"])
                value = words[i + 1]
                i += 1
            taken[name] = value
        else:
            rest.append(word)
        i += 1
    return rest, taken


def _parse_resources(text: str) -> dict[str, float]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("ray start arguments", [f"--resources: not JSON ({error}): {text!r}"]) from None
    if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
        raise ConfigError("ray start arguments", [f"--resources: expected a JSON object of numbers, got {text!r}"])
    return {str(k): float(v) for k, v in data.items()}


def _parse_labels(text: str) -> dict[str, str]:
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError("ray start arguments", [f"--labels: not JSON ({error}): {text!r}"]) from None
        if not isinstance(data, dict):
            raise ConfigError("ray start arguments", [f"--labels: expected a JSON object, got {text!r}"])
        return {str(k): str(v) for k, v in data.items()}
    labels = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError("ray start arguments", [f"--labels: {pair!r} is not key=value"])
        labels[key.strip()] = value.strip()
    return labels


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def build_node_start(
    role: Literal["head", "worker"],
    ray_args: Sequence[str],
    gpus: Sequence[NodeGPU],
    node_name: str,
    gpu_source: Literal["nvml", "file", "none"] = "nvml",
) -> NodeStart:
    """The `ray start --block` command for this node: the caller's arguments plus what its GPUs say.

    Detected values win over the caller's `--num-gpus` and over same-named labels (each replacement
    is listed in `notes`); the caller's `--resources` pass through; on a node without GPUs the
    caller's options stay.
    """
    rest, taken = _take_options(ray_args)
    if role == "worker" and "--head" in rest:
        raise ConfigError("ray start arguments", ["--head given to a worker node: use `node-start head`"])
    if role == "worker" and not any(w == "--address" or w.startswith("--address=") for w in rest):
        raise ConfigError(
            "ray start arguments",
            [f"a worker needs --address=HEAD:PORT (or KubeRay's {KUBERAY_COMMAND_ENV} in its environment)"],
        )
    notes: list[str] = []
    resources = _parse_resources(taken["--resources"]) if "--resources" in taken else {}
    labels = _parse_labels(taken["--labels"]) if "--labels" in taken else {}
    num_gpus: int | None = None
    if gpus:
        num_gpus = len(gpus)
        if "--num-gpus" in taken and taken["--num-gpus"].strip() != str(num_gpus):
            notes.append(f"--num-gpus {taken['--num-gpus']} replaced by {num_gpus} (GPUs visible through {gpu_source})")
    elif "--num-gpus" in taken:
        num_gpus_text = taken["--num-gpus"]
        try:
            num_gpus = int(float(num_gpus_text))
        except ValueError:
            raise ConfigError("ray start arguments", [f"--num-gpus: not a number: {num_gpus_text!r}"]) from None
    for key, value in node_labels(gpus, node_name).items():
        if key in labels and labels[key] != value:
            notes.append(f"label {key}={labels[key]} replaced by {value} (detected)")
        labels[key] = value
    for key, value in labels.items():
        if not _LABEL_VALUE.match(value):
            raise ConfigError("ray start arguments", [f"--labels: value of {key!r} is not a valid label: {value!r}"])

    command = ["ray", "start"]
    if role == "head" and "--head" not in rest:
        command.append("--head")
    command += rest
    if "--block" not in rest:
        command.append("--block")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if resources:
        numbers = {k: _number(v) for k, v in resources.items()}
        command.append("--resources=" + json.dumps(numbers, separators=(",", ":")))
    command.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    return NodeStart(
        role=role,
        node_name=node_name,
        gpu_source=gpu_source if gpus else "none",
        gpus=list(gpus),
        num_gpus=num_gpus,
        resources=resources,
        labels=labels,
        command=command,
        notes=notes,
    )


class DetectedGPUs(StrictModel):
    gpus: list[NodeGPU]
    source: Literal["nvml", "file", "none"]
    reason: str = Field(default="", description="Why no GPU was found, for the log.")


def _decode(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus() -> DetectedGPUs:
    """The GPUs NVML lists. No nvidia-ml-py, no driver library or no device: none, with the reason."""
    try:
        import pynvml
    except ImportError:
        return DetectedGPUs(gpus=[], source="none", reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return DetectedGPUs(gpus=[], source="none", reason=f"NVML cannot start here ({error})")
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(
                    NodeGPU(
                        index=index,
                        uuid=_decode(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_decode(pynvml.nvmlDeviceGetName(handle)),
                        total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
            except pynvml.NVMLError as error:
                raise RuntimeError(f"NVML cannot read GPU {index} of this node: {error}") from None
    finally:
        pynvml.nvmlShutdown()
    return DetectedGPUs(gpus=gpus, source="nvml", reason="" if gpus else "NVML lists no GPU")


def declared_gpus(inventory_file: str, node_name: str) -> DetectedGPUs:
    """This node's GPUs as a declared inventory file lists them (machines without a GPU)."""
    inventory = load_inventory(inventory_file)
    names = [n.node for n in inventory.nodes]
    if node_name not in names:
        raise ConfigError(inventory_file, [f"nodes: no node {node_name!r} in the file (it lists {', '.join(names)})"])
    node = next(n for n in inventory.nodes if n.node == node_name)
    gpus = [NodeGPU(index=g.index, uuid=g.uuid, name=g.name, total_bytes=g.total_bytes) for g in node.gpus]
    return DetectedGPUs(gpus=gpus, source="file", reason="" if gpus else f"{inventory_file} lists no GPU for it")


def detect_gpus(node_name: str, inventory_file: str | None = None) -> DetectedGPUs:
    """This node's GPUs: from a declared inventory file when given, else from NVML.

    An NVML error on a GPU that NVML does list is raised (RuntimeError): starting Ray with a wrong
    GPU count would be worse than not starting.
    """
    return declared_gpus(inventory_file, node_name) if inventory_file else nvml_gpus()
