"""max_model_len against a model's own maximum, start-failure reasons on one line, and the one-line
error naming the extra for a missing optional module — without Ray or vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from vram_scheduler.core.config import ConfigError, ModelSpec
from vram_scheduler.core.model_limits import effective_max_model_len, max_len_of
from vram_scheduler.serving.replica.failures import root_cause

ROOT = Path(__file__).resolve().parents[2]


def model_dir(tmp_path: Path, config: dict, tokenizer: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return tmp_path


@pytest.mark.parametrize(
    ("config", "tokenizer", "expected"),
    [
        ({"max_position_embeddings": 2048}, None, 2048),
        ({"n_positions": 1024, "max_position_embeddings": 4096}, None, 1024),  # the smallest key, as vLLM
        ({"max_position_embeddings": 32768}, {"model_max_length": 8000}, 8000),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}, None, 16384),
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None, 131072),
        ({"text_config": {"max_position_embeddings": 8192}}, None, 8192),
        ({"hidden_size": 8}, None, None),
    ],
)
def test_the_models_maximum_is_derived_like_vllm(config: dict, tokenizer: dict | None, expected: int | None) -> None:
    found = max_len_of(config, tokenizer)
    assert (found[0] if found else None) == expected


def test_default_is_8192_or_the_models_maximum_whichever_is_smaller(tmp_path: Path) -> None:
    short = str(model_dir(tmp_path, {"max_position_embeddings": 2048}))
    assert effective_max_model_len(ModelSpec(model_id="m", model=short, vram_gb=1)) == 2048
    assert effective_max_model_len(ModelSpec(model_id="m", model=short, vram_gb=1, max_model_len=512)) == 512
    (tmp_path / "long").mkdir()
    long = str(model_dir(tmp_path / "long", {"n_positions": 32768}))
    assert effective_max_model_len(ModelSpec(model_id="m", model=long, vram_gb=1)) == 8192
    assert effective_max_model_len(ModelSpec(model_id="m", model="org/not-cached", vram_gb=1)) == 8192


def test_more_than_the_model_allows_names_both_numbers(tmp_path: Path) -> None:
    source = str(model_dir(tmp_path, {"max_position_embeddings": 2048}))
    with pytest.raises(ConfigError) as caught:
        effective_max_model_len(ModelSpec(model_id="m", model=source, vram_gb=1, max_model_len=8192))
    message = str(caught.value)
    assert "max_model_len = 8192 exceeds the model's maximum of 2048 tokens" in message
    assert f"max_position_embeddings in {source}/config.json" in message


class _Checked(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _small(cls, value: int) -> int:
        raise ValueError(f"User-specified max_model_len ({value}) is greater than the derived max_model_len (2048)")


def test_root_cause_is_the_innermost_message_whole_on_one_line() -> None:
    try:
        _Checked(n=8192)
    except ValidationError as error:
        try:
            raise RuntimeError("Engine start failed") from error
        except RuntimeError as outer:
            reason = root_cause(outer)
    assert reason == (
        "ValidationError: User-specified max_model_len (8192) is greater than the derived max_model_len (2048)"
    )
    assert "\n" not in reason and "errors.pydantic.dev" not in reason
    try:
        try:
            raise KeyError("unrelated")
        except KeyError:
            raise ValueError("line one\nline two") from None
    except ValueError as error:
        assert root_cause(error) == "ValueError: line one line two"
    assert root_cause(SystemExit(2)) == "SystemExit"


@pytest.mark.parametrize(
    ("command", "module", "extra"), [("monitor", "prometheus_client", "gpu"), ("up", "ray", "serve")]
)
def test_a_missing_optional_module_names_the_extra_and_exits_2(
    tmp_path: Path, command: str, module: str, extra: str
) -> None:
    """The module is made unimportable the way a missing package is (ModuleNotFoundError, same name)."""
    shim = tmp_path / module
    shim.mkdir()
    missing = f"No module named {module!r}"
    (shim / "__init__.py").write_text(f"raise ModuleNotFoundError({missing!r}, name={module!r})\n")
    values = tmp_path / "values.yaml"
    values.write_text("models: []\n")
    args = {"monitor": ["--host-memory", "--port", "0"], "up": ["-f", str(values), "--controller-port", "0"]}[command]
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "vram_scheduler.cli", command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: ray-vram {command} needs the Python module {module!r}, which is not installed: "
        f"pip install 'ray-vram[{extra}]'"
    ]
