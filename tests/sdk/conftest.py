"""Fixtures for the SDK tests: one vLLM OpenAI server on the tiny model per test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stack

MODEL = "tiny"
ALIAS = "tiny-alias"


@pytest.fixture(scope="session")
def vllm_endpoint() -> Iterator[str]:
    """Base URL (…/v1) of vLLM's own OpenAI server serving the tiny model as `tiny` and `tiny-alias`."""
    with stack.vllm_server(stack.tiny_model_dir(), [MODEL, ALIAS]) as url:
        yield url
