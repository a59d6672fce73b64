"""Writes the generated reference sections of docs/ between their marker comments, from the sources
that define them, so the tables never drift from the code:

- `values-*` (docs/configuration.md): the `models`, `models[].media`, `placement` and `serving`
  keys, from `vram_scheduler.core.config.config_json_schema()` (the same schema
  ci/gen-values-schema.py writes into the chart's values.schema.json);
- `cli` (docs/cli.md): `ray-vram --help` and every sub-command's `--help`, from the argparse parser;
- `metrics` (docs/operations.md): every `ray_vram_*` metric, found where it is declared in
  src/vram_scheduler (prometheus_client and Ray metrics objects, metric families);
- `alerts` (docs/operations.md): the chart's Prometheus alerts, from its monitoring template.

A section is the text between `<!-- generated: NAME ... -->` and `<!-- end generated: NAME -->`.

Usage: python ci/gen-docs.py [--check]   (--check: exit 1 naming each stale section, write nothing)
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This checkout's package, whatever checkout an environment's editable install points at.
sys.path.insert(0, str(ROOT / "src"))
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "vram_scheduler"
MONITORING_TEMPLATE = ROOT / "charts" / "ray-vram" / "templates" / "monitoring.yaml"
SECTION = re.compile(
    r"(?P<begin><!-- generated: (?P<name>[a-z0-9-]+)[^\n]*-->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- end generated: (?P=name) -->)",
    re.S,
)
HELP_WIDTH = "100"


def cell(text: Any) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -- values reference ------------------------------------------------------------------------------


def schema_type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "object (below)"
    if "anyOf" in prop:
        return " or ".join(schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {schema_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and isinstance(prop["additionalProperties"], dict):
        return "mapping"
    return str(kind)


def limits(prop: dict[str, Any]) -> str:
    words = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in prop:
            words.append(f"{sign} {prop[key]}")
    for option in prop.get("anyOf", []):
        if limit := limits(option):
            words.append(limit)
    if "enum" in prop:
        words.append("one of " + ", ".join(f"`{v}`" for v in prop["enum"]))
    if "maxLength" in prop:
        words.append(f"at most {prop['maxLength']} characters")
    return ", ".join(words)


def default(name: str, prop: dict[str, Any], required: list[str]) -> str:
    if name in required:
        return "required"
    if "default" not in prop:
        return "—"
    value = prop["default"]
    return "unset" if value is None else f"`{json.dumps(value)}`"


def values_table(definition: dict[str, Any], prefix: str) -> str:
    required = definition.get("required", [])
    rows = ["| key | type | default | limits | meaning |", "|---|---|---|---|---|"]
    for name, prop in definition["properties"].items():
        rows.append(
            f"| `{prefix}{name}` | {cell(schema_type(prop))} | {cell(default(name, prop, required))} "
            f"| {cell(limits(prop))} | {cell(prop.get('description', ''))} |"
        )
    return "\n".join(rows) + "\n"


def values_section(definition_name: str, prefix: str) -> Callable[[], str]:
    def make() -> str:
        from vram_scheduler.core.config import config_json_schema

        definition = config_json_schema()["$defs"][definition_name]
        return f"{cell(definition.get('description', ''))}\n\n" + values_table(definition, prefix)

    return make


# -- CLI reference ---------------------------------------------------------------------------------


def cli_section() -> str:
    """`--help` of the command and of every sub-command, at a fixed width."""
    os.environ["COLUMNS"] = HELP_WIDTH
    from vram_scheduler.cli.main import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name, sub in subcommands.choices.items():
        parts.append(f"### `ray-vram {name}`\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


# -- metrics ---------------------------------------------------------------------------------------

METRIC_CALLS = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
}


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    module: str


def _constants(tree: ast.Module) -> dict[str, Any]:
    """The module's `NAME = literal` assignments (top level first, then inside functions)."""
    found: dict[str, Any] = {}
    for node in ast.walk(tree):
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                found.setdefault(target.id, ast.literal_eval(node.value))
            except ValueError:
                continue
    return found


def _value(node: ast.AST | None, constants: dict[str, Any], loop: dict[str, Any]) -> Any:
    """A literal, a module constant, a comprehension variable, an f-string of those, or a string
    method chain on one (`NAME.removeprefix(...)`: the exported name is the constant's own)."""
    if node is None:
        return None
    if isinstance(node, ast.Name):
        return loop.get(node.id, constants.get(node.id))
    if isinstance(node, ast.JoinedStr):
        parts = [
            str(_value(v.value, constants, loop)) if isinstance(v, ast.FormattedValue) else v.value for v in node.values
        ]
        return "".join(parts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _value(node.func.value, constants, loop)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _is_labels(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _metric(call: ast.Call, kind: str, constants: dict[str, Any], loop: dict[str, Any], module: str) -> Metric | None:
    args = list(call.args)
    kwargs = {k.arg: k.value for k in call.keywords}
    name = _value(args[0] if args else kwargs.get("name"), constants, loop)
    if not isinstance(name, str) or not name.startswith("ray_vram_"):
        return None
    text = _value(
        args[1] if len(args) > 1 else kwargs.get("documentation") or kwargs.get("description"), constants, loop
    )
    labels_node = kwargs.get("labels") or kwargs.get("labelnames") or kwargs.get("tag_keys")
    if labels_node is None:
        rest = [a for a in args[2:] if _is_labels(_value(a, constants, loop))]
        labels_node = rest[-1] if rest else None
    labels = _value(labels_node, constants, loop) or ()
    if kind == "counter" and not name.endswith("_total"):
        name += "_total"
    return Metric(name, kind, tuple(labels), " ".join(str(text or "").split()), module)


def _loops(
    comprehension: ast.DictComp | ast.ListComp | ast.GeneratorExp | ast.SetComp, constants: dict[str, Any]
) -> list[dict[str, Any]]:
    """Bindings of a one-generator comprehension over a literal tuple of tuples (else none)."""
    generator = comprehension.generators[0]
    items = _value(generator.iter, constants, {})
    if len(comprehension.generators) != 1 or not isinstance(items, (list, tuple)):
        return []
    names = [e.id for e in generator.target.elts] if isinstance(generator.target, ast.Tuple) else [generator.target.id]  # type: ignore[attr-defined]
    return [dict(zip(names, item if len(names) > 1 else (item,), strict=True)) for item in items]


def declared_metrics(package: Path = PACKAGE) -> list[Metric]:
    """Every `ray_vram_*` metric declared in the package's source, where it is declared."""
    metrics: dict[str, Metric] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants = _constants(tree)
        module = path.relative_to(package.parent).with_suffix("").as_posix().replace("/", ".")
        bound: dict[int, list[dict[str, Any]]] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.DictComp, ast.ListComp, ast.GeneratorExp, ast.SetComp)):
                for child in ast.walk(node):
                    bound[id(child)] = _loops(node, constants)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee not in METRIC_CALLS:
                continue
            for loop in bound.get(id(node)) or [{}]:
                if metric := _metric(node, METRIC_CALLS[callee], constants, loop, module):
                    metrics.setdefault(metric.name, metric)
    return sorted(metrics.values(), key=lambda m: (m.module, m.name))


