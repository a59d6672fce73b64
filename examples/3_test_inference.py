"""Every way to call a model: sync, async, batch, streaming, and structured output.

    python examples/3_test_inference.py [MODEL_ID]      (default: demo, what `ray-vram up` serves)

The endpoint is discovered from the serving controller; set $RAY_VRAM_ENDPOINT to skip that.
The demo model has random weights: the text is gibberish, the structure is real.
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel, Field

from vram_scheduler import (
    StructuredOutputError,
    a_inference,
    a_inference_batch,
    a_streaming_batch,
    inference,
    inference_batch,
    streaming_batch,
)


class City(BaseModel):
    city: str = Field(max_length=20)
    sunny: bool


def main(model_id: str = "demo") -> None:
    print("sync:", repr(inference("Say hello", model_id, max_tokens=8, temperature=0.7, seed=1)))
    print("async:", repr(asyncio.run(a_inference("Say hello", model_id, max_tokens=8))))

    answers = inference_batch([f"Count to {n}" for n in range(4)], model_id, concurrency=2, max_tokens=6)
    print(f"batch: {len(answers)} answers")

    async def concurrent() -> list:
        return await a_inference_batch(["a", "b", "c"], model_id, concurrency=3, max_tokens=4)

    print(f"async batch: {len(asyncio.run(concurrent()))} answers")

    print("streaming (sync generator):")
    for event in streaming_batch(["Tell a story", "List colours"], model_id, max_tokens=8):
        if event.done:
            print(f"  [{event.index}] done ({event.finish_reason})")
        else:
            print(f"  [{event.index}] {event.text!r}")

    async def stream_async() -> int:
        pieces = 0
        async for event in a_streaming_batch(["One more"], model_id, max_tokens=6):
            pieces += not event.done
        return pieces

    print(f"streaming (async iterator): {asyncio.run(stream_async())} pieces")

    try:
        city = inference("Which city is sunny?", model_id, structured_output=City, max_tokens=64)
        print("structured:", city.model_dump())
    except StructuredOutputError as error:  # the model's JSON did not validate against City
        print("structured output did not validate:", error)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
