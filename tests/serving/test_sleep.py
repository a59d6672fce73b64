"""More models than the budget holds awake, end to end with real vLLM (CPU) replicas on a declared
inventory: models that sleep beyond the room awake start stopped; a request for one is held while
its replica starts (scale to zero on CPU, where vLLM has no sleep mode), evicting the least recently
used idle replica that is not pinned; requests hopping between the models all answer; a replica with
requests in flight is never evicted (the wake waits for its requests to end); a wake that fails (the
model's files removed) answers a clear error, and its replica stops holding anything until its next
request, once the files are back, starts it; an idle replica goes to sleep by itself after its
model's idle time (the cluster's `placement.sleep.after_idle_s` here), never while a request streams
and never when pinned, and its next request wakes it; the ledger is consistent after every step.

Tests run in file order on one stack (a step's state is the next one's start). vLLM starts: pin
and a at first, then b, a, b, then b three more times, each an operator's wake (SDK: after nap's
failed wake, which loads nothing; then CLI and HTTP API, each before its operator's sleep), then nap
twice (woken by a request, asleep by its idle timer, woken by a stream). Every start costs ~15 s of
a 2-core machine: each one here wakes for a reason of its own, and the model whose wake fails is nap
(no model of its own for that: two actors fewer to start, its replica and its group).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest
import ray
import yaml
from waiting import wait_until

from vram_scheduler.core.loopback import free_port

from .conftest import deployed, model, start_monitor, stream_outcome

pytestmark = pytest.mark.slow

NODE = "ci-gpu-node"
# One 8 GiB GPU; every replica 1.5 GiB + 2 GiB overhead = 3.5: pin (never sleeps) and one model that
# sleeps fit awake together, a third does not.
INVENTORY = {
    "nodes": [{"node": NODE, "gpus": [{"index": 0, "uuid": "GPU-sleep-0", "name": "Test 8GB", "total_gb": 8}]}]
}
NAP = {"after_idle_s": 3600}  # eviction only: no idle sleep during the tests
# placement.sleep.after_idle_s: nap (no sleep of its own) sleeps after this long idle; pin is pinned,
# a and b have their own (NAP).
IDLE_S = 2.0
#: How long the routers hold a request while its replica wakes (a cold start on a busy 2-core machine).
WAKE_WAIT_S = 600.0


@dataclass
class Sleepy:
    controller: Any
    base: str
    nap_dir: Path  # nap's model files (a copy of the demo model): removed to make its wake fail
    gcs_address: str
    ray_metrics: str  # Ray's metrics agent on this node (the replicas' sleep and wake metrics)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sleepy]:
    from vram_scheduler.core.config import parse_config
    from vram_scheduler.core.ray_names import NAMESPACE
    from vram_scheduler.tools.demo.model import ensure_demo_model

    work = tmp_path_factory.mktemp("sleep")
    inventory = work / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    nap_dir = work / "nap-model"
    shutil.copytree(ensure_demo_model(), nap_dir)
    port = free_port()
    models = [
        model("pin", replicas=1, pinned=True),
        model("a", replicas=1, sleep=NAP),
        model("b", replicas=1, sleep=NAP),
        # the demo model's whole length: a long stream
        model("nap", replicas=1, max_model_len=2048) | {"model": str(nap_dir)},
    ]
    serving = {"host": "127.0.0.1", "port": port, "max_wake_wait_s": WAKE_WAIT_S}
    placement = {"replica_overhead_gb": 2, "sleep": {"after_idle_s": IDLE_S}}
    values = {"models": models, "placement": placement, "serving": serving}
    config = parse_config(values, "sleep tests")
    metrics_port = free_port()
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    monitor, thread = start_monitor(NODE, ray.get_runtime_context().gcs_address, inventory)
    try:
        with deployed(config) as controller:
            gcs = ray.get_runtime_context().gcs_address
            yield Sleepy(
                controller, f"http://127.0.0.1:{port}", nap_dir, gcs, f"http://127.0.0.1:{metrics_port}/metrics"
            )
    finally:
        monitor.stop()
        thread.join(timeout=10)
        ray.shutdown()


def states(stack: Sleepy) -> dict[str, str]:
    """Replica id → its state in the ledger, after checking the ledger is consistent: each GPU's
    reserved bytes are what its replicas hold in their states, within its total."""
    state = stack.controller.allocator.vram_state()
    found = {}
    for gpu in state.gpus:
        held = 0
        for replica in gpu.replicas:
            expected = {"awake": replica.bytes + (replica.overhead_bytes or 0), "stopped": 0}.get(replica.state)
            if expected is not None:
                assert replica.held_bytes == expected, replica
            held += replica.held_bytes or 0
            found[replica.replica_id] = replica.state
        assert gpu.reserved_bytes == held and gpu.free_bytes >= 0, gpu
    return found


def chat(stack: Sleepy, name: str) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(stack.base + "/v1/chat/completions", json=body, timeout=900)


def test_more_models_than_fit_awake_are_placed_the_rest_start_stopped(stack: Sleepy) -> None:
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "awake",
        "b-0": "stopped",
        "nap-0": "stopped",
    }
    listed = {m["id"] for m in httpx.get(stack.base + "/v1/models", timeout=30).json()["data"]}
    assert listed == {"pin", "a", "b", "nap"}  # a stopped model answers: a request starts it


def test_requests_hopping_between_models_all_answer_evicting_lru_never_pinned(stack: Sleepy) -> None:
    outcomes = []
    assert chat(stack, "a").status_code == 200  # a used last: b's start evicts it, not pin
    answer = chat(stack, "b")
    outcomes.append(answer.status_code)
    assert answer.headers["x-ray-vram-replica"] == "b-0"
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "stopped",
        "b-0": "awake",
        "nap-0": "stopped",
    }
    first = threading.Event()
    body = {"model": "a", "prompt": "hello", "max_tokens": 8, "stream": True}
    assert stream_outcome(stack.base, body, first, timeout_s=WAKE_WAIT_S) == "done"  # streamed, held while a started
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "awake",
        "b-0": "stopped",
        "nap-0": "stopped",
    }
    for name in ("pin", "a", "pin"):
        outcomes.append(chat(stack, name).status_code)
    assert outcomes == [200] * 4


def test_a_replica_with_requests_in_flight_is_never_evicted(stack: Sleepy) -> None:
    """b's wake needs a's room while a streams: it is refused (pin is pinned, a busy) and tried
    again while the request waits; b starts once a's stream is over, evicting a then."""
    first = threading.Event()
    body = {"model": "a", "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    outcome: list[tuple[str, float]] = []
    streaming = threading.Thread(
        target=lambda: outcome.append(
            (stream_outcome(stack.base, body, first, timeout_s=WAKE_WAIT_S), time.monotonic())
        )
    )
    streaming.start()
    assert first.wait(120), "the stream never started"
    deadline = time.monotonic() + 60
    while "a-0" not in stack.controller.allocator.in_flight():
        assert streaming.is_alive(), f"the stream ended before a reported it in flight: {outcome}"
        assert time.monotonic() < deadline, "a-0 never reported its request in flight"
        time.sleep(0.05)
    answers: list[tuple[httpx.Response, float]] = []
    waiting = threading.Thread(target=lambda: answers.append((chat(stack, "b"), time.monotonic())))
    waiting.start()
    seen_busy = 0
    while streaming.is_alive():  # b's wake is asked meanwhile: the ledger keeps a awake while busy
        if "a-0" in stack.controller.allocator.in_flight():
            assert states(stack)["a-0"] == "awake", "a busy replica was evicted"
            seen_busy += 1
        time.sleep(0.05)
    streaming.join(timeout=300)
    waiting.join(timeout=600)
    assert seen_busy, "the stream ended before b's wake could be watched"
    ((held, answered_at),) = answers
    assert held.status_code == 200, held.text
    ((ended, stream_ended_at),) = outcome
    assert ended == "done"  # the busy replica kept serving to the end
    assert answered_at > stream_ended_at  # b waited for a's request to finish before taking its room
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "stopped",
        "b-0": "awake",
        "nap-0": "stopped",
    }


