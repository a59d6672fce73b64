"""Serving under faults: real Ray — a head and a worker node (`ray.cluster_utils.Cluster`, one
machine, the nodes on 127.0.0.1 and 127.0.0.2) —, real vLLM (CPU) replicas, a steady load from two
client processes (plain and streamed completions in turn; lighter while a fault's recovery is
awaited, see `RECOVERY_GAP_S`), and one fault at a time: a replica's
vLLM engine process killed mid-stream, a replica (its actor) killed, one of the two routers killed,
the controller actor killed, the allocator actor killed, the monitor stopped, the worker node
removed. The engines run in their own processes here (`VLLM_ENABLE_V1_MULTIPROCESSING=1`, as on a
GPU), so an engine can die under a replica that lives.

For each fault the suite records what the clients saw (requests and errors by kind in the fault's
window), how long until full service (a fresh request answered, every replica ready, the ledger
equal to the replicas), whether the ledger holds exactly one reservation per replica, each where
it was planned (no leak, no double booking; a replica the fault moved may hold a new one, on a
node that is still there) and whether each replica runs on the GPU its reservation names. It
prints one table and writes $RAY_VRAM_FAULTS_RESULTS (default .work/faults.json; the committed
record is bench/results/faults.json).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from waiting import wait_until

from vram_scheduler.allocator.actor import AllocatorClient, get_vram_allocator
from vram_scheduler.core.loopback import keep_ray_on_loopback
from vram_scheduler.core.ray_names import CONTROLLER_ACTOR, NAMESPACE, NODE_NAME_LABEL
from vram_scheduler.serving.app import model_app_name
from vram_scheduler.serving.router.router import ROUTER_APP, ROUTER_DEPLOYMENT

from .conftest import HERE, Stack, deployed, free_port, start_monitor, stream_outcome, two_models

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("RAY_VRAM_FAULTS_RESULTS", ROOT / ".work" / "faults.json"))
MODELS = ("alpha", "beta")
INVENTORY = HERE / "inventory-two-nodes.yaml"
HEAD, WORKER = "ci-head", "ci-worker"
ENGINE_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
LONG_STREAM = {"model": "alpha", "prompt": "Our team", "max_tokens": 400, "ignore_eos": True, "stream": True}

pytestmark = pytest.mark.slow

#: While a fault's recovery is awaited, from `FULL_LOAD_S` after the fault on, each client waits
#: `RECOVERY_GAP_S` between its requests: a replacement's start (a new replica actor and its engine
#: process, each importing vLLM) then shares the 2 cores with a light load, not a saturating one
#: (back to back, recoveries took 75-100 s). The fault strikes, and its first seconds pass, under
#: the full load.
FULL_LOAD_S = 5.0
RECOVERY_GAP_S = 1.0

#: One client process: a plain and a streamed completion in turn until its stop file appears, one
#: JSON line per request, back to back unless its pace file holds a gap (seconds) to wait between
#: requests. A stream is "ok" when it ends with [DONE] and no error event; one that ends without
#: either is "stream cut" (what must never happen), one that hangs "ReadTimeout".
CLIENT = """
import json, sys, time, pathlib, httpx
base, model, out, stop = sys.argv[1], sys.argv[2], open(sys.argv[3], "a"), pathlib.Path(sys.argv[4])
pace = pathlib.Path(sys.argv[5])
plain = {"model": model, "prompt": "Our team", "max_tokens": 4, "ignore_eos": True}
streamed = dict(plain, max_tokens=24, stream=True)

def stream(client):
    with client.stream("POST", base + "/v1/completions", json=streamed) as response:
        retried = int(response.headers.get("x-ray-vram-attempts", "1")) > 1
        if response.status_code != 200:
            return f"http {response.status_code}", retried
        lines = [line for line in response.iter_lines() if line]
    if any(line.startswith('data: {"error"') for line in lines):
        return "stream error event", retried
    return ("ok" if lines and lines[-1] == "data: [DONE]" else "stream cut"), retried

