"""The monitor's NVML path on a real GPU: numbers, per-process usage, budgets, watchdog, errors.

Skipped where no NVIDIA GPU exists (tests/conftest.py). Each test prints what it measured, so a
run with `-s` records the numbers next to the verdicts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vram_scheduler.core.config import GIB
from vram_scheduler.monitor.pids import ProcessMatcher
from vram_scheduler.monitor.readers import NVMLReader
from vram_scheduler.monitor.watchdog import ReplicaBudget, Watchdog, measure

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).with_name("gpu_worker.py")
ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """One gpu_worker.py process; `ask` sends a command line and returns the JSON reply."""

    def __init__(self, budget_bytes: int | None = None):
        command = [sys.executable, str(WORKER)] + ([f"--budget-bytes={budget_bytes}"] if budget_bytes else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        self.pid, self.uuid = hello["pid"], hello["uuid"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("exit\n")
            self.process.stdin.flush()
            self.process.wait(30)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


@pytest.fixture
def reader() -> Iterator[NVMLReader]:
    nvml = NVMLReader("gpu-test")
    yield nvml
    nvml.close()


def usage_of(reader: NVMLReader, pid: int, uuid: str) -> int:
    gpu = next(g for g in reader.read().inventory.gpus if g.uuid == uuid)
    return sum(p.used_bytes for p in gpu.processes if p.pid == pid)


def settle(reader: NVMLReader, pid: int, uuid: str) -> int:
    """NVML's per-process figure as soon as two reads 0.2 s apart agree (it lags allocations a little)."""
    last = -1
    for _ in range(50):
        now = usage_of(reader, pid, uuid)
        if now == last and now > 0:
            return now
        last = now
        time.sleep(0.2)
    return last


def test_nvml_agrees_with_cuda_mem_get_info(reader: NVMLReader, workers: list[Worker]) -> None:
    worker = Worker()
    workers.append(worker)
    worker.ask(f"alloc {GIB}")
    cuda = worker.ask("meminfo")
    gpu = next(g for g in reader.read().inventory.gpus if g.uuid == worker.uuid)
    nvml_free = gpu.total_bytes - gpu.used_bytes
    print(
        f"\nNVML total {gpu.total_bytes} free {nvml_free}; cuda total {cuda['total']} free {cuda['free']}; "
        f"free differs by {abs(nvml_free - cuda['free']) / gpu.total_bytes:.4%} of total, "
        f"total by {abs(gpu.total_bytes - cuda['total']) / gpu.total_bytes:.4%}"
    )
    assert abs(nvml_free - cuda["free"]) <= 0.01 * gpu.total_bytes
    assert abs(gpu.total_bytes - cuda["total"]) <= 0.01 * gpu.total_bytes


def test_per_process_usage_of_2_gib_allocation(reader: NVMLReader, workers: list[Worker]) -> None:
    baseline = Worker()  # a CUDA context and nothing else: the overhead every process pays
    holder = Worker()
    workers.extend([baseline, holder])
    overhead = settle(reader, baseline.pid, baseline.uuid)
    holder.ask(f"alloc {2 * GIB}")
    used = settle(reader, holder.pid, holder.uuid)
    beyond = used - overhead
    print(
        f"\ncontext overhead {overhead / GIB:.3f} GiB; process with 2 GiB: {used / GIB:.3f} GiB; "
        f"beyond the context {beyond / GIB:.3f} GiB ({beyond / (2 * GIB) - 1:+.2%} vs 2 GiB)"
    )
    assert abs(beyond - 2 * GIB) <= 0.05 * 2 * GIB


def test_budget_enforcement_only_the_offender_gets_oom(workers: list[Worker]) -> None:
    steady = Worker(budget_bytes=3 * GIB)
    greedy = Worker(budget_bytes=2 * GIB)
    workers.extend([steady, greedy])
    assert steady.ask(f"alloc {GIB}")["ok"]
    over = greedy.ask(f"alloc {3 * GIB}")
    print(f"\ngreedy (budget 2 GiB) asking 3 GiB: {over}")
    assert "oom" in over
    # The offender alone failed: the other keeps allocating and computing.
    more = steady.ask(f"alloc {GIB}")
    compute = steady.ask("compute")
    print(f"steady (budget 3 GiB) after the OOM: alloc 1 GiB more → {more}; compute → {compute}")
    assert more["ok"] and compute["ok"]
    assert greedy.ask(f"alloc {GIB // 2}")["ok"], "the offender itself still works within its budget"