def test_a_wake_that_fails_answers_why_and_holds_nothing(stack: Sleepy) -> None:
    """nap's wake (its files removed) evicts b, then fails: a clear error, and nap holds nothing. b,
    evicted by it, starts again in the room it gave back, by an operator's wake through the SDK (a
    cold start that evicts nobody), and answers like pin. nap's files come back for the idle tests:
    its next request starts it, as the error says."""
    from vram_scheduler.sdk.client import VRAMScheduler
    from vram_scheduler.tools.demo.model import ensure_demo_model

    shutil.rmtree(stack.nap_dir)
    answer = chat(stack, "nap")
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("model nap could not be woken: replica nap-0 of model nap: wake failed: ")
    assert "its engine is stopped and its reservation freed (the next request starts it again)" in message
    assert states(stack)["nap-0"] == "stopped"
    assert states(stack)["b-0"] == "stopped"  # evicted by nap's wake
    shutil.copytree(ensure_demo_model(), stack.nap_dir)
    (woke,) = VRAMScheduler(stack.gcs_address).wake("b")  # the Ray address: this process is connected already
    assert (woke.replica_id, woke.state, woke.cold, woke.evicted) == ("b-0", "awake", True, [])
    assert woke.seconds > 0 and states(stack)["b-0"] == "awake"
    assert [chat(stack, name).status_code for name in ("b", "pin")] == [200, 200]
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "stopped",
        "b-0": "awake",
        "nap-0": "stopped",
    }


