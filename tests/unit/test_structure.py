"""The package's shape: every wire model is defined once (in `contract.py`), no module imports
itself through others (counting imports inside functions, which only hide a cycle), each layer
imports only the layers below it (CONTRIBUTING.md draws them), and every error descends from
`RayVramError`."""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
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
    "RoutedModel",
    "EndpointTable",
    "MediaAccepts",
    "ResolvedSizes",
    "ApplyResult",
    "DeployAnswer",
    "DeployPlan",
    "Reservation",
    "Unplaced",
    "GPUPlan",
    "Plan",
    "PlanRequest",
    "ReserveRequest",
    "ReserveOutcome",
    "LoadReport",
    "StoreStats",
    "WriterStats",
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
    assert {name: found for name, found in where.items() if found != ["vram_scheduler.core.contract"]} == {}


def imported(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its body."""
    package = module if module == "vram_scheduler" or _is_package(module) else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Call) and _dynamic_prefix(node) is not None:
            # importlib.import_module(".commands.{name}", __package__): every module under that prefix
            relative = _dynamic_prefix(node) or ""
            stripped = relative.lstrip(".")
            level = len(relative) - len(stripped)
            base = package.rsplit(".", level - 1)[0] if level > 1 else package
            prefix = f"{base}.{stripped}" if level else stripped
            if prefix.rstrip(".") == base:  # the package's own lazy exports: resolved on attribute access
                continue
            targets = [m for m in known if m == prefix or (prefix.endswith(".") and m.startswith(prefix))]
        else:
            continue
        out |= {t for t in targets if t in known and t != module}
    return out


def _dynamic_prefix(call: ast.Call) -> str | None:
    """The constant start of `importlib.import_module`'s module name, None for any other call."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "import_module" and call.args):
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return None


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles() -> None:
    trees = modules()
    graph = {module: imported(module, tree, set(trees)) for module, tree in trees.items()}
    # the graph is real: plain, relative, function-level and importlib imports are all edges
    assert "vram_scheduler.core.contract" in graph["vram_scheduler.serving.router.router"]
    assert "vram_scheduler.cli.commands.up" in graph["vram_scheduler.cli.main"]
    assert cycles(graph) == []


def test_only_entry_points_import_the_cli() -> None:
    """Commands and the monitor share exit codes and extras through small modules, never `cli`."""
    trees = modules()
    importers = {m for m, tree in trees.items() if "vram_scheduler.cli.main" in imported(m, tree, set(trees))}
    assert importers <= {"vram_scheduler.cli.__main__"}


#: What each layer (the package's first-level folder) may import: the arrows of CONTRIBUTING.md.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "allocator": {"core"},
    "serving": {"allocator", "core"},
    "monitor": {"allocator", "core"},
    "local": {"serving", "monitor", "allocator", "core"},
    "tools": {"serving", "monitor", "allocator", "core"},
    "sdk": {"core"},
    "cli": {"sdk", "local", "tools", "serving", "monitor", "allocator", "core", ""},
    "": {"sdk", "core", "allocator"},  # the package's __init__: the public names, lazily
}