def test_watchdog_flags_a_non_pytorch_allocation_over_budget(reader: NVMLReader, workers: list[Worker]) -> None:
    honest = Worker(budget_bytes=GIB)
    cheat = Worker(budget_bytes=GIB)
    workers.extend([honest, cheat])
    honest.ask(f"alloc {GIB // 2}")
    cheat.ask(f"alloc {GIB // 2}")
    assert "oom" in cheat.ask(f"alloc {2 * GIB}"), "PyTorch's cap holds for PyTorch allocations"
    assert cheat.ask(f"raw {2 * GIB}")["ok"], "cudaMalloc outside PyTorch is not capped"
    replicas = [
        ReplicaBudget("honest-0", "honest", honest.uuid, GIB, (honest.pid,)),
        ReplicaBudget("cheat-0", "cheat", cheat.uuid, GIB, (cheat.pid,)),
    ]
    watchdog = Watchdog(margin_bytes=GIB // 2, polls=3)
    matcher = ProcessMatcher()
    flagged = []
    for _ in range(3):
        usages, _ = measure(reader.read().inventory, replicas, matcher)
        flagged += watchdog.observe(usages)
        time.sleep(0.1)
    for usage in usages:
        print(f"\n{usage.replica.replica_id}: uses {usage.used_bytes / GIB:.3f} GiB, budget 1 GiB + margin 0.5 GiB")
    for violation in flagged:
        print(violation.describe())
    assert [v.usage.replica.replica_id for v in flagged] == ["cheat-0"]


def test_nvml_error_during_poll_marks_gpus_unhealthy_and_keeps_going(reader: NVMLReader) -> None:
    import pynvml

    assert all(g.healthy for g in reader.read().inventory.gpus)
    pynvml.nvmlShutdown()  # the reader's NVML session ends under it: every call now fails
    try:
        reading = reader.read()
        print(f"\nafter nvmlShutdown: {[e.message for e in reading.errors]}")
        assert reading.errors and {e.kind for e in reading.errors} <= {"nvml", "gpu_lost"}
        assert not any(g.healthy for g in reading.inventory.gpus)
        assert len(reading.inventory.gpus) == reader.gpu_count, "a failed GPU stays listed, marked unhealthy"
    finally:
        pynvml.nvmlInit()
    recovered = reader.read()
    print(f"after nvmlInit again: healthy={[g.healthy for g in recovered.inventory.gpus]}, errors={recovered.errors}")
    assert all(g.healthy for g in recovered.inventory.gpus)


def test_monitor_command_serves_nvml_metrics(reader: NVMLReader, workers: list[Worker]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    worker = Worker()
    workers.append(worker)
    port = 19431
    monitor = subprocess.Popen(
        [sys.executable, "-m", "vram_scheduler.monitor", "--host=127.0.0.1", f"--port={port}", "--node=g1"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = ""
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "ray_vram_gpu_total_bytes{" in body:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        inventory = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/inventory", timeout=2).read())
    finally:
        monitor.terminate()
        _, stderr = monitor.communicate(timeout=30)
    samples = {
        (s.name, s.labels.get("gpu")): s for family in text_string_to_metric_families(body) for s in family.samples
    }
    expected = next(g for g in reader.read().inventory.gpus if g.uuid == worker.uuid)
    total = samples[("ray_vram_gpu_total_bytes", str(expected.index))]
    print(f"\n/metrics: {total}; /inventory source {inventory['source']}, {len(inventory['gpus'])} GPU(s)")
    print(stderr.strip().splitlines()[-1])
    assert total.value == expected.total_bytes and total.labels["uuid"] == worker.uuid
    assert samples[("ray_vram_gpu_healthy", str(expected.index))].value == 1
    assert inventory["source"] == "nvml" and worker.pid in [p["pid"] for g in inventory["gpus"] for p in g["processes"]]
    assert monitor.returncode == 0
