"""What the GPU benchmark and the GPU tests share: NVML sampling of process trees, vLLM's own
load generator (`vllm bench serve`, one client process per target) and bare vLLM servers
(`measured_stack.py`: the ray-vram local stack started for a measurement, and replicas' peaks).

Runs on the GPU machine only (NVML, CUDA vLLM); nothing here is imported by CI's CPU tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vram_scheduler.monitor.nvml_usage import process_usage

GIB = 1024**3
#: Per-client results and logs of `vllm bench serve` (many files; only summaries are kept).
SCRATCH = Path(os.environ.get("RAY_VRAM_BENCH_SCRATCH", "/tmp/rv-bench"))


def gpus() -> list[dict[str, Any]]:
    """index, uuid, name and total bytes of every GPU NVML sees."""
    import pynvml

    pynvml.nvmlInit()
    out = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        out.append(
            {
                "index": index,
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "name": name.decode() if isinstance(name, bytes) else name,
                "total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            }
        )
    return out


def nvml_processes() -> dict[int, tuple[str, int]]:
    """pid → (GPU uuid, used bytes) for every compute process NVML reports now."""
    import pynvml

    pynvml.nvmlInit()
    seen: dict[int, tuple[str, int]] = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for pid, used in process_usage(pynvml, handle).items():
            seen[pid] = (uuid, used)
    return seen


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant alive now."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


@dataclass
class NVMLSampler:
    """Peak NVML usage per pid (and per GPU) while running, sampled every `interval_s`."""

    interval_s: float = 0.05
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    gpu_of_pid: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> NVMLSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="nvml-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for pid, (uuid, used) in nvml_processes().items():
                    self.gpu_of_pid[pid] = uuid
                    if used > self.peak_by_pid.get(pid, 0):
                        self.peak_by_pid[pid] = used
            except Exception:  # a process vanishing mid-read: sample again
                pass
            self._stop.wait(self.interval_s)

    def tree_peak(self, pids: list[int]) -> int:
        """Peak of the sum is at most the sum of peaks: the sum of per-process peaks (conservative)."""
        return sum(self.peak_by_pid.get(pid, 0) for pid in pids)


def bench_serve(
    targets: list[tuple[str, str]],
    tokenizer: str,
    tag: str,
    num_prompts: int,
    concurrency: int,
    input_len: int = 300,
    output_len: int = 128,
    range_ratio: float = 0.0,
) -> list[dict[str, Any]]:
    """One `vllm bench serve` process per (base_url, model name) target, all at once; their results."""
    out_dir = SCRATCH
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (base_url, model) in enumerate(targets):
        name = f"{tag}-{i}.json"
        command = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
            "--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", str(range_ratio),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(i),
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
        ]  # fmt: skip
        log = open(out_dir / f"{tag}-{i}.log", "w")  # noqa: SIM115 - closed once the client exits
        env = dict(os.environ)
        if os.environ.get("RAY_VRAM_INTERNAL_KEY"):  # replicas answer only with it (`vllm bench` sends it as Bearer)
            env["OPENAI_API_KEY"] = os.environ["RAY_VRAM_INTERNAL_KEY"]
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), name, log))
    results = []
    for proc, name, log in procs:
        proc.wait()
        log.close()
        try:
            data = json.loads((out_dir / name).read_text())
        except (OSError, ValueError) as error:
            tail = (out_dir / name.replace(".json", ".log")).read_text(errors="replace").splitlines()[-5:]
            data = {"error": f"no result ({error}): {' | '.join(tail)}"}
        keep = ("completed", "failed", "duration", "output_throughput", "request_throughput", "total_token_throughput")
        keep += ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "error")
        summary = {k: data[k] for k in keep if k in data}
        kinds = failure_kinds(data.get("errors") or [])
        unexplained = int(data.get("failed", 0)) - sum(kinds.values())
        if unexplained > 0:  # failures the bench recorded no text for: the client's own lines say why
            tail = " | ".join((out_dir / name.replace(".json", ".log")).read_text(errors="replace").splitlines()[-3:])
            kinds[f"no error text; client log: {tail}"[:300]] = unexplained
        if kinds:
            summary["failure_kinds"] = kinds  # every failed request's kind (an HTTP 429 or 400 names why)
        results.append(summary)
    return results


def failure_kinds(errors: list[Any]) -> dict[str, int]:
    """How many failed requests of each kind: vLLM's bench records one error text per request (empty
    when it succeeded), holding the HTTP status and body or the exception's class and message."""
    counts: dict[str, int] = {}
    for error in errors:
        if error:
            kind = " ".join(str(error).split())[:200]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _merged_kinds(results: list[dict[str, Any]]) -> dict[str, int]:
    """Every client's failure kinds, counted together (a client with no result counts as one)."""
    merged: dict[str, int] = {}
    for result in results:
        for kind, count in result.get("failure_kinds", {}).items():
            merged[kind] = merged.get(kind, 0) + count
        if "error" in result:
            kind = f"client: {result['error']}"[:200]
            merged[kind] = merged.get(kind, 0) + 1
    return dict(sorted(merged.items(), key=lambda item: (-item[1], item[0])))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate output tok/s, and the worst client's median TTFT/TPOT and failures."""
    return {
        "output_tok_s": round(sum(r.get("output_throughput", 0.0) for r in results), 1),
        "completed": sum(r.get("completed", 0) for r in results),
        "failed": sum(r.get("failed", 0) for r in results) + sum(1 for r in results if "error" in r),
        "failure_kinds": _merged_kinds(results),
        "median_ttft_ms": round(max((r.get("median_ttft_ms", 0.0) for r in results), default=0.0), 1),
        "median_tpot_ms": round(max((r.get("median_tpot_ms", 0.0) for r in results), default=0.0), 2),
        "clients": results,
    }


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 600) -> float | None:
    """Seconds until `url` answers 200, or None when `proc` exits or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return round(time.monotonic() - start, 1)
        except Exception:
            pass
        time.sleep(0.5)
    return None


@dataclass
class BareServer:
    """vLLM's own OpenAI server (no ray-vram), pinned to one GPU, at a utilization share."""

    model_dir: str
    port: int
    gpu_uuid: str
    utilization: float
    log_path: Path
    max_model_len: int = 2048
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
            "--served-model-name", "m", "--max-model-len", str(self.max_model_len),
            "--gpu-memory-utilization", str(self.utilization), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.gpu_uuid, **self.extra_env}
        log = open(self.log_path, "w")  # noqa: SIM115 - the server's child processes keep writing to it
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 600) -> float | None:
        return wait_http(self.url + "/health", self.proc, timeout_s)

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue

    def error_lines(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return [line[:300] for line in lines if "Error" in line or "error" in line][-4:]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
