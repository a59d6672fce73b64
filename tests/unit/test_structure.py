"""The package's shape: every wire model is defined once (in `contract.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import vram_scheduler

PACKAGE = Path(vram_scheduler.__file__).parent
WIRE_MODELS = {
    "DeploymentStatus",
    "ModelStatus",
    "DeploymentList",
    "ReplicaStatus",
    "VRAMState",
    "GPUState",
    "NodeState",
    "ReplicaState",
    "ReplicaEndpoint",
}


def modules() -> dict[str, ast.Module]:
    """Each module of the package by dotted name, parsed."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def defined_names(tree: ast.Module) -> set[str]:
    """Classes, and names bound by a plain assignment (an alias), at the module's top level."""
    names = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_wire_model_is_defined_in_exactly_one_module() -> None:
    where: dict[str, list[str]] = {name: [] for name in WIRE_MODELS}
    for module, tree in modules().items():
        for name in defined_names(tree) & WIRE_MODELS:
            where[name].append(module)
    assert {name: found for name, found in where.items() if found != ["vram_scheduler.contract"]} == {}
