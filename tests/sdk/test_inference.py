"""The inference SDK (`vram_scheduler.sdk`) against the real local stack (router → vLLM CPU replica of the demo model).

Random weights: assert structure (types, counts, schemas, errors), never text.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
import stack
from fake_engine import TEXT as FAKE_TEXT
from fake_engine import FakeOpenAIEngine
from pydantic import BaseModel, Field, field_validator
from stack import ALIAS, MODEL

import vram_scheduler as inf
from vram_scheduler.sdk.controller_http import CONTROLLER_ENV
from vram_scheduler.sdk.endpoints import DASHBOARD_ENV, ENDPOINT_ENV
from vram_scheduler.sdk.http_calls import retry_after_seconds

pytestmark = pytest.mark.slow


class City(BaseModel):
    city: str = Field(max_length=12)
    ok: bool


class NeverValid(BaseModel):
    ok: bool

    @field_validator("ok")
    @classmethod
    def _refuse(cls, value: bool) -> bool:
        raise ValueError("this check is not expressible in JSON schema and always fails")


def test_inference_returns_text_and_passes_sampling(endpoint: str) -> None:
    text = inf.inference("Hello", MODEL, base_url=endpoint, max_tokens=6, min_tokens=6, temperature=0.0, seed=1)
    assert isinstance(text, str) and text


def test_router_name_sends_to_the_alias(endpoint: str) -> None:
    text = inf.inference("Hi", MODEL, ALIAS, base_url=endpoint, max_tokens=3, min_tokens=3)
    assert isinstance(text, str) and text


def test_chat_messages_accepted(endpoint: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert isinstance(inf.inference(messages, MODEL, base_url=endpoint, max_tokens=3), str)


def test_structured_output_parses_into_the_class(endpoint: str) -> None:
    result = inf.inference("Which city?", MODEL, structured_output=City, base_url=endpoint, max_tokens=64)
    assert isinstance(result, City)
    assert len(result.city) <= 12


def test_structured_output_that_does_not_validate_is_a_typed_error(endpoint: str) -> None:
    with pytest.raises(inf.StructuredOutputError) as caught:
        inf.inference("Answer", MODEL, structured_output=NeverValid, base_url=endpoint, max_tokens=32)
    error = caught.value
    assert error.model == MODEL and "NeverValid" in str(error)
    assert error.raw.startswith("{") and error.errors


def test_structured_output_cut_by_max_tokens_says_so(endpoint: str) -> None:
    with pytest.raises(inf.StructuredOutputError, match="max_tokens"):
        inf.inference("Which city?", MODEL, None, City, base_url=endpoint, max_tokens=2)


def test_unknown_model_is_model_not_found(endpoint: str) -> None:
    with pytest.raises(inf.ModelNotFoundError) as caught:
        inf.inference("Hi", "no-such-model", base_url=endpoint, max_tokens=2)
    assert caught.value.status == 404 and "no-such-model" in str(caught.value)


def test_prompt_over_the_limit_is_invalid_unless_truncated(endpoint: str) -> None:
    long_prompt = "the cat runs quickly " * 400
    with pytest.raises(inf.InvalidRequestError) as caught:
        inf.inference(long_prompt, MODEL, base_url=endpoint, max_tokens=4)
    assert caught.value.status == 400
    text = inf.inference(long_prompt, MODEL, base_url=endpoint, max_tokens=4, truncate_prompt_tokens=256)
    assert isinstance(text, str)


def test_async_inference_and_batches_keep_order(endpoint: str) -> None:
    prompts = [f"prompt {i}" for i in range(5)]

    async def main() -> tuple[str, list]:
        single = await inf.a_inference("hi", MODEL, base_url=endpoint, max_tokens=3, min_tokens=3)
        batch = await inf.a_inference_batch(
            prompts, MODEL, concurrency=2, base_url=endpoint, max_tokens=3, min_tokens=3
        )
        return single, batch

    single, batch = asyncio.run(main())
    assert isinstance(single, str) and single
    assert len(batch) == 5 and all(isinstance(t, str) and t for t in batch)
    structured = inf.inference_batch(
        prompts[:3], MODEL, structured_output=City, base_url=endpoint, max_tokens=64, concurrency=3
    )
    assert [type(r) for r in structured] == [City] * 3


def test_batch_with_return_exceptions_keeps_failures_in_place(endpoint: str) -> None:
    prompts = ["short", "the cat runs " * 600, "short again"]
    results = inf.inference_batch(prompts, MODEL, base_url=endpoint, max_tokens=3, return_exceptions=True)
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert isinstance(results[1], inf.InvalidRequestError)
    with pytest.raises(inf.InvalidRequestError):
        inf.inference_batch(prompts, MODEL, base_url=endpoint, max_tokens=3)


def test_sync_batch_works_inside_a_running_event_loop(endpoint: str) -> None:
    async def main() -> list:
        return inf.inference_batch(["a", "b"], MODEL, base_url=endpoint, max_tokens=2)

    assert len(asyncio.run(main())) == 2


def test_streaming_batch_sync_interleaves_and_ends_each_prompt_once(endpoint: str) -> None:
    prompts = ["one", "two", "three"]
    events = list(inf.streaming_batch(prompts, MODEL, base_url=endpoint, max_tokens=5, min_tokens=5))
    done = [e for e in events if e.done]
    assert sorted(e.index for e in done) == [0, 1, 2]
    assert all(e.error is None and e.finish_reason == "length" for e in done)
    for index in range(3):
        pieces = [e.text for e in events if e.index == index and not e.done]
        assert pieces and "".join(pieces)


def test_streaming_batch_async_reports_failures_per_prompt(endpoint: str) -> None:
    async def main() -> list[inf.StreamEvent]:
        return [
            e
            async for e in inf.a_streaming_batch(
                ["fine", "the cat runs " * 600], MODEL, base_url=endpoint, max_tokens=3, concurrency=1
            )
        ]

    events = asyncio.run(main())
    ends = {e.index: e for e in events if e.done}
    assert ends[0].error is None
    assert isinstance(ends[1].error, inf.InvalidRequestError)


def test_stream_yields_text_pieces(endpoint: str) -> None:
    pieces = list(inf.stream("hi", MODEL, base_url=endpoint, max_tokens=4, min_tokens=4))
    assert pieces and all(isinstance(p, str) for p in pieces)


@pytest.mark.parametrize("status", [429, 503])
def test_busy_endpoint_is_retried_after_retry_after(fake_engine: FakeOpenAIEngine, status: int) -> None:
    """The retries are the subject: the engine behind the busy front is the test double."""
    with stack.BusyFront(fake_engine.url, busy=2, status=status, retry_after="1") as front:
        text = inf.inference("hi", MODEL, base_url=front.url, max_tokens=2)
    assert text == FAKE_TEXT
    assert len(front.arrivals) == 3 and len(fake_engine.requests) == 1  # the third attempt passed
    gaps = [b - a for a, b in zip(front.arrivals, front.arrivals[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps


def test_endpoint_busy_through_every_retry_is_overloaded(fake_engine: FakeOpenAIEngine) -> None:
    policy = inf.RetryPolicy(attempts=3, backoff_s=0.01)
    with stack.BusyFront(fake_engine.url, busy=100, status=503, retry_after="0") as front:
        with pytest.raises(inf.OverloadedError, match="3 attempt"):
            inf.inference("hi", MODEL, base_url=front.url, max_tokens=2, retry=policy)
        events = list(inf.streaming_batch(["x"], MODEL, base_url=front.url, max_tokens=2, retry=policy))
    assert isinstance(events[-1].error, inf.OverloadedError)
    assert len(front.arrivals) == 6 and fake_engine.requests == []


def test_unreachable_endpoint_names_the_address() -> None:
    url = f"http://127.0.0.1:{stack.free_port()}/v1"
    with pytest.raises(inf.EndpointNotFoundError, match=url.replace(".", r"\.")):
        inf.inference("hi", MODEL, base_url=url)


def test_discovery_finds_the_endpoint_through_the_controller(controller_env: dict[str, str]) -> None:
    assert inf.resolve_endpoint(MODEL).endswith("/v1")
    assert isinstance(inf.inference("hi", ALIAS, max_tokens=2), str)


def test_discovery_without_any_endpoint_says_what_it_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    controller = f"http://127.0.0.1:{stack.free_port()}"
    dashboard = f"http://127.0.0.1:{stack.free_port()}"
    monkeypatch.setenv(CONTROLLER_ENV, controller)
    monkeypatch.setenv(DASHBOARD_ENV, dashboard)
    inf.forget_endpoints()
    with pytest.raises(inf.EndpointNotFoundError) as caught:
        inf.inference("hi", "ghost")
    message = str(caught.value)
    assert "'ghost'" in message and controller in message and dashboard in message


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_seconds(later) <= 61
    assert inf.RetryPolicy(max_backoff_s=5).delay(10, None) == 5


def test_the_original_positional_order_and_keywords(endpoint: str) -> None:
    """The original API: inference(prompt, model_id, router_name=None, structured_output=None, ...)."""
    assert isinstance(inf.inference("Hello!", MODEL, None, None, base_url=endpoint, max_tokens=2), str)
    assert isinstance(inf.inference("Hello!", model_id=MODEL, base_url=endpoint, max_tokens=2), str)
    assert isinstance(inf.inference(prompt="Hello!", model_id=MODEL, base_url=endpoint, max_tokens=2), str)
    assert isinstance(inf.inference("Hi", MODEL, ALIAS, City, base_url=endpoint, max_tokens=64), City)
    batch = inf.inference_batch(["a", "b"], model_id=MODEL, base_url=endpoint, max_tokens=2)
    assert len(batch) == 2
    assert len(list(inf.streaming_batch(["a"], MODEL, ALIAS, base_url=endpoint, max_tokens=2))) >= 2


def test_two_one_word_strings_in_the_old_order_say_which_order_they_were_read_in(endpoint: str) -> None:
    """inference("demo", "hi") cannot be told from the old inference(model_id, prompt) by its values:
    it is read in the documented order (prompt "demo" to model "hi"), and the 404 says so."""
    with pytest.raises(inf.ModelNotFoundError) as caught:
        inf.inference(MODEL, "hi", base_url=endpoint, max_tokens=2)
    message = str(caught.value)
    assert "model 'hi' is not served" in message
    assert f"read as inference(prompt='{MODEL}', model_id=...), the documented order" in message
    assert f"if '{MODEL}' is the model, swap the two arguments" in message
    assert caught.value.status == 404


def test_a_batch_of_one_string_is_refused() -> None:
    with pytest.raises(TypeError, match="prompts must be a list of prompts, got str"):
        inf.inference_batch("hello", "tiny", base_url="http://127.0.0.1:9/v1")