def engine_processes(replica_pid: int) -> list[int]:
    """The processes holding the replica's engine memory: vLLM's engine core (`VLLM::EngineCore`) and
    its children. Other children of the replica (multiprocessing's resource tracker, helpers that
    outlive an engine by a moment) hold none of it."""
    import psutil

    children = psutil.Process(replica_pid).children(recursive=True)
    cores = [c for c in children if any("EngineCore" in part for part in [c.name(), *c.cmdline()])]
    return sorted({p.pid for core in cores for p in [core, *core.children(recursive=True)]})


def described(pids: list[int]) -> list[str]:
    import psutil

    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            found.append(f"{pid} {process.status()} {' '.join(process.cmdline())[:120]}")
    return found


def engine_alive(pids: list[int]) -> bool:
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def test_operators_sleep_a_model_through_the_sdk(stack: Sleepy) -> None:
    """An operator's sleep: while b's engine still runs, the ledger holds b's whole reservation; it
    frees it once the engine is gone. Then a pinned model's refusal. (The SDK's wake started b in the
    previous test; the CLI's wake starts it again next.)"""
    from vram_scheduler.sdk.client import SchedulerError, VRAMScheduler

    scheduler = VRAMScheduler(stack.gcs_address)  # the Ray address: this process is connected already
    awake = replica_state(stack, "b-0")
    engine = engine_processes(awake.pids[0])  # the first pid the replica attached is its own
    assert engine and awake.held_bytes == awake.bytes + awake.overhead_bytes
    answers: list[Any] = []
    sleeping = threading.Thread(target=lambda: answers.extend(scheduler.sleep("b")))
    sleeping.start()
    held_while_alive = []  # the ledger never gives away memory the engine still holds
    while sleeping.is_alive():
        alive = engine_alive(engine)
        held = replica_state(stack, "b-0")
        if alive and engine_alive(engine):
            held_while_alive.append((held.state, held.held_bytes))
        time.sleep(0.05)
    sleeping.join()
    assert held_while_alive, "b's engine stopped before the ledger could be read"
    assert {held for _, held in held_while_alive} == {awake.held_bytes}, held_while_alive
    (slept,) = answers
    assert (slept.replica_id, slept.state) == ("b-0", "stopped")  # CPU: the engine stops
    assert states(stack)["b-0"] == "stopped"
    assert not engine_alive(engine), f"still running after the stop: {described(engine)}"
    status = {m.model_id: m for m in scheduler.deployments()}
    assert [(r.replica_id, r.sleep) for r in status["b"].replicas] == [("b-0", "stopped")]
    with pytest.raises(SchedulerError, match=r"sleep pin: .*model pin never sleeps"):
        scheduler.sleep("pin")


