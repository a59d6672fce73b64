"""The benchmark's client processes: each a Ray actor driving the allocator with a window of calls
in flight, single calls or batches, and keeping what it believes it holds."""

from __future__ import annotations

import time

import ray

from vram_scheduler.allocator.actor import get_vram_allocator
from vram_scheduler.core.contract import ReserveOutcome, ReserveRequest

MIB = 1 << 20


@ray.remote(num_cpus=0)
class Client:
    """One client process. `run` keeps `window` calls in flight until its ids are done."""

    def __init__(self) -> None:
        self.allocator = get_vram_allocator()
        self.held: set[str] = set()

    def run(self, op: str, ids: list[str], batch: int, window: int) -> dict:
        """`op` ("reserve" or "release") every id, `batch` ids per call (1: the single call).

        Returns wall-clock start and end (time.time, comparable across processes on one machine),
        and the refusals (reserve) or ids that held nothing (release)."""
        chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
        in_flight: dict[ray.ObjectRef, list[str]] = {}
        problems: list[str] = []
        began = time.time()
        for chunk in chunks:
            in_flight[self._submit(op, chunk, batch)] = chunk
            while len(in_flight) >= window:
                self._collect(op, in_flight, problems)
        while in_flight:
            self._collect(op, in_flight, problems)
        ended = time.time()
        return {"began": began, "ended": ended, "ops": len(ids), "problems": problems[:5], "failed": len(problems)}

    def churn(self, ids: list[str], batch: int, window: int) -> dict:
        """Reserve every id, then release every other one: a deploy's burst and a partial rollback."""
        reserved = self.run("reserve", ids, batch, window)
        released = self.run("release", ids[::2], batch, window)
        return {
            "began": reserved["began"],
            "ended": released["ended"],
            "ops": reserved["ops"] + released["ops"],
            "problems": reserved["problems"] + released["problems"],
            "failed": reserved["failed"] + released["failed"],
        }

    def holding(self) -> list[str]:
        return sorted(self.held)

    def _submit(self, op: str, chunk: list[str], batch: int) -> ray.ObjectRef:
        if batch == 1:
            if op == "reserve":
                return self.allocator.reserve.remote(chunk[0], "m", MIB)
            return self.allocator.release.remote(chunk[0])
        if op == "reserve":
            return self.allocator.reserve_many.remote(
                [ReserveRequest(replica_id=r, model_id="m", bytes=MIB) for r in chunk]
            )
        return self.allocator.release_many.remote(chunk)

    def _collect(self, op: str, in_flight: dict[ray.ObjectRef, list[str]], problems: list[str]) -> None:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        chunk = in_flight.pop(ref)
        try:
            answer = ray.get(ref)
        except Exception as error:  # a refusal: counted, not fatal
            problems.append(str(error).splitlines()[-1])
            return
        if op == "reserve":
            outcomes = answer if isinstance(answer, list) else [ReserveOutcome(replica_id=chunk[0])]
            for outcome in outcomes:
                if outcome.error is None:
                    self.held.add(outcome.replica_id)
                else:
                    problems.append(outcome.error)
        else:
            # A release retried after a restart answers False for what the first try released:
            # the client knows it asked, so it holds none of these any more.
            self.held.difference_update(chunk)
