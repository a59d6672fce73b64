"""Serving benchmark: ray-vram's whole stack vs vLLM's own OpenAI server vs Ray Serve LLM's
unmodified OpenAI app, same demo model, same engine settings, same prompts, one stack at a time
in A-B-C-B-A order (this machine drifts), on vLLM's CPU backend.

Per run: requests/s and p50/p99 latency (non-streaming), time to first token (streaming), server
CPU per request (CPU seconds of the stack's whole process tree during the load / requests), the
machine's busy CPU per request (a cross-check that includes the load generator), peak memory
(summed RSS of the tree) and the time from start to the first streamed token.

Usage: python -m bench.serving.run [--n 200] [--concurrency 8] [--order ray-vram,vllm,...]
Prints a table; writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from vram_scheduler.core.loopback import free_port
from vram_scheduler.tools.demo.model import ensure_demo_model

from .load import prompts, run_phase
from .stacks import ray_vram_command, serve_llm_command, vllm_command

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "serving.json"
WORK = Path(os.environ.get("RAY_VRAM_WORK", ROOT / ".work")) / "bench-serving"


class TreeSampler(threading.Thread):
    """Samples a process tree: summed RSS (peak) and CPU seconds per process (cumulative)."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0
        self.peak_procs = 0
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                with self.lock:
                    self.cpu[proc.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        with self.lock:
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))

    def cpu_seconds(self) -> float:
        self.sample()
        with self.lock:
            return sum(self.cpu.values())

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            self.sample()


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (everything but idle and iowait): a cross-check of
    the process-tree sum that nothing a stack starts can escape (it includes the load generator,
    the same for every stack)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def first_token(base: str, started: float, process: subprocess.Popen, timeout_s: float = 900) -> float:
    body = {"model": "demo", "prompt": "hello", "max_tokens": 2, "stream": True}
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"stack exited with {process.returncode} before serving")
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30, trust_env=False) as response:
                if response.status_code == 200:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no first token within {timeout_s:g}s")


def measure(stack: str, label: str, model_dir: Path, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    port = free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    if stack == "ray-vram":
        command, env = ray_vram_command(model_dir, port, free_port(), WORK)
    elif stack == "vllm":
        command, env = vllm_command(model_dir, port)
    else:
        command, env = serve_llm_command(model_dir, port)
    log = (WORK / f"{label}.log").open("w")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | env, cwd=ROOT)
    sampler = TreeSampler(process.pid)
    sampler.start()
    # Other work on the machine skews every number: the 1-minute load average is kept with each run.
    result: dict[str, Any] = {"stack": stack, "label": label, "load_avg_1m_at_start": round(os.getloadavg()[0], 1)}
    base = f"http://127.0.0.1:{port}"
    try:
        result["start_to_first_token_s"] = round(first_token(base, started, process), 1)
        for stream in (False, True):
            texts = prompts(("S" if stream else "N") + label, n)
            cpu_before, machine_before = sampler.cpu_seconds(), machine_busy_seconds()
            phase = asyncio.run(run_phase(base, "demo", texts, concurrency, max_tokens, stream))
            cpu = sampler.cpu_seconds() - cpu_before
            machine = machine_busy_seconds() - machine_before
            summary = phase.summary() | {
                "server_cpu_ms_per_req": round(1000 * cpu / max(1, phase.ok + 3), 1),
                "machine_cpu_ms_per_req": round(1000 * machine / max(1, phase.ok + 3), 1),
            }
            result["stream" if stream else "nonstream"] = summary
            print(f"[{label}] {'stream' if stream else 'nonstream'}: {json.dumps(summary)}", flush=True)
        result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 1)
        result["peak_rss_mib"] = round(sampler.peak_rss / 2**20)
        result["peak_processes"] = sampler.peak_procs
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        sampler.halt.set()
        log.close()
        result["exit_code"] = process.returncode
        result["leftover_processes"] = _leftovers(sampler)
    return result


def _leftovers(sampler: TreeSampler) -> int:
    alive = 0
    for pid in list(sampler.cpu):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive += 1
                os.kill(pid, signal.SIGKILL)  # only processes of the stack this benchmark started
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return alive


COLUMNS = [
    ("req/s", "nonstream", "req_per_s"),
    ("p50 ms", "nonstream", "p50_ms"),
    ("p99 ms", "nonstream", "p99_ms"),
    ("CPU ms/req", "nonstream", "server_cpu_ms_per_req"),
    ("machine CPU ms/req", "nonstream", "machine_cpu_ms_per_req"),
    ("stream req/s", "stream", "req_per_s"),
    ("TTFT p50 ms", "stream", "ttft_p50_ms"),
    ("TTFT p99 ms", "stream", "ttft_p99_ms"),
    ("errors", None, "errors"),
    ("peak MiB", None, "peak_rss_mib"),
    ("start→token s", None, "start_to_first_token_s"),
    ("load avg", None, "load_avg_1m_at_end"),
]


def cell(run: dict[str, Any], phase: str | None, key: str) -> Any:
    if key == "errors":
        return run.get("nonstream", {}).get("errors", "-") + run.get("stream", {}).get("errors", 0)
    return run.get(phase, {}).get(key, "-") if phase else run.get(key, "-")


def mean_of(runs: list[dict[str, Any]], stack: str, phase: str | None, key: str) -> float | None:
    values = [cell(r, phase, key) for r in runs if r["stack"] == stack]
    values = [v for v in values if isinstance(v, int | float)]
    return statistics.fmean(values) if values else None


def table(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = ["| run | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for run in runs:
        lines.append(f"| {run['label']} | " + " | ".join(str(cell(run, p, k)) for _, p, k in COLUMNS) + " |")
    stacks = sorted({r["stack"] for r in runs})
    means = {s: {name: mean_of(runs, s, p, k) for name, p, k in COLUMNS} for s in stacks}
    lines.append("")
    lines.append("| mean | " + " | ".join(c[0] for c in COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for stack in stacks:
        lines.append(
            f"| {stack} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in means[stack].values()) + " |"
        )
    ratios: dict[str, Any] = {}
    ours = means.get("ray-vram", {})
    for other in ("vllm", "ray-serve-llm"):
        theirs = means.get(other)
        if not theirs or not ours:
            continue
        ratios[f"ray-vram/{other}"] = {
            name: round(ours[name] / theirs[name], 3) if ours[name] and theirs[name] else None for name in ours
        }
    for key, values in ratios.items():
        lines.append(f"\n{key}: " + ", ".join(f"{k} {v}" for k, v in values.items() if v is not None))
    return "\n".join(lines), {"means": means, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--order", default="ray-vram,vllm,ray-serve-llm,vllm,ray-vram")
    args = parser.parse_args()
    model_dir = ensure_demo_model()
    runs = []
    counts: dict[str, int] = {}
    for stack in args.order.split(","):
        counts[stack] = counts.get(stack, 0) + 1
        label = f"{stack}#{counts[stack]}"
        print(f"[{label}] starting", flush=True)
        runs.append(measure(stack, label, model_dir, args.n, args.concurrency, args.max_tokens))
    text, summary = table(runs)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                "settings": vars(args),
                "runs": runs,
                **summary,
                "table": text,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
