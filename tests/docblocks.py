"""The fenced code blocks of README.md and docs/*.md, each with the marker comment above it:
`<!-- tested: tests/PATH.py -->` (that test runs it as written) or `<!-- excerpt: WHY -->`.
A test that runs blocks collects its own with `tested_by(__file__)`."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!-- (?P<kind>tested|excerpt): (?P<value>.+?) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path  # the Markdown file
    line: int  # of the opening fence, 1-based
    lang: str  # the fence's info string ("" when none)
    code: str  # dedented, ending in a newline
    kind: str | None  # "tested", "excerpt" or None (no marker)
    value: str  # the test's path, or why it is an excerpt

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(
            (j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"),
            None,
        )
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{index + 1}: a code block that is never closed")
        above = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(above)
        code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        found.append(
            Block(
                path,
                index + 1,
                opening["lang"],
                code,
                marker["kind"] if marker else None,
                marker["value"].strip() if marker else "",
            )
        )
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in blocks_of(path)]


def tested_by(test_file: str | Path) -> list[Block]:
    """The blocks whose marker names this test file, in reading order (README first)."""
    name = Path(test_file).resolve().relative_to(ROOT).as_posix()
    found = [b for b in all_blocks() if b.kind == "tested" and b.value == name]
    assert found, f"no block of README.md or docs/ is marked <!-- tested: {name} -->"
    return found


def run_python(source: str, namespace: dict[str, Any]) -> None:
    """Run one block as a notebook cell would (top-level `await` allowed)."""
    # dont_inherit: a notebook cell has none of this module's `from __future__` imports.
    code = compile(source, "<block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)
