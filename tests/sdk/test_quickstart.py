"""The original design's quick start (tests/sdk/data/original_quickstart.md, its "Deploy Models" and
"Run Inference" sections as published), and the README's tour and docs/sdk.md's examples (the blocks
marked as run here), run as written against the local stack.

The quick start's blocks run verbatim except for what a 2-core CI machine without a model hub cannot
hold, replaced as text before running (`SCALED`): its hub model becomes the generated demo model,
5 replicas of 3.89 GiB become 1 of 1.5 GiB, and the structured-output class bounds its string (the
demo model's random weights never close an unbounded one), and the module its inference functions
were imported from (`MOVED`). Every call, argument order and keyword is as written; top-level
`await` runs as in a notebook.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import docblocks
import pytest
import stack

from vram_scheduler.core.loopback import LOOPBACK_NODE_ENV

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).parent / "data" / "original_quickstart.md"
SCALED = {
    '"Qwen/Qwen2-0.5B-Instruct"': '"demo"',
    "vram_gb=3.89": "vram_gb=1.5",
    "replicas=5": "replicas=1",
    # The demo model's weights are random: a string without a length bound never closes its quote.
    "from pydantic import BaseModel\n": "from pydantic import BaseModel, Field\n",
    "    answer: str\n": "    answer: str = Field(max_length=40)\n",
}

#: `vram_scheduler.inference` was a module made callable so that it could also be the function; the
#: functions now live in `vram_scheduler.sdk` (split by job) and the package exports each by name.
MOVED = {"from vram_scheduler.inference import": "from vram_scheduler import"}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def run_block(source: str, namespace: dict[str, Any]) -> None:
    """Run one block as a notebook cell would (top-level `await` allowed)."""
    code = compile(source, "<block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)


def shutdown(*model_ids: str) -> None:
    from vram_scheduler import VRAMScheduler

    with VRAMScheduler() as scheduler:
        for model_id in model_ids:
            scheduler.shutdown(model_id)


def test_the_original_quick_start_runs_as_written(controller_env: dict[str, str], capsys) -> None:
    text = QUICKSTART.read_text()
    for old, new in (SCALED | MOVED).items():
        assert old in text, f"{old} is no longer in the quick start"
        text = text.replace(old, new)
    blocks = python_blocks(text)
    assert len(blocks) == 2
    namespace: dict[str, Any] = {}
    try:
        for block in blocks:
            run_block(block, namespace)
        output = capsys.readouterr().out
        assert "my-model-0" in output and "max-llm-0" in output and "over reservation" not in output
        assert isinstance(namespace["results"], list) and len(namespace["results"]) == 3
        assert type(namespace["result"]).__name__ == "Response"
    finally:
        shutdown("my-model", "max-llm")
    with capsys.disabled():
        print("\n--- the original quick start's output ---\n" + output)


def test_the_readme_tour_and_the_sdk_docs_run_as_written(
    controller_env: dict[str, str], local_stack: stack.LocalStack, capsys
) -> None:
    """The blocks of README.md and docs/sdk.md marked as run here, in reading order, as a notebook
    runs its cells; shell blocks reach the stack through $RAY_VRAM_ENDPOINT, code inside the cluster
    runs in a process of its own that joins the stack's Ray."""
    blocks = docblocks.tested_by(__file__)
    in_cluster = [b for b in blocks if "ray.init(" in b.code]
    shell = [b for b in blocks if b.lang == "bash"]
    assert len(in_cluster) == 1 and len(shell) == 1, [b.where for b in blocks]
    # Local mode's Ray is on 127.0.0.1 only: a process joining it must stay on loopback too.
    env = os.environ | LOOPBACK_NODE_ENV | {"RAY_ADDRESS": local_stack.gcs_address, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", in_cluster[0].code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, in_cluster[0].where + "\n" + done.stderr[-3000:]
    assert "model example needs" in done.stdout and "largest free" in done.stdout
    namespace: dict[str, Any] = {}
    answers: list[dict[str, Any]] = []
    try:
        for block in blocks:
            if block in in_cluster:
                continue
            if block.lang == "bash":
                ran = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.code],
                    env=os.environ | {"RAY_VRAM_ENDPOINT": local_stack.endpoint},
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                assert ran.returncode == 0, f"{block.where}: {ran.stderr[-3000:]}"
                answers.append(json.loads(ran.stdout))
            else:
                docblocks.run_python(block.code, namespace)
        output = capsys.readouterr().out
        assert "qwen: 1 replica(s) ready" in output and "over reservation" not in output
        assert namespace["state"].gpus and namespace["event"].done
        assert answers[0]["model"] == "qwen" and answers[0]["choices"][0]["message"]["content"], answers
    finally:
        shutdown("qwen")
