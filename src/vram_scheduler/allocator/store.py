"""The allocator's ledger in Ray's GCS key-value store: a snapshot plus a journal of deltas.

Writing the whole ledger on every change made each change cost as much as the ledger is large
(362 reservations/s with one client, slowing as it grew). Here a change costs one small write:

- `allocator/snapshot`: `{"generation": g, "ledger": <LedgerSnapshot>}`, the whole ledger, rarely;
- `allocator/journal/<g>/<seq>`: one `LedgerDelta` per write, numbered in the order written.

Loading reads the snapshot and replays its generation's journal in order. Compacting writes the
whole ledger as generation g+1, then deletes generation g's journal; a kill in between leaves an
old journal that the next load ignores and deletes. Deltas hold values, not operations, so a
journal overlapping its snapshot replays to the same ledger. A compaction is due when the journal
outgrows the snapshot (or `compact_min_bytes`), which keeps both the replay at load and the
amortised cost of snapshots proportional to the changes made.

`allocator/ledger` (the earlier format: the whole ledger, rewritten on every change) is loaded when
there is no snapshot yet, and deleted by the first compaction.
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

from pydantic import BaseModel, Field, ValidationError
from ray.experimental import internal_kv

from ..core.config import StrictModel, describe_validation_error
from ..core.contract import LoadReport, StoreStats
from ..core.errors import RayVramError
from ..core.ledger import Ledger
from ..core.ledger_models import LedgerDelta, LedgerSnapshot

PREFIX = "allocator/"
LEGACY_KEY = PREFIX + "ledger"
SNAPSHOT_KEY = PREFIX + "snapshot"
JOURNAL_PREFIX = PREFIX + "journal/"
#: Compact once the journal holds this much (or more than the snapshot, whichever is larger).
COMPACT_MIN_BYTES = 1 << 20
#: ...or this many writes, whatever their size (each is one key to read back at load).
COMPACT_MAX_WRITES = 2000
_MULTI_GET_CHUNK = 256

_M = TypeVar("_M", bound=BaseModel)
log = logging.getLogger(__name__)


class LedgerStoreError(RayVramError, RuntimeError):
    """The persisted ledger cannot be read or written; the message names the key and why."""


class StoredSnapshot(StrictModel):
    """The value under `allocator/snapshot`."""

    generation: int = Field(ge=0)
    ledger: LedgerSnapshot


def _generation_prefix(generation: int) -> str:
    return f"{JOURNAL_PREFIX}{generation:08d}/"


def journal_key(generation: int, seq: int) -> str:
    return f"{_generation_prefix(generation)}{seq:010d}"


class LedgerStore:
    """Reads and writes the ledger's keys (namespace `namespace`). Not thread-safe: one writer."""

    def __init__(
        self,
        namespace: str,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        compact_max_writes: int = COMPACT_MAX_WRITES,
    ):
        self.namespace = namespace
        self.compact_min_bytes = compact_min_bytes
        self.compact_max_writes = compact_max_writes
        self._generation = 0
        self._seq = 0
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._legacy = False
        self._deltas_written = 0
        self._snapshots_written = 0
        self._loaded = LoadReport()

    # -- reading ----------------------------------------------------------------------------

    def load(self) -> Ledger:
        """The ledger as persisted: snapshot (or the legacy key) plus its journal, replayed in order."""
        began = time.perf_counter()
        report = LoadReport()
        raw = self._get(SNAPSHOT_KEY)
        if raw is not None:
            stored = self._parse(StoredSnapshot, raw, SNAPSHOT_KEY)
            snapshot, self._generation, report.source = stored.ledger, stored.generation, "snapshot"
        elif (raw := self._get(LEGACY_KEY)) is not None:
            snapshot, self._generation, report.source = self._parse(LedgerSnapshot, raw, LEGACY_KEY), 0, "legacy"
            self._legacy = True
        else:
            snapshot, self._generation = LedgerSnapshot(), 0
        self._snapshot_bytes = len(raw or b"")
        report.bytes_read = self._snapshot_bytes
        mine_prefix = _generation_prefix(self._generation)
        keys = sorted(key.decode() for key in internal_kv._internal_kv_list(JOURNAL_PREFIX, namespace=self.namespace))
        stale = [key for key in keys if not key.startswith(mine_prefix)]
        mine = [key for key in keys if key.startswith(mine_prefix)]
        for key in stale:
            internal_kv._internal_kv_del(key, namespace=self.namespace)
        if stale:
            log.info("deleted %d journal key(s) of a superseded generation (a compaction was cut short)", len(stale))
        self._seq, self._journal_bytes = 0, 0
        for key, value in self._multi_get(mine):
            self._parse(LedgerDelta, value, key).apply_to(snapshot)
            self._journal_bytes += len(value)
            self._seq = int(key.rsplit("/", 1)[1]) + 1
        report.journal_writes = len(mine)
        report.bytes_read += self._journal_bytes
        report.stale_keys_deleted = len(stale)
        report.reservations = len(snapshot.entries)
        report.seconds = round(time.perf_counter() - began, 4)
        self._loaded = report
        return Ledger(snapshot, copy=False)

    def _get(self, key: str) -> bytes | None:
        return internal_kv._internal_kv_get(key, namespace=self.namespace)

    def _multi_get(self, keys: list[str]) -> list[tuple[str, bytes]]:
        client = internal_kv.internal_kv_get_gcs_client()
        out = []
        for start in range(0, len(keys), _MULTI_GET_CHUNK):
            chunk = keys[start : start + _MULTI_GET_CHUNK]
            values = client.internal_kv_multi_get([k.encode() for k in chunk], self.namespace.encode())
            for key in chunk:
                value = values.get(key.encode())
                if value is None:
                    raise LedgerStoreError(f"journal key {key!r} was listed but has no value ({self.namespace})")
                out.append((key, value))
        return out

    def _parse(self, model: type[_M], raw: bytes, key: str) -> _M:
        try:
            return model.model_validate_json(raw)
        except ValidationError as error:
            problems = "; ".join(describe_validation_error(error)[:3])
            raise LedgerStoreError(
                f"{key!r} (namespace {self.namespace}, {len(raw)} bytes) is not a valid {model.__name__}: {problems}"
            ) from None

    # -- writing (one writer: `LedgerWriter`) -----------------------------------------------

    def append(self, delta_json: str) -> None:
        """Write one delta as the journal's next key."""
        key = journal_key(self._generation, self._seq)
        internal_kv._internal_kv_put(key, delta_json, overwrite=True, namespace=self.namespace)
        self._seq += 1
        self._journal_bytes += len(delta_json)
        self._deltas_written += 1

    def should_compact(self) -> bool:
        if self._legacy:
            return True
        return self._seq >= self.compact_max_writes or self._journal_bytes > max(
            self.compact_min_bytes, self._snapshot_bytes
        )

    def compact(self, snapshot_json: str) -> None:
        """Write the whole ledger as the next generation, then drop the journal it supersedes."""
        old = self._generation
        value = f'{{"generation":{old + 1},"ledger":{snapshot_json}}}'
        internal_kv._internal_kv_put(SNAPSHOT_KEY, value, overwrite=True, namespace=self.namespace)
        self._generation, self._seq, self._journal_bytes = old + 1, 0, 0
        self._snapshot_bytes = len(value)
        self._snapshots_written += 1
        # Leftovers of a failed delete are harmless: the next load ignores and deletes them.
        internal_kv._internal_kv_del(_generation_prefix(old), del_by_prefix=True, namespace=self.namespace)
        if self._legacy:
            internal_kv._internal_kv_del(LEGACY_KEY, namespace=self.namespace)
            self._legacy = False

    def stats(self) -> StoreStats:
        return StoreStats(
            generation=self._generation,
            journal_writes=self._seq,
            journal_bytes=self._journal_bytes,
            snapshot_bytes=self._snapshot_bytes,
            deltas_written=self._deltas_written,
            snapshots_written=self._snapshots_written,
            loaded=self._loaded,
        )


def forget_ledger(namespace: str) -> int:
    """Delete every persisted key of the ledger (a fresh allocator starts empty); returns how many."""
    return internal_kv._internal_kv_del(PREFIX, del_by_prefix=True, namespace=namespace)