def layer(module: str) -> str:
    """`vram_scheduler.serving.router.router` -> "serving"; the package itself -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {module: imported(module, tree, set(trees)) for module, tree in trees.items()}


def test_every_module_lives_in_a_layer() -> None:
    assert {layer(m) for m in modules()} == set(LAYERS)


def test_each_layer_imports_only_what_its_arrows_allow() -> None:
    """Counting imports inside functions and `importlib.import_module`: a lazy import is still an edge."""
    graph = import_graph()
    assert "vram_scheduler.core.contract" in graph["vram_scheduler.serving.router.router"]  # the graph is real
    against = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in LAYERS[layer(module)]
    )
    assert against == []


def test_the_sdk_runs_without_any_server_module() -> None:
    """What a client machine imports: the SDK, with the controller reached over HTTP or through Ray
    (`ray.get_actor` and the contract's models), loads nothing of serving, allocator, monitor, tools."""
    code = (
        "import sys\n"
        "import vram_scheduler\n"
        "from vram_scheduler import VRAMScheduler, inference, transcribe\n"
        "import vram_scheduler.sdk.controller_ray, vram_scheduler.sdk.controller_http\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('vram_scheduler.')}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['core', 'sdk']"


def test_the_monitor_entry_point_imports_no_cli_module() -> None:
    graph = import_graph()
    seen, todo = set(), ["vram_scheduler.monitor.__main__"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert sorted(m for m in seen if layer(m) not in {"monitor", "allocator", "core"}) == []


def test_the_serving_path_never_imports_the_demo_model_generator() -> None:
    """Demo models are a tool: generated by `ray-vram demo-model`/`up` and served from their path."""
    graph = import_graph()
    importers = sorted(
        m for m, targets in graph.items() if any(t.startswith("vram_scheduler.tools.demo") for t in targets)
    )
    assert [m for m in importers if layer(m) not in {"tools", "cli"}] == []


def test_no_module_imports_another_layers_private_name() -> None:
    """What two layers share (measure and serving's sizing, MPS and engine flags) is public, in one place."""
    found = []
    for module, tree in modules().items():
        package = module if _is_package(module) else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("vram_scheduler") or layer(base) == layer(module):
                continue
            found += [f"{module}: {alias.name} from {base}" for alias in node.names if _is_private(alias.name)]
    assert found == []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


#: Exceptions used as control flow inside one process, never raised to a caller.
NOT_ERRORS = {"SkipGPU"}


def test_every_error_descends_from_ray_vram_error() -> None:
    bases: dict[str, list[str]] = {}
    for tree in modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]

    def is_exception(name: str) -> bool:
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and issubclass(builtin, BaseException):
            return True
        return any(is_exception(base) for base in bases.get(name, []))

    errors = {name for name in bases if name != "RayVramError" and is_exception(name)} - NOT_ERRORS
    roots = {name for name in errors if not any(base in errors for base in bases[name])}
    assert len(roots) >= 10  # the walk found the package's errors
    assert {name: bases[name] for name in roots if "RayVramError" not in bases[name]} == {}


def test_errors_keep_their_former_base_and_message() -> None:
    from vram_scheduler import RayVramError
    from vram_scheduler.core.config import ConfigError
    from vram_scheduler.core.ledger import ReservationError
    from vram_scheduler.sdk.client import PlacementError

    config = ConfigError("models[0]", ["vram_gb = -1: too small"])
    assert isinstance(config, RayVramError) and isinstance(config, ValueError)
    assert str(config) == "models[0]: invalid configuration\n  - vram_gb = -1: too small"
    for error in (ReservationError("gpu 0: 2 GiB free"), PlacementError("gpu 0: 2 GiB free", ["why"])):
        assert isinstance(error, RayVramError) and isinstance(error, RuntimeError)
        assert str(error) == "gpu 0: 2 GiB free"


#: The cluster's overhead setting: only `capacity` decides what it means for a reservation.
_OVERHEAD_SETTING = "replica_overhead_gb"
#: Calls that turn GiB into bytes.
_TO_BYTES = {"gib_to_bytes"}


def _names_overhead(node: ast.AST) -> bool:
    """Whether an expression names an overhead (`overhead`, `x.overhead_bytes`, `overhead_gb`, …)."""
    for sub in ast.walk(node):
        name = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else ""
        if "overhead" in name.lower():
            return True
    return False


def _converts_an_overhead(node: ast.AST) -> bool:
    """`gib_to_bytes(<something naming an overhead>)`."""
    if not isinstance(node, ast.Call):
        return False
    name = getattr(node.func, "id", getattr(node.func, "attr", ""))
    return name in _TO_BYTES and any(_names_overhead(arg) for arg in node.args)


def test_the_overhead_arithmetic_lives_in_capacity_only() -> None:
    """Reservation = budget + overhead, the cap, and turning `*overhead_gb` into bytes are `capacity`'s:
    no other module adds an overhead to anything or reads the overhead settings."""
    found: list[str] = []
    for module, tree in modules().items():
        if module == "vram_scheduler.core.capacity":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
                text = any(isinstance(side, ast.JoinedStr | ast.Constant) for side in (node.left, node.right))
                if not text and (_names_overhead(node.left) or _names_overhead(node.right)):
                    found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr == _OVERHEAD_SETTING:
                found.append(f"{module}:{node.lineno}: reads {ast.unparse(node)}")
            elif _converts_an_overhead(node):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
