"""Monitor heartbeats through Ray's GCS key-value store, beside the allocator's task queue.

A node is stale when its monitor went quiet. Judged by when `update_inventory` calls arrive, a
burst of reservations queued ahead of them made a live node stale: Ray hands an actor its calls
in order, whatever their concurrency group (measured: a call in a group of its own still waited
1.3 s behind 3,000 queued calls to a trivial actor). Judged by the timestamp inside an inventory,
it would trust every node's clock, and the inventory would still arrive late.

So each monitor also writes the time of its latest sample under `monitor/heartbeat/<node>`, a GCS
write that no actor queue delays, and the allocator polls those keys: a value that changed is a
sign of life, dated by the allocator's own clock. Only change counts, so a dead monitor's last
heartbeat, left in the store, keeps nobody fresh; a monitor without heartbeats is judged by its
`update_inventory` calls alone, as before.
"""

from __future__ import annotations

import threading

from ray.experimental import internal_kv

HEARTBEAT_PREFIX = "monitor/heartbeat/"


def write_heartbeat(node: str, sampled_at: float, namespace: str) -> None:
    """The monitor of `node` took a sample at `sampled_at` (its clock: compared only for change)."""
    internal_kv._internal_kv_put(HEARTBEAT_PREFIX + node, repr(sampled_at), overwrite=True, namespace=namespace)


def forget_heartbeats(namespace: str) -> int:
    return internal_kv._internal_kv_del(HEARTBEAT_PREFIX, del_by_prefix=True, namespace=namespace)


class HeartbeatReader:
    """Which nodes' monitors wrote a new heartbeat since the last look."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._seen: dict[str, bytes] | None = None
        self._lock = threading.Lock()  # the allocator reads from its watch loop's thread and its own

    def changed(self) -> list[str]:
        """Nodes whose heartbeat changed since the previous call. The first call only takes note:
        a value found at start may be a dead monitor's last."""
        with self._lock:
            keys = internal_kv._internal_kv_list(HEARTBEAT_PREFIX, namespace=self.namespace)
            client = internal_kv.internal_kv_get_gcs_client()
            values = client.internal_kv_multi_get(keys, self.namespace.encode()) if keys else {}
            now = {key.decode().removeprefix(HEARTBEAT_PREFIX): value for key, value in values.items()}
            before, self._seen = self._seen, now
        if before is None:
            return []
        return sorted(node for node, value in now.items() if before.get(node) != value)
