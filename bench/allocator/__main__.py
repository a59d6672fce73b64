"""python -m bench.allocator [--clients 4] [--sizes 0,1000,5000,10000] [--single 2000] [--batched 10000]
                           [--batch 250] [--out bench/results/allocator.json]

On a local Ray started here, one `vram_allocator` with one node (8 GPUs) whose monitor link
(`AllocatorLink`: inventory every 0.5 s plus heartbeats; stale after 2 s) runs throughout:

1. For each ledger size (live reservations before the phase), `--clients` client processes reserve
   then release their own ids: `--single` ids in all as single calls (32 in flight per client),
   then `--batched` ids as `reserve_many`/`release_many` of `--batch` ids (2 in flight per client).
   A rate is the ids done / (last client's end - first client's start). GCS writes counts the
   journal writes and snapshots in the phase (group commit: many calls per write). CPU/op: the
   allocator process's CPU time over both phases per id (independent of the machine's other load;
   1e6 / it bounds the rate with one core to itself). Monitor read:
   the node's state as its monitor fetches it after each publish (all reservations are on n0).
2. The design before this one wrote the whole ledger to the GCS on every change: that write alone,
   timed at each size, bounds its rate from above.
3. At the largest size, half the clients reserve single calls and half batches, then release every
   other id; the allocator is killed `--kill-after` s in. Reported: how long until it answers again,
   what its reload read, and whether the ledger then holds exactly what the clients believe they
   hold (lost, doubled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # after the environment above
from ray.experimental import internal_kv

from vram_scheduler.allocator.actor import AllocatorClient, get_vram_allocator
from vram_scheduler.allocator.store import forget_ledger
from vram_scheduler.core.config import PlacementSettings
from vram_scheduler.core.contract import ReserveRequest
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ledger import Ledger
from vram_scheduler.core.ray_names import NAMESPACE
from vram_scheduler.monitor.publisher import AllocatorLink

from .clients import MIB, Client

ROOT = Path(__file__).resolve().parents[2]
GOAL_OPS, GOAL_LIVE = 5000, 10_000
STALE_AFTER_S, MONITOR_INTERVAL_S = 2.0, 0.5
NODE = NodeInventory.model_validate(
    {"node": "n0", "gpus": [{"index": i, "uuid": f"GPU-n0-{i}", "total_gb": 80} for i in range(8)]}
)


def phase(clients: list, op: str, ids: list[list[str]], batch: int, window: int) -> dict:
    results = ray.get([c.run.remote(op, mine, batch, window) for c, mine in zip(clients, ids, strict=True)])
    seconds = max(r["ended"] for r in results) - min(r["began"] for r in results)
    ops = sum(r["ops"] for r in results)
    failed = sum(r["failed"] for r in results)
    problems = sorted({p for r in results for p in r["problems"]})[:3]
    return {"ops": ops, "seconds": round(seconds, 3), "per_s": round(ops / seconds), "failed": failed, "why": problems}


def actor_cpu_s(allocator) -> float:
    """CPU seconds the allocator's process has used (all its threads): its cost, whatever the
    machine's other load does to the wall-clock rates."""
    return ray.get(allocator.__ray_call__.remote(lambda self: time.process_time()))


def writes(allocator) -> int:
    store = AllocatorClient(allocator).persistence().store
    return store.deltas_written + store.snapshots_written


def fill(allocator, start: int, stop: int) -> None:
    for first in range(start, stop, 1000):
        last = min(stop, first + 1000)
        chunk = [ReserveRequest(replica_id=f"fill-{i}", model_id="f", bytes=MIB) for i in range(first, last)]
        assert all(o.error is None for o in AllocatorClient(allocator).reserve_many(chunk))


def whole_ledger_write_s(live: int) -> float:
    """The earlier design's write on every change: the whole ledger's JSON put to the GCS (median of 5)."""
    ledger = Ledger()
    ledger.configure(PlacementSettings(replica_overhead_gb=0, stale_after_s=3600))
    ledger.update_inventory(NODE, time.time())
    for i in range(live):
        ledger.reserve(f"fill-{i}", "f", MIB, time.time())
    times = []
    for _ in range(5):
        began = time.perf_counter()
        internal_kv._internal_kv_put("bench/whole-ledger", ledger.dumps(), overwrite=True, namespace="ray-vram-bench")
        times.append(time.perf_counter() - began)
    internal_kv._internal_kv_del("bench/whole-ledger", namespace="ray-vram-bench")
    return statistics.median(times)