def test_ray_vram_sleep_and_wake_print_each_replica(stack: Sleepy, capsys: pytest.CaptureFixture[str]) -> None:
    """`ray-vram wake|sleep MODEL` (through Ray here): a line per replica, or JSON; a refusal exits 1 with why."""
    from vram_scheduler.cli.main import main

    assert main(["wake", "b", "--address", stack.gcs_address, "--output", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    woke = [(r["replica_id"], r["state"], r["cold"], r["evicted"]) for r in answer["replicas"]]
    assert answer["model_id"] == "b" and woke == [("b-0", "awake", True, [])]
    assert states(stack)["b-0"] == "awake"
    assert main(["sleep", "b", "--address", stack.gcs_address]) == 0
    assert capsys.readouterr().out.splitlines() == ["b-0: stopped"]
    assert states(stack)["b-0"] == "stopped"
    assert main(["sleep", "pin", "--address", stack.gcs_address]) == 1
    assert "model pin never sleeps" in capsys.readouterr().err


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def test_operators_sleep_and_wake_a_model_over_the_controllers_http_api(stack: Sleepy) -> None:
    """The same calls as `POST /v1/deployments/{model_id}/wake|sleep` (the controller's HTTP API, the
    SDK's HTTP transport): the answers read back as the contract's WakeReport and SleepReport; a pinned
    model is refused with its reason, an unknown one names the models deployed. b ends stopped."""
    from vram_scheduler.core.contract import SleepReport, WakeReport
    from vram_scheduler.sdk.client import SchedulerError
    from vram_scheduler.sdk.controller_http import HTTPControllerClient
    from vram_scheduler.serving.controller.http_api import ControllerAPI

    server = make_server("127.0.0.1", free_port(), ControllerAPI(stack.controller), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = HTTPControllerClient(f"http://127.0.0.1:{server.server_port}", token="not-checked-here")
    try:
        (woke,) = client.wake("b")
        assert isinstance(woke, WakeReport) and (woke.replica_id, woke.state, woke.cold) == ("b-0", "awake", True)
        assert chat(stack, "b").status_code == 200
        (slept,) = client.sleep("b")
        assert isinstance(slept, SleepReport) and (slept.replica_id, slept.state) == ("b-0", "stopped")
        assert states(stack)["b-0"] == "stopped"
        with pytest.raises(SchedulerError, match=r"sleep pin: .*model pin never sleeps"):
            client.sleep("pin")
        with pytest.raises(SchedulerError, match=r"wake nope: unknown model 'nope'; deployed: a, b, nap, pin"):
            client.wake("nope")
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def exported(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(series name, labels, value) of every sample line of a Prometheus exposition."""
    samples = []
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def test_sleeps_and_wakes_are_counted_and_timed(stack: Sleepy) -> None:
    """Each series exported with a count of at least 1 (the state gauge: 1 for the state b is in now)."""
    wanted = [
        ("ray_vram_replica_wakes_total", {"how": "started", "model_id": "b", "replica": "b-0"}),
        ("ray_vram_replica_wakes_total", {"how": "failed", "model_id": "nap", "replica": "nap-0"}),
        ("ray_vram_replica_sleeps_total", {"model_id": "b", "state": "stopped", "why": "operator"}),
        ("ray_vram_replica_evictions_total", {"model_id": "b", "replica": "b-0"}),
        ("ray_vram_replica_wake_seconds_bucket", {"how": "started", "model_id": "a"}),
        ("ray_vram_replica_state", {"model_id": "b", "replica": "b-0", "state": "stopped"}),
    ]

    def missing() -> list[tuple[str, dict[str, str]]]:
        samples = exported(httpx.get(stack.ray_metrics, timeout=30).text)
        return [
            (name, labels)
            for name, labels in wanted
            if not any(n == name and labels.items() <= found.items() and value >= 1 for n, found, value in samples)
        ]

    wait_until(lambda: not missing(), 120, lambda: f"every series exported, missing: {missing()}", every_s=1)


def replica_state(stack: Sleepy, replica_id: str) -> Any:
    """The ledger's ReplicaState of one replica (after the consistency check of `states`)."""
    states(stack)
    state = stack.controller.allocator.vram_state()
    return next(r for gpu in state.gpus for r in gpu.replicas if r.replica_id == replica_id)


def stopped_by_its_timer(stack: Sleepy, replica_id: str) -> Any:
    return wait_until(
        lambda: (r := replica_state(stack, replica_id)).state == "stopped" and r,
        300,
        f"{replica_id} stopped by its idle timer ({IDLE_S:g} s)",
    )


def test_an_idle_replica_goes_to_sleep_by_itself_and_its_next_request_wakes_it(stack: Sleepy) -> None:
    """nap's next request starts it (its files back; in the room b's operator sleep left); idle for
    `IDLE_S`, it goes to sleep by itself: on CPU its engine stops (scale to zero), the ledger holds it
    stopped at its sleeping footprint (nothing), and the sleep is counted as idle. pin, idle longer,
    stays awake."""
    assert chat(stack, "nap").status_code == 200
    slept = stopped_by_its_timer(stack, "nap-0")
    assert (slept.held_bytes, slept.settling, slept.pinned) == (0, False, False)  # CPU: stopped, its footprint 0
    assert states(stack) == {
        "pin-0": "awake",
        "a-0": "stopped",
        "b-0": "stopped",
        "nap-0": "stopped",
    }
    wanted = (
        "ray_vram_replica_sleeps_total",
        {"model_id": "nap", "replica": "nap-0", "state": "stopped", "why": "idle"},
    )

    def counted() -> bool:
        samples = exported(httpx.get(stack.ray_metrics, timeout=30).text)
        return any(n == wanted[0] and wanted[1].items() <= labels.items() for n, labels, _ in samples)

    wait_until(counted, 120, f"{wanted} exported", every_s=1)


def test_a_stream_across_the_idle_bound_keeps_its_replica_awake_until_it_ends(stack: Sleepy) -> None:
    """The next request wakes nap and is answered; while it streams for longer than `IDLE_S`, the
    timer never puts nap to sleep; once it is over and nap idles again, it sleeps by itself."""
    first = threading.Event()
    body = {"model": "nap", "prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    outcome: list[str] = []
    # held while nap starts, with no byte sent: the client waits as long as the router may hold it
    streaming = threading.Thread(
        target=lambda: outcome.append(stream_outcome(stack.base, body, first, timeout_s=WAKE_WAIT_S))
    )
    streaming.start()
    wait_until(lambda: first.is_set() or not streaming.is_alive(), WAKE_WAIT_S + 60, "the stream to start or end")
    assert first.is_set(), f"the stream never started: {outcome}"
    started, crossed, seen = time.monotonic(), False, []
    while streaming.is_alive():
        state = states(stack)["nap-0"]
        if streaming.is_alive():  # read while the stream ran
            seen.append(state)
            crossed |= time.monotonic() - started > IDLE_S
        time.sleep(0.05)
    streaming.join()
    assert outcome == ["done"]
    assert crossed, f"the stream ended within the idle bound ({IDLE_S:g} s): the scenario needs a longer one"
    assert set(seen) == {"awake"}, seen
    stopped_by_its_timer(stack, "nap-0")
    assert states(stack)["pin-0"] == "awake"
