"""Soak: `ray-vram up` with two steady models under the serving benchmark's concurrency for the
whole run, while the values change twice the way `helm upgrade` changes them — a model `extra`
added at 1/3 of the run, the original values applied again (removing it) at 2/3.

The load comes from client processes (`bench.soak.client`, a few streams each, completions and
chat, streamed and not) against the steady models; each apply is a fresh Ray driver
(`bench.soak.apply`) calling the controller actor with the whole new values, as the chart's
controller pod does after an upgrade. Every 10 s the RSS and USS of each router replica (one row
per router: `router OpenAIRouter`, `router OpenAIRouter-1`), the controller actor and the `up`
process are sampled.

Usage: python -m bench.soak [--minutes 10] [--concurrency 8] [--results bench/results/soak.json]
Prints progress and a table; writes the results file. Exit code 1 when a steady model saw a
failed request or `extra` was not added, answered and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench.serving.stacks import ray_vram_model, up_command
from vram_scheduler.core.exit_codes import ExitCode
from vram_scheduler.core.loopback import LOOPBACK_NODE_ENV, free_port
from vram_scheduler.local.stack import ray_auth_env
from vram_scheduler.tools.demo.model import ensure_demo_model

from . import memory, report
from .client import burst

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "soak.json"
WORK = Path(os.environ.get("RAY_VRAM_WORK", ROOT / ".work")) / "bench-soak"
STEADY = ("alpha", "beta")
EXTRA = "extra"
READY = re.compile(r"ready in (\d+)s")
GCS = re.compile(r"Ray GCS (\S+)")


class Soak:
    """One soak run: the stack, the clients, the applies and the samples, all stopped by `stop()`."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stop_file = work / "stop"
        self.stop_file.unlink(missing_ok=True)
        self.logs: list[Path] = []
        self.clients: list[subprocess.Popen] = []
        self.up: subprocess.Popen | None = None
        self.applying: subprocess.Popen | None = None
        self.sampler: memory.Sampler | None = None
        self.events: list[dict[str, Any]] = []
        self.load_started = 0.0
        self.last_progress = 0.0
        # Replicas size their KV cache from the budget (as bench/serving's ray-vram run), not from
        # ci/env.sh's fixed VLLM_CPU_KVCACHE_SPACE; a wide console keeps `up`'s ready line whole.
        self.env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "", "COLUMNS": "1000"}

    # -- the stack ----------------------------------------------------------------------------

    def values(self, name: str, models: tuple[str, ...]) -> Path:
        model_dir = ensure_demo_model()
        values = {
            "models": [ray_vram_model(m, model_dir) for m in models],
            "serving": {"host": "127.0.0.1", "port": self.port},
        }
        path = self.work / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def start_stack(self, attempts: int = 2) -> tuple[str, float]:
        """`ray-vram up` with the steady values; returns the GCS address and the seconds to ready.
        Started again when Ray's fixed 30 s node start-up wait ran out (a busy machine)."""
        for attempt in range(attempts):
            try:
                return self._start_stack()
            except RuntimeError as error:
                if "timed out during startup" not in str(error) or attempt == attempts - 1:
                    raise
                print("Ray's node start-up timed out (busy machine): starting again", flush=True)
        raise AssertionError("not reached")

    def _start_stack(self) -> tuple[str, float]:
        log = self.work / "up.log"
        command = up_command(self.values("steady", STEADY), free_port())
        with log.open("w") as out:
            self.up = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )
        started = time.monotonic()
        while True:
            text = log.read_text()
            ready, gcs = READY.search(text), GCS.search(text)
            if ready and gcs:
                return gcs.group(1), time.monotonic() - started
            if self.up.poll() is not None:
                raise RuntimeError(f"ray-vram up exited with {self.up.returncode}:\n{text[-3000:]}")
            if time.monotonic() - started > self.args.ready_timeout:
                raise TimeoutError(f"ray-vram up not ready after {self.args.ready_timeout:g}s:\n{text[-3000:]}")
            time.sleep(1)

    def apply(self, gcs: str, name: str, models: tuple[str, ...], wait: bool) -> dict[str, Any]:
        """The helm-upgrade step: a fresh driver applies the whole values `models` (bench.soak.apply)."""
        event: dict[str, Any] = {"event": name, "at_s": self.elapsed()}
        command = [sys.executable, "-m", "bench.soak.apply", gcs, str(self.values(name, models))]
        command += ["--wait"] if wait else []
        env = self.env | LOOPBACK_NODE_ENV | ray_auth_env(self.env)
        slug = name.replace(" ", "-")
        log, out = self.work / f"apply-{slug}.log", self.work / f"apply-{slug}.json"
        with log.open("w") as err, out.open("w") as answer:  # files: Ray may print a lot to a driver
            process = subprocess.Popen(command, stdout=answer, stderr=err, env=env, cwd=ROOT, start_new_session=True)
            self.applying = process
            while process.poll() is None:
                self.progress()
                time.sleep(1)
        lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"apply {name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        event |= json.loads(lines[-1]) | {"took_s": round(self.elapsed() - event["at_s"], 1)}
        self.events.append(event)
        print(f"[{self.elapsed():6.0f}s] {name}: {json.dumps(event)}", flush=True)
        return event

    # -- load ---------------------------------------------------------------------------------

    def start_clients(self) -> None:
        per = self.args.streams_per_client
        for first in range(0, self.args.concurrency, per):
            log = self.work / f"client-{first}.jsonl"
            log.unlink(missing_ok=True)
            self.logs.append(log)
            streams = min(per, self.args.concurrency - first)
            command = [sys.executable, "-m", "bench.soak.client", self.base, str(log), str(self.stop_file)]
            command += ["--models", ",".join(STEADY), "--streams", str(streams), "--first", str(first)]
            command += ["--max-tokens", str(self.args.max_tokens)]
            self.clients.append(subprocess.Popen(command, cwd=ROOT, env=self.env, start_new_session=True))

    def extra_burst(self) -> list[dict[str, Any]]:
        """Requests to the added model, every shape; kept in their own record file."""
        records = asyncio.run(burst(self.base, EXTRA, self.args.extra_requests, self.args.max_tokens))
        log = self.work / "extra.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.logs.append(log)
        return records

    def status_of(self, model: str) -> int:
        """HTTP status of one completion for `model` (404 once a removed model is gone)."""
        body = {"model": model, "prompt": "hello", "max_tokens": 1}
        return httpx.post(self.base + "/v1/completions", json=body, timeout=60, trust_env=False).status_code

    # -- time and progress --------------------------------------------------------------------

    def elapsed(self) -> float:
        return round(time.monotonic() - self.load_started, 1)

    def wait_until(self, at_s: float) -> None:
        while self.elapsed() < at_s:
            self.progress()
            time.sleep(1)

    def progress(self, every_s: float = 30) -> None:
        if time.monotonic() - self.last_progress < every_s:
            return
        self.last_progress = time.monotonic()
        counts: Counter[str] = Counter()
        for record in report.read_records(self.logs):
            counts[f"{record['model']} {'ok' if record['kind'] == 'ok' else 'failed'}"] += 1
        mem = ""
        if self.sampler is not None and self.sampler.samples:
            last = self.sampler.samples[-1]
            roles = [role for role in memory.roles([last]) if role in last]
            mem = ", ".join(f"{role} {last[role]['rss'] / 2**20:.0f} MiB" for role in roles)
        print(f"[{self.elapsed():6.0f}s] {dict(sorted(counts.items()))} RSS: {mem}", flush=True)

    # -- shutdown -----------------------------------------------------------------------------

    def stop(self) -> int:
        """Clients, sampler, then the stack (SIGINT: `up` removes every model and stops Ray); any
        process of the stack still alive after that is killed. Returns how many were."""
        self.stop_file.touch()
        if self.applying is not None and self.applying.poll() is None:  # interrupted mid-apply
            self.applying.terminate()
            try:
                self.applying.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.applying.kill()
                self.applying.wait()
        for client in self.clients:
            try:
                client.wait(timeout=120)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        if self.sampler is not None:
            self.sampler.halt.set()
        if self.up is None:
            return 0
        tree = _descendants(self.up.pid)
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
        try:
            self.up.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.up.kill()
            self.up.wait()
        left = 0
        for process in tree:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()  # only processes of the stack this run started
                    left += 1
        return left


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    run = Soak(args, work)
    duration = args.minutes * 60
    result: dict[str, Any] = {"load_avg_1m_at_start": round(os.getloadavg()[0], 1)}
    try:
        print("starting ray-vram up (models: alpha, beta) ...", flush=True)
        gcs, ready_s = run.start_stack()
        print(f"stack ready in {ready_s:.0f} s (Ray GCS {gcs}); load for {duration:.0f} s", flush=True)
        assert run.up is not None
        run.load_started = run.last_progress = time.monotonic()
        run.sampler = memory.Sampler(run.up.pid, run.load_started, args.sample_s)
        run.sampler.start()
        run.start_clients()
        run.wait_until(duration / 3)
        run.apply(gcs, "add extra", (*STEADY, EXTRA), wait=True)
        extra = run.extra_burst()
        print(f"[{run.elapsed():6.0f}s] extra: {Counter(r['kind'] for r in extra)}", flush=True)
        run.wait_until(2 * duration / 3)
        run.apply(gcs, "remove extra", STEADY, wait=False)
        result["extra_status_after_removal"] = run.status_of(EXTRA)
        run.wait_until(max(duration, run.elapsed() + 10))  # a tail of load after the removal
        run.stop_file.touch()
        load_s = run.elapsed()
        run.sampler.sample()  # the end sample: at the end of the load, with everything still up
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        print("stopping ...", flush=True)
        left = run.stop()
    records = report.read_records(run.logs)
    samples = run.sampler.samples if run.sampler else []
    result |= {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"client_processes": len(run.clients)},
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        "stack_ready_s": round(ready_s, 1),
        "duration_s": load_s,
        "steady_models": list(STEADY),
        "extra_model": EXTRA,
        "models": report.per_model(records),
        "events": run.events,
        "memory": {role: memory.summary(samples, role) for role in memory.roles(samples)},
        "samples": samples,
        "stack_exit_code": run.up.returncode if run.up else None,
        "leftover_processes": left,
    }
    result["table"] = report.table(result)
    return result


def passed(result: dict[str, Any]) -> bool:
    """Steady models: requests, none failed; extra: deployed, answered, removed from both lists."""
    models = result["models"]
    add, remove = result["events"]
    return (
        all(models.get(m, {}).get("ok") and not models[m]["failed"] for m in result["steady_models"])
        and add["result"]["deployed"] == [EXTRA]
        and bool(models.get(EXTRA, {}).get("ok"))
        and remove["result"]["removed"] == [EXTRA]
        and EXTRA not in remove["listed"] + remove["reserved"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="length of the load (default 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streams (default 8, as bench/serving)")
    parser.add_argument("--streams-per-client", type=int, default=4, help="streams per client process")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--extra-requests", type=int, default=12, help="requests sent to the added model")
    parser.add_argument("--sample-s", type=float, default=10, help="seconds between memory samples")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK, help="logs, values and request records")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        result = soak(args, args.work)
    except KeyboardInterrupt:
        print("interrupted: everything stopped", flush=True)
        sys.exit(ExitCode.INTERRUPTED)
    print(result["table"])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.results}")
    sys.exit(ExitCode.OK if passed(result) else ExitCode.FAILURE)
