"""The docs hold together: generated reference sections match their sources, every code block is
run by a test as written or marked an excerpt, links land on files and headings that exist, and the
README keeps the set-up commands CI runs and stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import docblocks
from stack import ROOT

README_LIMIT_BYTES = 20_000
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_generated_sections_match_their_sources() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "gen-docs.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_every_code_block_is_tested_or_an_excerpt() -> None:
    problems = []
    for block in docblocks.all_blocks():
        if block.lang == "text":
            continue  # output and drawings: nothing to run
        if block.kind is None:
            problems.append(
                f"{block.where}: a ```{block.lang} block without <!-- tested: ... --> or <!-- excerpt: ... -->"
            )
        elif block.kind == "tested":
            test = ROOT / block.value
            if not test.is_file():
                problems.append(f"{block.where}: tested by {block.value}, which does not exist")
            elif "tested_by(__file__)" not in test.read_text():
                problems.append(
                    f"{block.where}: {block.value} does not collect its blocks (docblocks.tested_by(__file__))"
                )
    assert not problems, "\n".join(problems)


def test_links_land_on_files_and_headings_that_exist() -> None:
    problems = []
    for path in docblocks.doc_files():
        text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
        for match in LINK.finditer(text):
            target = match["target"]
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not linked.exists():
                problems.append(
                    f"{where}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}"
                )
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_readme_keeps_the_set_up_commands_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    size = len(readme.encode())
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size} bytes, over {README_LIMIT_BYTES} by {size - README_LIMIT_BYTES}"
    )
    first = docblocks.blocks_of(ROOT / "README.md")[0].code.splitlines()
    ci_command = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("bash "))
    assert first[0] == ci_command, f"README's first command {first[0]!r} is not what .ci/run runs ({ci_command!r})"
    assert first[1].startswith("bash ci/up.sh "), first[1]
    assert 'ray-vram" up -f values/local.yaml' in (ROOT / "ci" / "up.sh").read_text()


def module_exists(dotted: str) -> bool:
    """`vram_scheduler.a.b` (or `vram_scheduler.a.b.attribute`) names a module of src/."""
    parts = dotted.split(".")
    for end in (len(parts), len(parts) - 1):
        base = ROOT / "src" / Path(*parts[:end])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def test_source_paths_and_modules_named_in_the_docs_exist() -> None:
    """Docs name files and modules that are there (a module moved without its docs fails here)."""
    files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if ".git" not in p.parts]
    problems = []
    for path in docblocks.doc_files():
        text = path.read_text()
        for name in sorted(set(re.findall(r"`([\w./-]+\.py)`", text))):
            if not any(f == name or f.endswith("/" + name) for f in files):
                problems.append(f"{path.relative_to(ROOT)}: no file {name}")
        for dotted in sorted(set(re.findall(r"\bvram_scheduler(?:\.\w+)+", text))):
            if not module_exists(dotted):
                problems.append(f"{path.relative_to(ROOT)}: no module {dotted}")
    assert not problems, "\n".join(problems)
