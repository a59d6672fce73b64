"""Group commit of the ledger to the GCS: a caller is answered only once its change is written, and
every caller waiting at that moment shares one write.

Why a single writer task: journal writes must land in the order the changes were made (a later
delta applied before an earlier one would rebuild another ledger), so at most one is in flight.
While it is, new changes pile up in the ledger's dirty set and go out together in the next write:
the writes per second stay bounded by the GCS round trip while the calls per second grow with the
load. The write runs in a thread, so the actor keeps serving calls meanwhile.

A change nobody waits for (a GPU's usage: monitors republish it every poll, so a restarted
allocator relearns it anyway) goes with the next write, or at most `idle_flush_s` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..core.contract import WriterStats
from ..core.errors import RayVramError
from ..core.ledger import Ledger
from .store import LedgerStore

log = logging.getLogger(__name__)


class LedgerNotWritten(RayVramError, RuntimeError):
    """A change is in the allocator's memory but its write to the GCS failed (retried with the next)."""


class LedgerWriter:
    """Writes `ledger`'s changes through `store`, from the event loop that owns the ledger."""

    def __init__(self, ledger: Ledger, store: LedgerStore, idle_flush_s: float):
        self._ledger = ledger
        self._store = store
        self._idle_flush_s = idle_flush_s
        self._requested = 0  # write rounds asked for
        self._written = 0  # the highest request a finished write covered
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._unwritten: list[tuple[str, str]] = []  # (kind, payload) taken from the ledger, not yet written
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._rounds = self._writes = self._failed = 0

    def start(self) -> None:
        """Start the writer on the running event loop (again if it stopped)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def durable(self) -> None:
        """Return once every change made so far is in the GCS; raise `LedgerNotWritten` if its write failed."""
        if self._ledger.dirty:
            self._requested += 1
        target = self._requested
        if self._written >= target:
            return
        self.start()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        assert self._wake is not None
        self._wake.set()
        await future

    def stats(self) -> WriterStats:
        store = self._store.stats()
        return WriterStats(rounds=self._rounds, writes=self._writes, failed_writes=self._failed, store=store)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._idle_flush_s)
            self._wake.clear()
            target = self._requested
            self._rounds += 1
            try:
                self._take()  # synchronous: the ledger cannot change while it is serialised
                while self._unwritten:
                    kind, payload = self._unwritten[0]
                    write = self._store.compact if kind == "snapshot" else self._store.append
                    await asyncio.to_thread(write, payload)
                    self._unwritten.pop(0)
                    self._writes += 1
            except Exception as error:
                self._failed += 1
                log.exception("ledger write failed; %d write(s) kept for the next round", len(self._unwritten))
                self._settle(target, LedgerNotWritten(f"the ledger change was not written to the GCS: {error}"))
                continue
            self._written = target
            self._settle(target, None)

    def _take(self) -> None:
        """Move the ledger's changes into the queue of writes: a whole snapshot when one is due."""
        if self._store.should_compact() and not self._unwritten:
            self._unwritten.append(("snapshot", self._ledger.take_snapshot()))
            return
        delta = self._ledger.take_delta()
        if delta is not None:
            self._unwritten.append(("delta", delta.model_dump_json()))

    def _settle(self, target: int, error: Exception | None) -> None:
        """End the waits covered by the round that asked for up to `target`."""
        done = [(t, f) for t, f in self._waiters if t <= target]
        self._waiters = [(t, f) for t, f in self._waiters if t > target]
        for _, future in done:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