def monitor_read_ms(allocator) -> float:
    """What the node's monitor asks after each publish, `get_vram_state(n0)`, timed from here (median of 3)."""
    times = []
    for _ in range(3):
        began = time.perf_counter()
        ray.get(allocator.get_vram_state.remote(NODE.node))
        times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1000, 1)


def split(prefix: str, total: int, clients: int) -> list[list[str]]:
    return [[f"{prefix}-c{c}-{i}" for i in range(total // clients)] for c in range(clients)]


def measure_size(allocator, clients: list, live: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    read_ms = monitor_read_ms(allocator)
    for mode, total, batch, window in (("single", args.single, 1, 32), ("batch", args.batched, args.batch, 2)):
        ids = split(f"{mode}-{live}", total, len(clients))
        before, cpu_before = writes(allocator), actor_cpu_s(allocator)
        reserved = phase(clients, "reserve", ids, batch, window)
        released = phase(clients, "release", ids, batch, window)
        both = reserved["ops"] + released["ops"]
        cpu = actor_cpu_s(allocator) - cpu_before
        rows.append(
            {
                "live": live,
                "mode": mode,
                "batch": batch,
                "reserve": reserved,
                "release": released,
                "reserve_release_per_s": round(both / (reserved["seconds"] + released["seconds"])),
                "gcs_writes": writes(allocator) - before,
                "allocator_cpu_us_per_op": round(cpu / both * 1e6, 1),
                "monitor_read_ms": read_ms,
            }
        )
    return rows


def kill_mid_burst(allocator, clients: list, live: int, args: argparse.Namespace) -> dict:
    half = len(clients) // 2
    layout = [(1, 32, args.kill_single)] * half + [(args.kill_batch, 1, args.kill_batched)] * (len(clients) - half)
    ids = [[f"kill-c{c}-{i}" for i in range(count)] for c, (_, _, count) in enumerate(layout)]
    refs = [
        client.churn.remote(mine, batch, window)
        for client, mine, (batch, window, _) in zip(clients, ids, layout, strict=True)
    ]
    time.sleep(args.kill_after)
    killed_at = time.monotonic()
    ray.kill(allocator, no_restart=False)
    ray.get(allocator.ping.remote())
    back_s = time.monotonic() - killed_at
    results = ray.get(refs)
    burst_s = max(r["ended"] for r in results) - min(r["began"] for r in results)
    expected = {f"fill-{i}" for i in range(live)}
    for client in clients:
        expected |= set(ray.get(client.holding.remote()))
    held = [r.replica_id for r in AllocatorClient(allocator).reservations()]
    persisted = AllocatorClient(allocator).persistence().store.model_dump()
    return {
        "live": live,
        "layout": [
            {"client": c, "batch": batch, "in_flight": window, "reserve_ids": count, "then_release": len(ids[c][::2])}
            for c, (batch, window, count) in enumerate(layout)
        ],
        "killed_after_s": args.kill_after,
        "answered_again_after_s": round(back_s, 3),
        "reload": persisted["loaded"],
        "burst_s": round(burst_s, 3),
        "ops": sum(r["ops"] for r in results),
        "refused": sum(r["failed"] for r in results),
        "why": sorted({p for r in results for p in r["problems"]})[:3],
        "expected": len(expected),
        "held": len(held),
        "lost": len(expected - set(held)),
        "doubled": len(held) - len(set(held)) + len(set(held) - expected),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sizes", default="0,1000,5000,10000")
    parser.add_argument("--single", type=int, default=2000, help="ids per single-call phase, all clients together")
    parser.add_argument("--batched", type=int, default=20000, help="ids per batch phase, all clients together")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--kill-after", type=float, default=1.0)
    parser.add_argument("--kill-single", type=int, default=1000, help="ids per single-call client in the kill run")
    parser.add_argument("--kill-batched", type=int, default=5000, help="ids per batch client in the kill run")
    parser.add_argument("--kill-batch", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "allocator.json"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    errors: list[str] = []
    link = AllocatorLink(None, NODE.node, MONITOR_INTERVAL_S, lambda kind, message: errors.append(message))
    try:
        forget_ledger(NAMESPACE)
        allocator = get_vram_allocator()
        AllocatorClient(allocator).configure(PlacementSettings(replica_overhead_gb=0, stale_after_s=STALE_AFTER_S))
        link.start()
        stop_monitor = _publish_forever(link)
        while not link.published:
            time.sleep(0.05)
        clients = [Client.remote() for _ in range(args.clients)]
        ray.get([c.__ray_ready__.remote() for c in clients])
        rows, baseline, live = [], {}, 0
        for size in sizes:
            fill(allocator, live, size)
            live = size
            rows += measure_size(allocator, clients, live, args)
            baseline[str(size)] = round(whole_ledger_write_s(size) * 1000, 3)
        kill = kill_mid_burst(allocator, clients, live, args)
        stop_monitor()
    finally:
        link.stop()
        ray.shutdown()
    result = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "ray": ray.__version__,
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "clients": args.clients,
        "layout": f"{args.clients} client processes (Ray actors) on the same local Ray as the allocator; "
        f"single calls with 32 in flight per client, batches of {args.batch} with 2 in flight per client",
        "monitor": f"AllocatorLink publishing n0 every {MONITOR_INTERVAL_S} s with heartbeats; "
        f"stale after {STALE_AFTER_S} s",
        "rows": rows,
        "whole_ledger_write_ms": baseline,
        "kill": kill,
        "monitor_errors": errors[:5],
    }
    at_goal = [r for r in rows if r["live"] == max(sizes)]
    result["goal"] = {
        "ops_per_s": GOAL_OPS,
        "live": GOAL_LIVE,
        "measured_at_live": max(sizes),
        **{f"{r['mode']}_reserve_release_per_s": r["reserve_release_per_s"] for r in at_goal},
    }
    render(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


def _publish_forever(link: AllocatorLink) -> Callable[[], None]:
    """The node's monitor, as the real poll loop drives its link: a fresh sample every interval."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            link.offer(NODE.model_copy(update={"timestamp": time.time()}))
            stop.wait(MONITOR_INTERVAL_S)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join()

    return stopper


def render(result: dict) -> None:
    load = result["load_average_1m"]
    print(f"Allocator under a burst — {result['layout']}; {result['cpus']} CPUs, Ray {result['ray']}")
    print(f"machine load average (1 min): {load['before']} before, {load['after']} after (shared machine)")
    print(f"monitor: {result['monitor']}")
    head = f"{'live':>6} {'mode':>6} {'batch':>5} {'reserve/s':>10} {'release/s':>10} {'res+rel/s':>10} {'CPU/op':>8}"
    print(head + f" {'GCS writes':>10} {'refused':>7} {'monitor read':>12} {'before: whole-ledger write':>27}")
    for r in result["rows"]:
        old_ms = result["whole_ledger_write_ms"][str(r["live"])]
        old = f"{old_ms:.2f} ms = max {1000 / old_ms:,.0f}/s" if r["mode"] == "single" else ""
        refused = r["reserve"]["failed"] + r["release"]["failed"]
        rates = f"{r['reserve']['per_s']:>10,} {r['release']['per_s']:>10,} {r['reserve_release_per_s']:>10,}"
        rates += f" {r['allocator_cpu_us_per_op']:>6.0f}us"
        read = f"{r['monitor_read_ms']:.1f} ms" if r["mode"] == "single" else ""
        print(
            f"{r['live']:>6,} {r['mode']:>6} {r['batch']:>5} {rates} {r['gcs_writes']:>10,} {refused:>7} {read:>12} "
            f"{old:>27}"
        )
    goal = result["goal"]
    target = goal["ops_per_s"]
    batch_rate = goal.get("batch_reserve_release_per_s", 0)
    single_rate = goal.get("single_reserve_release_per_s", 0)
    print(
        f"goal >= {target:,} reserve+release/s at {goal['live']:,} live (measured at {goal['measured_at_live']:,}): "
        f"batch {batch_rate:,}/s "
        f"({'met' if batch_rate >= target else 'MISSED'}), single calls {single_rate:,}/s "
        f"({'met' if single_rate >= target else 'missed'})"
    )
    k = result["kill"]
    reload = k["reload"]
    print(
        f"kill mid-burst at {k['live']:,} live: killed {k['killed_after_s']} s in; "
        f"answering again after {k['answered_again_after_s']:.2f} s (reload from {reload['source']} + "
        f"{reload['journal_writes']} journal writes, {reload['bytes_read']:,} bytes, {reload['seconds']:.3f} s, "
        f"{reload['reservations']:,} reservations)"
    )
    print(
        f"  burst {k['ops']:,} ops in {k['burst_s']:.1f} s, refused {k['refused']}; ledger holds {k['held']:,}, "
        f"clients expect {k['expected']:,}: lost {k['lost']}, doubled {k['doubled']}"
    )
    refusals = [w for r in result["rows"] for w in r["reserve"]["why"] + r["release"]["why"]] + k["why"]
    for why in sorted(set(refusals))[:3]:
        print(f"  refused: {why}")
    if result["monitor_errors"]:
        print(f"monitor link errors: {result['monitor_errors']}")


if __name__ == "__main__":
    raise SystemExit(main())