with httpx.Client(timeout=60) as client:
    turn = 0
    while not stop.exists():
        turn += 1
        start = time.time()
        try:
            retried = False
            if turn % 2:
                response = client.post(base + "/v1/completions", json=plain)
                kind = "ok" if response.status_code == 200 else f"http {response.status_code}"
                retried = int(response.headers.get("x-ray-vram-attempts", "1")) > 1
            else:
                kind, retried = stream(client)
        except httpx.HTTPError as error:
            kind = type(error).__name__
        record = {"start": start, "end": time.time(), "kind": kind, "stream": not turn % 2, "retried": retried}
        out.write(json.dumps(record) + "\\n")
        out.flush()
        gap = float(pace.read_text()) if pace.exists() else 0.0
        time.sleep(max(gap, 0.0 if kind == "ok" else 0.2))
"""


class Load:
    """Two client processes (one per model) against the OpenAI endpoint for the whole module."""

    def __init__(self, stack: Stack, work: Path):
        self.logs = [work / f"client-{model}.jsonl" for model in MODELS]
        self.stop_file = work / "stop"
        self.pace_file = work / "pace"
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, stack.base, model, str(log), str(self.stop_file), str(self.pace_file)]
            )
            for model, log in zip(MODELS, self.logs, strict=True)
        ]

    def pace(self, gap_s: float) -> None:
        """Have the clients wait `gap_s` between requests from their next one on (0: back to back)."""
        written = self.pace_file.with_suffix(".new")
        written.write_text(str(gap_s))
        written.replace(self.pace_file)  # whole: a client never reads half of it

    def seen(self, since: float, until: float) -> Counter[str]:
        """Requests in the window by outcome ("ok", "stream cut", "http 503", an httpx error...),
        how many of them were streams ("streams") and how many the router retried on another
        replica ("retried": its x-ray-vram-attempts header above 1)."""
        kinds: Counter[str] = Counter()
        for log in self.logs:
            lines = log.read_text().splitlines() if log.exists() else []  # a client not started yet
            for line in lines:
                record = json.loads(line)
                if record["end"] >= since and record["start"] <= until:
                    kinds[record["kind"]] += 1
                    kinds["streams"] += record.get("stream", False)
                    kinds["retried"] += record.get("retried", False)
        return kinds

    def started_since(self, since: float, ok: bool = False) -> bool:
        """Whether every client has finished a request it started at `since` or later (`ok`: one that
        was answered). Each client sends one request at a time, so this also means that whatever
        they had in flight at `since` has ended."""
        for log in self.logs:
            lines = log.read_text().splitlines() if log.exists() else []
            records = [json.loads(line) for line in lines[-50:]]
            if not any(r["start"] >= since and (r["kind"] == "ok" or not ok) for r in records):
                return False
        return True

    def close(self) -> None:
        self.stop_file.touch()
        for process in self.processes:
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass
class TwoNodes(Stack):
    cluster: Any
    worker: Any
    worker_monitor: Any
    threads: list[threading.Thread]


@pytest.fixture(scope="module")
def stack() -> Iterator[TwoNodes]:
    """The serving stack on two Ray nodes, each with its monitor (this module's own stack)."""
    from ray.cluster_utils import Cluster

    keep_ray_on_loopback()
    port, metrics_port = free_port(), free_port()
    head = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "labels": {NODE_NAME_LABEL: HEAD}}
    cluster = Cluster(
        initialize_head=True, head_node_args=head | {"include_dashboard": False, "metrics_export_port": metrics_port}
    )
    try:
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2", labels={NODE_NAME_LABEL: WORKER})
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        head_monitor, head_thread = start_monitor(HEAD, cluster.address, INVENTORY)
        worker_monitor, worker_thread = start_monitor(WORKER, cluster.address, INVENTORY)
        config = two_models(port)
        base, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        threads = [head_thread, worker_thread]
        monitors = {"head": head_monitor, "worker": worker_monitor}
        # Each engine in its own process, as on a GPU (the replicas get the caller's VLLM_* at apply).
        in_process = os.environ.get(ENGINE_PROCESS_ENV)
        os.environ[ENGINE_PROCESS_ENV] = "1"
        try:
            with deployed(config, nodes=2) as controller:
                two = TwoNodes(
                    controller,
                    config,
                    base,
                    cluster.address,
                    head_monitor,
                    metrics,
                    cluster,
                    worker,
                    worker_monitor,
                    threads,
                )
                yield two
                monitors["head"] = two.monitor  # the monitor test's replacement
        finally:
            os.environ[ENGINE_PROCESS_ENV] = in_process or "0"
            for monitor in monitors.values():
                monitor.stop()
            for thread in threads:
                thread.join(timeout=10)
            ray.shutdown()
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def load(stack: TwoNodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    running = Load(stack, tmp_path_factory.mktemp("faults"))
    try:
        wait_until(lambda: running.seen(0, time.time()).get("ok"), 60, "a client's first answer, before any fault")
        yield running
    finally:
        running.close()


def ledger() -> dict[str, dict[str, Any]]:
    """The ledger's reservations (as their fields), by replica id."""
    return {r.replica_id: r.model_dump() for r in AllocatorClient().reservations()}


def replicas() -> dict[str, dict[str, Any]]:
    """Each replica's own account (`ReplicaEndpoint` fields: GPU, processes), by replica id."""
    placed = {}
    for model in MODELS:
        infos = serve.get_app_handle(model_app_name(model)).replica_info.remote().result(timeout_s=180)
        placed |= {i["replica_id"]: i for i in infos}
    return placed


def all_ready(stack: Stack) -> bool:
    return all(r.state == "ready" for m in stack.controller.status().models for r in m.replicas)


def answered(stack: Stack) -> bool:
    import httpx

    try:
        body = {"model": "alpha", "prompt": "ping", "max_tokens": 1}
        return httpx.post(stack.base + "/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def routers() -> dict[str, str]:
    """The routers' live Serve replicas (one per router deployment): actor name → Ray node id."""
    alive = {}
    for actor in ray._private.state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") == "ALIVE" and f"{ROUTER_APP}#{ROUTER_DEPLOYMENT}" in name:
            alive[name] = actor["Address"]["NodeID"]
    return alive


def node_id(label: str) -> str:
    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Labels"].get(NODE_NAME_LABEL) == label]
    return node


RESULTS_ROWS: list[dict[str, Any]] = []


def run_fault(
    stack: Stack,
    load: Load,
    name: str,
    inject: Callable[[], None],
    replaced: Callable[[], bool] = lambda: True,
    moved: frozenset[str] = frozenset(),
    timeout_s: float = 300,
) -> dict:
    """Inject, then wait for full service (`replaced`: the killed part runs again); record the row.
    `moved`: replicas the fault may move to another GPU (their node left)."""
    planned = {k: (v["gpu_uuid"], v["bytes"]) for k, v in ledger().items()}
    # The window opens with both models answering: each client has an answer to a request sent from now on.
    now = time.time()
    wait_until(lambda: load.started_since(now, ok=True), 120, f"{name}: both clients answered before the fault")
    start = time.time()
    inject()
    lighter = threading.Timer(FULL_LOAD_S, load.pace, (RECOVERY_GAP_S,))
    lighter.start()

    def back() -> bool:
        try:
            return replaced() and answered(stack) and all_ready(stack) and sorted(ledger()) == sorted(planned)
        except Exception:  # an actor restarting answers nothing for a moment
            return False

    try:
        wait_until(back, timeout_s, f"{name}: full service again", every_s=0.5)
    finally:
        lighter.cancel()
        lighter.join()
        load.pace(0)
    recovered = time.time()
    recovery = recovered - start
    # Requests in flight at recovery finish inside the window: each client has sent one since.
    wait_until(lambda: load.started_since(recovered), 120, f"{name}: a request of each client after recovery")
    seen = load.seen(start, time.time())
    held = ledger()
    now = {k: (v["gpu_uuid"], v["bytes"]) for k, v in held.items()}
    live_nodes = {n["Labels"].get(NODE_NAME_LABEL) for n in ray.nodes() if n["Alive"]}
    running = replicas()
    streams, retried = seen.pop("streams", 0), seen.pop("retried", 0)
    row = {
        "fault": name,
        "requests": sum(seen.values()),
        "streams": streams,
        "retried": retried,
        "client_errors": {k: v for k, v in seen.items() if k != "ok"},
        "recovery_s": round(recovery, 1),
        "ledger_consistent": sorted(now) == sorted(planned)
        and all(now[r] == planned[r] for r in now if r not in moved)
        and all(r["node"] in live_nodes for r in held.values()),
        "replicas_back_on_their_gpus": all(running.get(r, {}).get("gpu_uuid") == gpu for r, (gpu, _) in now.items()),
    }
    RESULTS_ROWS.append(row)
    print("FAULT", json.dumps(row))
    return row


def test_the_routers_run_on_both_nodes(stack: TwoNodes) -> None:
    assert sorted(routers().values()) == sorted([node_id(HEAD), node_id(WORKER)])


def _engine_pid(pids: list[int]) -> int:
    """The vLLM engine-core process among a replica's processes (it names itself VLLM::EngineCore)."""
    import psutil

    for pid in pids[1:]:
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join(psutil.Process(pid).cmdline()) or "EngineCore" in psutil.Process(pid).name():
                return pid
    raise AssertionError(f"no engine-core process among {pids}")


def test_an_engine_process_killed_mid_stream(stack: Stack, load: Load) -> None:
    """alpha-0's engine process dies under it (SIGKILL) while 3 long streams run on alpha. A stream
    the dead engine was serving ends with an OpenAI error event, never cut or hung; the replica
    withdraws from the routers at once, so new requests go to alpha-1, and Serve's health check
    restarts it on the GPU its reservation names."""
    group = serve.get_app_handle(model_app_name("alpha")).replica_info.remote().result(timeout_s=30)
    pids = next(i for i in group if i["replica_id"] == "alpha-0")["pids"]
    engine = _engine_pid(pids)
    outcomes: list[concurrent.futures.Future[str]] = []
    pool = concurrent.futures.ThreadPoolExecutor(3)

    def kill_mid_stream() -> None:
        firsts = [threading.Event() for _ in range(3)]
        outcomes.extend(pool.submit(stream_outcome, stack.base, LONG_STREAM, first) for first in firsts)
        assert all(first.wait(60) for first in firsts), "the streams did not start"
        os.kill(engine, signal.SIGKILL)

    def replaced() -> bool:
        try:
            infos = serve.get_app_handle(model_app_name("alpha")).replica_info.remote().result(timeout_s=5)
        except Exception:
            return False
        return any(i["replica_id"] == "alpha-0" and i.get("pids", pids)[0] != pids[0] for i in infos)

    row = run_fault(stack, load, "engine process killed mid-stream", kill_mid_stream, replaced)
    ended = [future.result(timeout=120).split(":")[0] for future in outcomes]
    pool.shutdown()
    row["long_streams"] = dict(Counter(ended))
    print("FAULT long streams", ended)
    assert not [e for e in ended if e.startswith(("cut", "hung"))], ended
    assert "stream cut" not in row["client_errors"] and "ReadTimeout" not in row["client_errors"], row
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row


def test_a_replica_killed(stack: Stack, load: Load) -> None:
    group = serve.get_app_handle(model_app_name("alpha")).replica_info.remote().result(timeout_s=30)
    victim = next(i for i in group if i["replica_id"] == "alpha-0")["pids"][0]

    def replaced() -> bool:
        try:
            infos = serve.get_app_handle(model_app_name("alpha")).replica_info.remote().result(timeout_s=5)
        except Exception:
            return False
        return any(i["replica_id"] == "alpha-0" and i.get("pids", [victim])[0] != victim for i in infos)

    row = run_fault(stack, load, "replica actor killed (SIGKILL)", lambda: os.kill(victim, signal.SIGKILL), replaced)
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row


def test_one_router_killed(stack: Stack, load: Load) -> None:
    """The other router keeps answering on the endpoint's port; Serve starts a new one."""
    before = routers()
    victim = sorted(before)[0]

    def replaced() -> bool:
        now = routers()
        return len(now) == len(before) and victim not in now

    kill = lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # noqa: E731
    row = run_fault(stack, load, "one of 2 routers killed", kill, replaced)
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row


def test_the_controller_actor_killed(stack: Stack, load: Load) -> None:
    before = stack.controller.status()
    actor = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
    row = run_fault(stack, load, "controller actor killed", lambda: ray.kill(actor, no_restart=False))
    assert row["client_errors"] == {}, "the request path does not go through the controller"
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row
    after = stack.controller.status()
    assert [m.model_id for m in after.models] == [m.model_id for m in before.models]


def test_the_allocator_actor_killed(stack: Stack, load: Load) -> None:
    allocator = get_vram_allocator()
    row = run_fault(stack, load, "allocator actor killed", lambda: ray.kill(allocator, no_restart=False))
    assert row["client_errors"] == {}, "the request path does not go through the allocator"
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row


def test_the_monitor_stopped_and_restarted(stack: TwoNodes, load: Load) -> None:
    def restart() -> None:
        stack.monitor.stop()
        time.sleep(3)
        stack.monitor, thread = start_monitor(HEAD, stack.gcs_address, INVENTORY)
        stack.threads.append(thread)

    row = run_fault(stack, load, "head's monitor stopped 3 s, restarted", restart)
    assert row["client_errors"] == {}, "the request path does not go through the monitor"
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row


def test_the_worker_node_removed(stack: TwoNodes, load: Load) -> None:
    """The worker node leaves (its processes killed, no goodbye) with beta-0 and a router on it: the
    controller frees beta-0's reservation, plans it on the head's GPU with room and redeploys beta,
    whose other replica keeps running, and moves the lost router to the head."""
    on_worker = sorted(r for r, held in ledger().items() if held["node"] == WORKER)
    assert on_worker == ["beta-0"]
    assert sorted(routers().values()) == sorted([node_id(HEAD), node_id(WORKER)])
    beta_1 = replicas()["beta-1"]["pids"]

    def remove() -> None:
        stack.worker_monitor.stop()  # the node's monitor goes with it
        stack.cluster.remove_node(stack.worker, allow_graceful=False)

    def replaced() -> bool:
        return all(held["node"] == HEAD for held in ledger().values()) and len(routers()) == 2

    row = run_fault(stack, load, "worker node removed (beta-0, a router)", remove, replaced, frozenset(on_worker))
    assert row["ledger_consistent"] and row["replicas_back_on_their_gpus"], row
    assert ledger()["beta-0"]["node"] == HEAD
    assert replicas()["beta-1"]["pids"] == beta_1, "the replica that stayed was restarted"
    assert set(routers().values()) == {node_id(HEAD)}


def test_the_table(stack: Stack, load: Load) -> None:
    assert len(RESULTS_ROWS) == 7, RESULTS_ROWS
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "setup": "2 Ray nodes (head + worker), 2 models x 2 vLLM CPU replicas, 2 routers",
                "load": (
                    "2 client processes, 1 per model: 4-token completions and 24-token streams in turn, back to back; "
                    f"{RECOVERY_GAP_S:g} s apart from {FULL_LOAD_S:g} s after a fault until full service"
                ),
                "faults": RESULTS_ROWS,
            },
            indent=2,
        )
        + "\n"
    )
    header = (
        f"{'fault':40} {'requests':>8} {'streams':>7} {'retried':>7} {'client errors':36} {'recovery s':>10} "
        f"{'ledger ok':>9} {'replicas back':>13}"
    )
    lines = [header]
    for row in RESULTS_ROWS:
        errors = ", ".join(f"{k} {v}" for k, v in row["client_errors"].items()) or "none"
        lines.append(
            f"{row['fault']:40} {row['requests']:>8} {row['streams']:>7} {row['retried']:>7} {errors:36} "
            f"{row['recovery_s']:>10} "
            f"{row['ledger_consistent']!s:>9} {row['replicas_back_on_their_gpus']!s:>13}"
        )
    print("\n" + "\n".join(lines))
