"""The ledger under load: 32 concurrent clients (4 client actors on two worker nodes × 8 threads)
doing 2,000 random reserve/release operations, with and without the allocator being killed mid-run.

Afterwards the ledger must hold exactly the reservations the clients believe they hold (nothing
lost, nothing duplicated), and no GPU may ever be booked beyond its total (an auditor samples the
state throughout the run)."""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
import ray

from vram_scheduler.allocator.actor import AllocatorClient, ReservationError
from vram_scheduler.core.capacity import DEFAULT_OVERHEAD_GB
from vram_scheduler.core.config import GIB, PlacementSettings, gib_to_bytes
from vram_scheduler.core.contract import Reservation, VRAMState
from vram_scheduler.core.inventory import NodeInventory

pytestmark = pytest.mark.slow

CLIENT_ACTORS = 4
THREADS = 8  # per client actor: 32 concurrent clients
OPERATIONS = 2000
OVERHEAD_GB = DEFAULT_OVERHEAD_GB
# Two nodes of mixed GPUs (GiB), one with memory used by something ray-vram does not manage.
NODES = {"gpu-a": [24, 16, 8], "gpu-b": [80, 12]}
UNMANAGED_GB = {"GPU-gpu-b-1": 2.5}
SIZES_GB = [0.5, 1, 1.5, 2, 3, 4, 6, 10]


def inventory(node: str) -> NodeInventory:
    totals = NODES[node]
    return NodeInventory.model_validate(
        {
            "node": node,
            "gpus": [
                {
                    "index": i,
                    "uuid": f"GPU-{node}-{i}",
                    "name": "NVIDIA L4",
                    "total_gb": total,
                    "used_gb": UNMANAGED_GB.get(f"GPU-{node}-{i}", 0),
                }
                for i, total in enumerate(totals)
            ],
        }
    )


GPU_UUIDS = [f"GPU-{node}-{i}" for node, totals in NODES.items() for i in range(len(totals))]


@ray.remote(num_cpus=0, max_concurrency=THREADS)
class Client:
    """Runs one client loop per call; calls run concurrently on the actor's threads."""

    def run(self, name: str, operations: int, seed: int) -> dict[str, Reservation]:
        allocator = AllocatorClient()
        rng = random.Random(seed)
        held: dict[str, Reservation] = {}
        for step in range(operations):
            roll = rng.random()
            if held and roll < 0.35:
                replica_id = rng.choice(sorted(held))
                allocator.release(replica_id)
                del held[replica_id]
            elif held and roll < 0.45:  # the same request again: the same reservation back
                replica_id = rng.choice(sorted(held))
                r = held[replica_id]
                assert allocator.reserve(replica_id, r.model_id, r.bytes) == r
            else:
                replica_id = f"{name}-{step}"
                size = gib_to_bytes(rng.choice(SIZES_GB))
                target = rng.choice(GPU_UUIDS) if rng.random() < 0.3 else None
                with contextlib.suppress(ReservationError):  # full: a refusal is the correct answer
                    held[replica_id] = allocator.reserve(replica_id, f"model-{size}", size, target)
        return held


def audit(allocator: AllocatorClient, stop: threading.Event, seen: list[VRAMState], problems: list[str]) -> None:
    """Sample the allocator's state during the run; record any GPU booked beyond its total."""
    while not stop.is_set():
        try:
            state = AllocatorClient(allocator.handle, timeout_s=30).vram_state()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue
        seen.append(state)
        for gpu in state.gpus:
            if gpu.free_bytes < 0 or gpu.unmanaged_bytes + gpu.reserved_bytes > gpu.total_bytes:
                problems.append(f"{gpu.node} GPU {gpu.index} overbooked: {gpu}")
        time.sleep(0.05)


def run_clients(
    allocator: AllocatorClient, seed: int, kills: int = 0
) -> tuple[dict[str, Reservation], list[VRAMState], int]:
    clients = [Client.options(resources={("node_a", "node_b")[i % 2]: 1}).remote() for i in range(CLIENT_ACTORS)]
    per_client = [OPERATIONS // (CLIENT_ACTORS * THREADS)] * (CLIENT_ACTORS * THREADS)
    for i in range(OPERATIONS - sum(per_client)):
        per_client[i] += 1
    stop, samples, problems = threading.Event(), [], []
    auditor = threading.Thread(target=audit, args=(allocator, stop, samples, problems), daemon=True)
    auditor.start()
    refs = [
        clients[n % CLIENT_ACTORS].run.remote(f"c{n}", per_client[n], seed * 1000 + n)
        for n in range(CLIENT_ACTORS * THREADS)
    ]
    killed = 0
    while killed < kills:
        time.sleep(1.5)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) == len(refs):
            break
        ray.kill(allocator.handle, no_restart=False)  # Ray restarts it; in-flight calls are retried
        killed += 1
    results = ray.get(refs, timeout=600)
    stop.set()
    auditor.join()
    assert not problems, problems[:3]
    for client in clients:
        ray.kill(client)
    held: dict[str, Reservation] = {}
    for result in results:
        assert not set(result) & set(held), "two clients hold one replica id"
        held |= result
    return held, samples, killed


def check_ledger_matches(allocator: AllocatorClient, held: dict[str, Reservation]) -> None:
    reservations = allocator.reservations()
    ids = [r.replica_id for r in reservations]
    assert len(ids) == len(set(ids))
    assert {r.replica_id: r for r in reservations} == held, "ledger differs from what the clients hold"
    state = allocator.vram_state()
    overhead = gib_to_bytes(OVERHEAD_GB)
    for gpu in state.gpus:
        mine = [r for r in held.values() if r.gpu_uuid == gpu.uuid]
        assert gpu.reserved_bytes == sum(r.bytes + overhead for r in mine)
        assert sorted(r.replica_id for r in gpu.replicas) == sorted(r.replica_id for r in mine)
        assert gpu.unmanaged_bytes + gpu.reserved_bytes <= gpu.total_bytes
        assert gpu.free_bytes == gpu.total_bytes - gpu.unmanaged_bytes - gpu.reserved_bytes


def prepare(allocator: AllocatorClient) -> None:
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": OVERHEAD_GB, "stale_after_s": 3600}))
    for node in NODES:
        allocator.update_inventory(inventory(node))


def test_32_clients_2000_operations_no_double_booking(allocator) -> None:
    prepare(allocator)
    held, samples, _ = run_clients(allocator, seed=1)
    check_ledger_matches(allocator, held)
    assert samples, "the auditor saw no state"
    # The run was contended: GPUs filled up and refusals happened (the random mix overfills 162 GiB).
    full = max(sum(g.reserved_bytes for g in s.gpus) for s in samples)
    assert full > 100 * GIB
    print(f"{len(held)} reservations held at the end; {len(samples)} audited states")


def test_killing_the_allocator_mid_run_loses_and_duplicates_nothing(allocator) -> None:
    prepare(allocator)
    held, _, killed = run_clients(allocator, seed=2, kills=2)
    assert killed >= 1, "the run finished before the allocator could be killed"
    assert held, "nothing was reserved across the kills (a restarted allocator that lost its inventory refuses all)"
    check_ledger_matches(allocator, held)
    print(f"killed the allocator {killed}×; {len(held)} reservations held at the end")