def metrics_section() -> str:
    rows = ["| metric | type | labels | meaning | declared in |", "|---|---|---|---|---|"]
    for m in declared_metrics():
        labels = ", ".join(m.labels) or "—"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {cell(m.help)} | `{m.module}` |")
    return "\n".join(rows) + "\n"


# -- alerts ----------------------------------------------------------------------------------------


def chart_alerts(template: Path = MONITORING_TEMPLATE) -> Iterator[dict[str, str]]:
    """The chart's alert rules as written in its template (Helm's escaped braces undone)."""
    text = template.read_text().replace('{{ "{{" }}', "{{").replace('{{ "}}" }}', "}}")
    for block in re.split(r"\n(?=\s*- alert: )", text)[1:]:
        fields = {"alert": re.search(r"- alert: (\S+)", block).group(1)}  # type: ignore[union-attr]
        if m := re.search(r"\n\s*for: (.+)", block):
            fields["for"] = m.group(1).strip()
        if m := re.search(r"severity: (\w+)", block):
            fields["severity"] = m.group(1)
        if m := re.search(r'summary: "(.*)"', block):
            fields["summary"] = m.group(1)
        if m := re.search(r"expr: >-\n(.*?)\n\s*(?:for|labels):", block, re.S):
            fields["expr"] = " ".join(m.group(1).split())
        elif m := re.search(r"expr: (.+)", block):
            fields["expr"] = m.group(1).strip()
        yield fields


def alerts_section() -> str:
    rows = ["| alert | severity | for | expression | summary |", "|---|---|---|---|---|"]
    for a in chart_alerts():
        when = a.get("for", "—").replace("{{ $mon.alerts.", "`monitoring.alerts.").replace(" }}", "`")
        expr = a.get("expr", "").replace("{{ $mon.alerts.", "monitoring.alerts.").replace(" }}", "")
        summary = cell(a.get("summary", ""))
        rows.append(f"| `{a['alert']}` | {a.get('severity', '—')} | {cell(when)} | `{cell(expr)}` | {summary} |")
    return "\n".join(rows) + "\n"


# -- writing ---------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[], str]] = {
    "values-models": values_section("ModelSpec", "models[]."),
    "values-media": values_section("MediaSettings", "models[].media."),
    "values-placement": values_section("PlacementSettings", "placement."),
    "values-serving": values_section("ServingSettings", "serving."),
    "cli": cli_section,
    "metrics": metrics_section,
    "alerts": alerts_section,
}


def render(text: str, made: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in SECTIONS:
            raise SystemExit(f"error: unknown generated section {name!r} (known: {', '.join(SECTIONS)})")
        if name not in made:
            with redirect_stdout(io.StringIO()):
                made[name] = SECTIONS[name]()
        return match["begin"] + "\n" + made[name] + "\n" + match["end"]

    return SECTION.sub(replace, text)


def stale_sections(docs: Path = DOCS, write: bool = False) -> list[str]:
    """`FILE: NAME` of every generated section whose text differs from its source (written if `write`);
    every section of SECTIONS must appear in some file."""
    made: dict[str, str] = {}
    stale: list[str] = []
    seen: set[str] = set()
    for path in sorted(docs.rglob("*.md")):
        text = path.read_text()
        seen |= {m["name"] for m in SECTION.finditer(text)}
        new = render(text, made)
        if new != text:
            old = {m["name"]: m["body"] for m in SECTION.finditer(text)}
            fresh = {m["name"]: m["body"] for m in SECTION.finditer(new)}
            stale += [f"{path.relative_to(ROOT)}: {n}" for n in fresh if old.get(n) != fresh[n]]
            if write:
                path.write_text(new)
    stale += [f"(no file): {name}" for name in SECTIONS if name not in seen]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated section is stale")
    args = parser.parse_args()
    stale = stale_sections(write=not args.check)
    missing = [s for s in stale if s.startswith("(no file)")]
    if args.check and stale:
        print("stale generated sections (run python ci/gen-docs.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    if missing:
        print("generated sections without a place in docs/:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    for line in stale:
        print(f"wrote {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
