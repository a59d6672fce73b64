"""`ray-vram measure`: the `vram_gb` a model needs, measured on the engine rather than guessed.

The original design told users to add a 70% buffer to a guess. Here vLLM's own OpenAI server runs
the model with its KV cache sized explicitly for the workload (`concurrency` sequences of
`max_model_len` tokens), a load of that many concurrent long prompts drives it, and the peak
footprint of the server's whole process tree is read every 50 ms: NVML per-process usage on CUDA,
resident memory (RSS) on CPU — what the monitor accounts replicas by on each.

Why the recommendation is what it is (see `serving/sizing.py`): on CUDA a replica of budget B runs
vLLM at `gpu_memory_utilization = B / total`, inside which vLLM fits weights + activations + its
CUDA-graph estimate + the KV cache; the CUDA context (0.5 GiB) lies outside and the per-replica
overhead covers it, so B = peak − context. On CPU the replica's KV cache gets B − weights − the
runtime allowance, so B is at least that sum and at least the resident peak.

Pure parts (arithmetic, prompt building, log filtering) come first; process handling after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from ..core import capacity
from ..core.config import GIB, ConfigError, format_gib, gib_to_bytes
from ..core.errors import RayVramError
from ..core.loopback import free_port
from ..core.model_limits import checkpoint_bytes
from ..monitor.nvml_usage import process_usage
from ..serving.replica.engine_args import engine_flag
from ..serving.replica.mps import client_env, node_pipe_dir
from ..serving.replica.sizing import CPU_RUNTIME_BYTES, size_engine

Device = Literal["cuda", "cpu"]
MIB = 1024**2
#: What a CUDA context costs outside vLLM's accounting; the replica overhead covers it.
CUDA_CONTEXT_BYTES = GIB // 2
#: Budgets are recommended in steps of this many GiB.
ROUND_STEP_GB = 0.5
#: vLLM's default KV block size per backend (CUDA attention 16; CPU attention 128).
DEFAULT_BLOCK_SIZE: dict[str, int] = {"cuda": 16, "cpu": 128}
#: Free memory left untouched when choosing `gpu_memory_utilization` for vLLM's start-up check.
FREE_MARGIN_BYTES = GIB
SAMPLE_INTERVAL_S = 0.05
SERVED_NAME = "ray-vram-measure"

_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
}  # fmt: skip


# ---------------------------------------------------------------- pure: shapes and arithmetic


class ModelShape(BaseModel):
    """What the KV-cache arithmetic needs from a model's config.json."""

    num_hidden_layers: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype_bytes: int = Field(gt=0, description="Bytes per KV element (the engine's dtype, or kv_cache_dtype).")
    dtype: str
    max_position_embeddings: int | None = None


def model_shape(config: dict[str, Any], engine_kwargs: dict[str, Any] | None = None) -> ModelShape:
    """The KV-relevant shape of a Hugging Face config (text part for multimodal configs).

    The element size follows vLLM's own choice: `kv_cache_dtype` if set, else `dtype` if set, else
    the checkpoint's dtype, where float32 checkpoints are served in 16 bits (vLLM's "auto").
    """
    kwargs = engine_kwargs or {}
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"config.json lacks what the KV-cache size needs ({error})") from None
    dtype = str(kwargs.get("dtype") or "auto")
    if dtype == "auto":
        dtype = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16")
        dtype = "bfloat16" if dtype in {"float32", "float"} else dtype
    kv_dtype = str(kwargs.get("kv_cache_dtype") or "auto")
    element = _DTYPE_BYTES.get(kv_dtype if kv_dtype != "auto" else dtype.removeprefix("torch."), 2)
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return ModelShape(
        num_hidden_layers=layers,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        dtype_bytes=element,
        dtype=dtype,
        max_position_embeddings=int(limit) if limit else None,
    )


def kv_bytes_per_token(shape: ModelShape) -> int:
    """Keys and values of every layer for one token: 2 × layers × kv heads × head_dim × element bytes."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * shape.dtype_bytes


def kv_cache_bytes(concurrency: int, max_model_len: int, per_token: int, block_size: int) -> int:
    """KV cache for `concurrency` sequences of `max_model_len` tokens, in whole blocks.

    Each sequence takes ceil(max_model_len / block_size) blocks; vLLM keeps one more block aside
    (its null block), so that one is added.
    """
    if concurrency < 1 or max_model_len < 1 or per_token < 1 or block_size < 1:
        raise ValueError("concurrency, max_model_len, bytes per token and block size must be ≥ 1")
    blocks = concurrency * math.ceil(max_model_len / block_size) + 1
    return blocks * block_size * per_token


def round_up_gb(n_bytes: float, step_gb: float = ROUND_STEP_GB) -> float:
    """`n_bytes` in GiB, rounded up to the next multiple of `step_gb` (never below one step)."""
    steps = max(1, math.ceil(n_bytes / (step_gb * GIB) - 1e-9))
    return round(steps * step_gb, 3)


def recommend_vram_gb(device: Device, peak_bytes: int, floor_bytes: int = 0) -> float:
    """The `vram_gb` to declare for a replica whose measured footprint peaked at `peak_bytes`.

    CUDA: the peak minus the CUDA context (the per-replica overhead covers that). CPU: the peak,
    and at least `floor_bytes` (what the CPU replica's sizing needs to give the KV cache its bytes).
    """
    if device == "cuda":
        return round_up_gb(peak_bytes - CUDA_CONTEXT_BYTES)
    return round_up_gb(max(peak_bytes, floor_bytes))


def gpu_memory_utilization(free_bytes: int, total_bytes: int, margin_bytes: int = FREE_MARGIN_BYTES) -> float:
    """A share of the GPU low enough to pass vLLM's start-up check against free memory.

    With `--kv-cache-memory-bytes` set, the share only has to be ≤ free / total; it does not size anything.
    """
    usable = free_bytes - margin_bytes
    if usable <= 0:
        raise ValueError(f"the GPU has only {format_gib(free_bytes)} free (needs more than {format_gib(margin_bytes)})")
    return math.floor(usable / total_bytes * 10_000) / 10_000


def check_workload(
    shape: ModelShape, max_model_len: int, concurrency: int, max_tokens: int, num_prompts: int
) -> list[str]:
    """Problems with the requested workload, each naming the value and the limit."""
    problems = []
    limit = shape.max_position_embeddings
    if limit is not None and max_model_len > limit:
        problems.append(
            f"max_model_len = {max_model_len} exceeds the model's own maximum {limit} "
            "(max_position_embeddings in its config.json)"
        )
    if max_model_len < 16:
        problems.append(f"max_model_len = {max_model_len}: must be ≥ 16")
    if concurrency < 1:
        problems.append(f"concurrency = {concurrency}: must be ≥ 1")
    if num_prompts < 1:
        problems.append(f"num_prompts = {num_prompts}: must be ≥ 1")
    if max_tokens < 1 or max_tokens >= max_model_len:
        problems.append(f"max_tokens = {max_tokens}: must be ≥ 1 and below max_model_len = {max_model_len}")
    return problems


def format_size(n_bytes: float) -> str:
    """GiB, or MiB below one GiB (a small model's KV cache would read 0.00 GiB)."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.1f} MiB"


def model_id_for(model: str) -> str:
    """A valid `model_id` from a model name or path (last path part, lowercased)."""
    name = Path(model.rstrip("/")).name.lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", name).strip("._-")[:63].strip("._-")
    return name or "model"


#: vLLM's log records: "(EngineCore pid=2) ERROR 11-27 13:38:15 [core.py:900] ...".
_ERROR_RECORD = re.compile(r"\b(ERROR|CRITICAL) \d\d-\d\d ")
#: An exception's message line (after a traceback), optionally behind vLLM's process prefix.
_EXCEPTION = re.compile(r"^(\(\w+ pid=\d+\)\s*)?[\w.]*(Error|Exception|Exit)\b(:|$)")


def error_lines(log_text: str, limit: int = 12) -> list[str]:
    """vLLM's own error lines from a server log, not a traceback tail: ERROR records and exception
    messages (with their indented detail lines, as pydantic's validation errors have)."""
    picked: list[str] = []
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if _ERROR_RECORD.search(line):
            found = [stripped]
        elif _EXCEPTION.match(line):
            found = [stripped]
            for detail in lines[i + 1 : i + 4]:
                if not detail.startswith(" ") or detail.strip().startswith(("File ", "For further information")):
                    break
                found.append(detail.strip())
        else:
            continue
        picked += [entry for entry in found if entry and entry not in picked]
    if not picked:
        picked = [line for line in lines if line.strip()][-8:]
    return picked[-limit:]


class Tokenizer(Protocol):
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def build_prompts(tokenizer: Tokenizer, vocab_size: int, count: int, tokens: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of at most `tokens` tokens each (as the server will count them).

    Random token ids decoded to text: distinct prompts, so vLLM's prefix cache cannot share their
    blocks and shrink the footprint being measured. Re-encoding decoded text may change its length,
    so each prompt is trimmed until the tokenizer says it fits.
    """
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(vocab_size) if i not in special]
    slack = max(4, tokens // 50)
    prompts = []
    for _ in range(count):
        ids = [rng.choice(ordinary) for _ in range(tokens)]
        for _attempt in range(50):
            text = tokenizer.decode(ids)
            length = len(tokenizer.encode(text, add_special_tokens=True))
            if length > tokens:  # trim by the excess
                ids = ids[: len(ids) - (length - tokens)]
            elif length >= tokens - slack:
                break
            else:  # decoding merged tokens: continue from the text's own tokens, topped up
                ids = tokenizer.encode(text, add_special_tokens=False)
                ids += [rng.choice(ordinary) for _ in range(tokens - length)]
        else:
            if length > tokens:
                raise ValueError(f"could not build a prompt of at most {tokens} tokens")
        prompts.append(text)
    return prompts


# ---------------------------------------------------------------- the result


class RunPeaks(BaseModel):
    """What one engine run saw: its NVML peaks while starting and under the load, and the load's outcome
    (the sizing run's and the replica run's alike)."""

    peak_start_bytes: int
    peak_load_bytes: int
    peak_bytes: int
    completed: int
    failed: int
    errors: list[str] = Field(default_factory=list)
    start_seconds: float
    load_seconds: float


class MeasureResult(RunPeaks):
    """One measurement: the workload, what the engine used, and the `vram_gb` to declare."""

    model: str
    model_source: str
    device: Device
    gpu: str | None = Field(default=None, description="GPU name and UUID (CUDA only).")
    vllm_version: str | None = None
    max_model_len: int
    concurrency: int
    num_prompts: int
    max_tokens: int
    prompt_tokens_max: int = Field(description="Longest prompt as the server counted it.")
    dtype: str
    kv_bytes_per_token: int
    block_size: int
    weights_bytes: int = Field(description="Checkpoint bytes (0 when the files are not local).")
    kv_cache_bytes: int = Field(description="KV cache the engine was given: concurrency × max_model_len, whole blocks.")
    gpu_memory_utilization: float | None = Field(default=None, description="Only passes vLLM's free-memory check.")
    footprint_source: str
    idle_bytes: int = Field(description="Footprint once the engine was ready, before the load.")
    output_tokens_per_s: float
    sizing_floor_bytes: int = Field(description="CPU: weights + runtime allowance + KV cache the replica sizing needs.")
    replica_run: ReplicaRun | None = Field(
        default=None,
        description="CUDA: the engine run as a replica runs it (share, MPS cap) at vram_gb, under the load.",
    )
    peak_over_share_bytes: int = Field(
        description="Peak minus vram_gb: what the engine used beyond its share (CUDA: in the replica run)."
    )
    margin_gb: float = Field(description="What the recommended overhead leaves above that peak.")
    vram_gb: float = Field(description="The budget to declare per replica.")
    overhead_gb: float = Field(description="The overhead to declare: peak over the share + the margin, up to 0.1 GiB.")
    reservation_gb: float = Field(description="What each replica costs when packed: vram_gb + overhead_gb.")
    models_entry: dict[str, Any]
    snippet: str


def models_snippet(entry: dict[str, Any], reservation_gb: float, overhead_gb: float) -> str:
    """A ready-to-paste `models:` block for a values file."""
    import yaml

    body = yaml.safe_dump({"models": [entry]}, sort_keys=False, default_flow_style=None).rstrip()
    note = f"# each replica reserves {reservation_gb:g} GiB (vram_gb + overhead_gb {overhead_gb:g})"
    return f"{note}\n{body}\n"


# ---------------------------------------------------------------- processes: device, sampling, server


class Progress(Protocol):
    def step(self, message: str) -> None: ...
    def tick(self, message: str) -> None: ...


class _Silent:
    def step(self, message: str) -> None:
        pass

    def tick(self, message: str) -> None:
        pass


@dataclass
class GPUInfo:
    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


def nvidia_gpus() -> list[GPUInfo]:
    """Every GPU NVML sees (empty without NVML or a GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    out = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
        out.append(
            GPUInfo(
                index=index,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                name=name.decode() if isinstance(name, bytes) else name,
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
                used_bytes=int(memory.used),
            )
        )
    return out


def pick_gpu(gpus: list[GPUInfo], choice: str | None) -> GPUInfo:
    """The GPU named by index or UUID, or the one with most free memory."""
    if choice is None:
        return max(gpus, key=lambda g: (g.free_bytes, -g.index))
    for gpu in gpus:
        if choice == str(gpu.index) or choice.lower() == gpu.uuid.lower():
            return gpu
    known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus)
    raise ConfigError("--gpu", [f"gpu = {choice!r} is neither an index nor a UUID of this machine's GPUs: {known}"])


def process_tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


@dataclass
class FootprintSampler:
    """The footprint of a process tree every `interval_s`: peak per phase ("start", "load").

    CPU: the sum of resident memory over the tree. CUDA: the sum of NVML's per-process usage over
    the tree on the measured GPU; where NVML reports none of the tree's pids (a container with its
    own pid namespace), the growth of the GPU's used memory since before the start instead.
    """

    root_pid: int
    device: Device
    gpu_uuid: str | None = None
    baseline_used: int = 0
    interval_s: float = SAMPLE_INTERVAL_S
    phase: str = "start"
    peaks: dict[str, int] = field(default_factory=dict)
    last: int = 0
    source: str = ""
    _tree_seen: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.source = "rss (process tree)" if self.device == "cpu" else "nvml (process tree)"
        if self.device == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.gpu_uuid)

    def start(self) -> FootprintSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="footprint-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def sample(self) -> int:
        pids = process_tree(self.root_pid)
        if self.device == "cpu":
            import psutil

            total = 0
            for pid in pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            return total
        nvml = self._nvml
        tree = set(pids)
        used = process_usage(nvml, self._handle)
        mine = [b for pid, b in used.items() if pid in tree]
        if mine or self._tree_seen:
            self._tree_seen = True
            self.source = "nvml (process tree)"
            return sum(mine)
        # None of the tree's pids on the GPU (yet, or ever: a container with its own pid namespace).
        self.source = "nvml (GPU used growth since the start)"
        return max(0, int(nvml.nvmlDeviceGetMemoryInfo(self._handle).used) - self.baseline_used)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.sample()
            except Exception:  # a process vanishing mid-read: sample again
                value = None
            if value is not None:
                self.last = value
                if value > self.peaks.get(self.phase, 0):
                    self.peaks[self.phase] = value
            self._stop.wait(self.interval_s)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


class EngineStartError(RayVramError, RuntimeError):
    """vLLM's server exited or never answered; carries its own error lines."""

    def __init__(self, message: str, lines: list[str], log_path: Path):
        super().__init__(message)
        self.lines = lines
        self.log_path = log_path


@dataclass
class EngineServer:
    """vLLM's own OpenAI server as a child process in its own session (so its whole group can be ended)."""

    model_source: str
    max_model_len: int
    kv_cache_bytes: int | None
    device: Device
    log_path: Path
    gpu_uuid: str | None = None
    gpu_memory_utilization: float | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        kwargs: dict[str, Any] = {
            "model": self.model_source,
            "served_model_name": SERVED_NAME,
            "max_model_len": self.max_model_len,
            "host": "127.0.0.1",
            "port": self.port,
            "disable_uvicorn_access_log": True,
        }
        if self.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_bytes
        if self.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        kwargs.update(self.engine_kwargs)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        for key, value in kwargs.items():
            argv += engine_flag(key, value)
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # vLLM's CPU backend lets this variable override --kv-cache-memory-bytes.
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if self.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_uuid)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # as a CUDA replica runs its engine
        else:
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as local mode does
        env.setdefault("HF_HUB_OFFLINE", "1" if Path(self.model_source).is_dir() else "0")
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )

    def wait_ready(self, timeout_s: float, on_wait: Callable[[float], None]) -> float:
        """Seconds from the launch until /health answers 200; EngineStartError (with vLLM's lines) if
        the server exits or time runs out."""
        import httpx

        assert self.proc is not None
        while True:
            elapsed = time.monotonic() - self.started_at
            if self.proc.poll() is not None:
                raise self._failure(f"vLLM's server exited with code {self.proc.returncode} before it was ready")
            if elapsed > timeout_s:
                raise self._failure(f"vLLM's server did not answer within {timeout_s:g}s")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return round(elapsed, 1)
            except httpx.HTTPError:
                pass
            on_wait(elapsed)
            time.sleep(0.5)

    def _failure(self, message: str) -> EngineStartError:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return EngineStartError(message, error_lines(text), self.log_path)

    def stop(self) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after 20 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left (the engine core)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class LoadResult:
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    prompt_tokens_max: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


async def drive_load(
    base_url: str, prompts: list[str], concurrency: int, max_tokens: int, on_done: Callable[[LoadResult], None]
) -> LoadResult:
    """Send every prompt to /v1/completions, `concurrency` in flight, each generating `max_tokens`."""
    import httpx

    result = LoadResult()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    start = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {
                "model": SERVED_NAME,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            }
            try:
                response = await client.post(f"{base_url}/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                usage = response.json().get("usage") or {}
                result.completed += 1
                result.output_tokens += int(usage.get("completion_tokens") or 0)
                result.prompt_tokens_max = max(result.prompt_tokens_max, int(usage.get("prompt_tokens") or 0))
            except Exception as error:
                result.failed += 1
                if len(result.errors) < 5:
                    result.errors.append(f"{type(error).__name__}: {error}")
            on_done(result)

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=10.0)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.seconds = round(time.monotonic() - start, 2)
    return result


# ---------------------------------------------------------------- one engine run, and the replica run


@dataclass
class EngineRun:
    """What one engine run under the load saw."""

    sampler: FootprintSampler
    load: LoadResult
    start_s: float
    idle_bytes: int


def _run_engine(
    server: EngineServer,
    gpu: GPUInfo | None,
    request: MeasureRequest,
    num_prompts: int,
    prompts: Callable[[], list[str]],
    progress: Progress,
) -> EngineRun:
    """Start `server`, drive the load through it, and stop it; the footprint sampled throughout."""
    sampler: FootprintSampler | None = None
    try:
        server.start()
        assert server.proc is not None
        sampler = FootprintSampler(
            server.proc.pid, server.device, gpu.uuid if gpu else None, baseline_used=gpu.used_bytes if gpu else 0
        ).start()
        texts = prompts()
        start_s = server.wait_ready(
            request.start_timeout_s,
            lambda s: progress.tick(f"starting vLLM… {s:.0f}s, footprint {format_size(sampler.last)}"),
        )
        time.sleep(2 * SAMPLE_INTERVAL_S)
        idle = sampler.last
        sampler.phase = "load"
        progress.step(
            f"engine ready in {start_s:g}s ({format_size(idle)}); sending {num_prompts} prompts of ≤ "
            f"{request.max_model_len - request.max_tokens} tokens, {request.concurrency} at a time, "
            f"{request.max_tokens} tokens each"
        )

        def done(r: LoadResult) -> None:
            progress.tick(
                f"load: {r.completed + r.failed}/{num_prompts} done ({r.failed} failed), "
                f"footprint {format_size(sampler.last)}, peak {format_size(sampler.peak)}"
            )

        load = asyncio.run(drive_load(server.base_url, texts, request.concurrency, request.max_tokens, done))
        time.sleep(2 * SAMPLE_INTERVAL_S)
    finally:
        if sampler is not None:
            sampler.stop()
        progress.step("stopping vLLM")
        server.stop()
    return EngineRun(sampler, load, start_s, idle)


class ReplicaRun(RunPeaks):
    """The engine as a replica of budget `vram_gb` runs it: vLLM at the share budget / GPU total (no
    KV cache in bytes: vLLM gives it what the share leaves), an MPS client capped at the reservation
    where the node's MPS daemon runs."""

    budget_bytes: int
    gpu_memory_utilization: float
    cap_bytes: int = Field(description="budget + the overhead derived from the weights, at most the GPU.")
    mps_capped: bool = Field(description="Whether the engine ran as an MPS client under that cap.")
    idle_bytes: int
    load: LoadResult = Field(exclude=True)

    model_config = {"arbitrary_types_allowed": True}


def _replica_run(
    model: ResolvedModel,
    gpu: GPUInfo,
    vram_bytes: int,
    weights: int,
    request: MeasureRequest,
    num_prompts: int,
    prompts: Callable[[], list[str]],
    progress: Progress,
) -> ReplicaRun:
    """Run the engine sized the way a replica of `vram_bytes` is (`serving.sizing.size_engine`), with
    the same MPS cap when the node's daemon runs (`serving.mps`), under the same load."""
    model_id = request.model_id or model_id_for(request.model)
    provisional = capacity.derived_overhead_bytes(weights)
    budget = size_engine(model_id, vram_bytes, "cuda", gpu.total_bytes, weights, provisional)
    cap = budget.cap_bytes or vram_bytes
    pipe_dir = node_pipe_dir()
    log_path = (request.log_path or Path(tempfile.mkdtemp(prefix="ray-vram-measure-")) / "vllm.log").with_suffix(
        ".replica.log"
    )
    server = EngineServer(
        model_source=model.source,
        max_model_len=request.max_model_len,
        kv_cache_bytes=None,
        device="cuda",
        log_path=log_path,
        gpu_uuid=gpu.uuid,
        gpu_memory_utilization=budget.gpu_memory_utilization,
        engine_kwargs=request.engine_kwargs,
        extra_env=client_env(pipe_dir, gpu.uuid, cap) if pipe_dir else {},
    )
    progress.step(
        f"replica run: vram_gb {vram_bytes / GIB:g} as a replica runs it (gpu_memory_utilization "
        f"{budget.gpu_memory_utilization}), "
        + (f"MPS-capped at {format_gib(cap)}" if pipe_dir else "no MPS daemon (not capped)")
        + f" (log: {log_path})"
    )
    run = _run_engine(server, gpu, request, num_prompts, prompts, progress)
    peak = run.sampler.peak
    progress.step(f"replica run: peak {format_size(peak)}, {format_size(peak - vram_bytes)} over the share")
    return ReplicaRun(
        budget_bytes=vram_bytes,
        gpu_memory_utilization=budget.gpu_memory_utilization or 0.0,
        cap_bytes=cap,
        mps_capped=pipe_dir is not None,
        idle_bytes=run.idle_bytes,
        peak_start_bytes=run.sampler.peaks.get("start", 0),
        peak_load_bytes=run.sampler.peaks.get("load", 0),
        peak_bytes=peak,
        completed=run.load.completed,
        failed=run.load.failed,
        errors=run.load.errors,
        start_seconds=run.start_s,
        load_seconds=run.load.seconds,
        load=run.load,
    )


# ---------------------------------------------------------------- the whole measurement


@dataclass
class MeasureRequest:
    model: str
    max_model_len: int
    concurrency: int
    num_prompts: int | None = None
    max_tokens: int = 128
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    start_timeout_s: float = 1200.0
    log_path: Path | None = None
    seed: int = 0
    replica_run: bool = True


@dataclass
class ResolvedModel:
    name: str
    source: str  # what vLLM loads: a directory or a hub name
    directory: Path  # where config.json (and, for a local model, the weights) lie
    config: dict[str, Any]


def resolve_model(model: str) -> ResolvedModel:
    """The model's source and config.json: `demo`, a local directory, or a Hugging Face name."""
    from .demo.model import DEMO_MODELS, ensure_demo_model

    if model in DEMO_MODELS:
        directory = ensure_demo_model(kind=DEMO_MODELS[model])
        return ResolvedModel(model, str(directory), directory, json.loads((directory / "config.json").read_text()))
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", "./", "../", "~")):
        if not (path / "config.json").is_file():
            reason = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError("--model", [f"model = {model!r}: the local path {path} {reason}"])
        return ResolvedModel(model, str(path.resolve()), path.resolve(), json.loads((path / "config.json").read_text()))
    try:
        from huggingface_hub import hf_hub_download

        config_path = Path(hf_hub_download(model, "config.json"))
    except Exception as error:
        raise ConfigError(
            "--model",
            [
                f"model = {model!r} is neither `demo`, a local directory, nor a Hugging Face model "
                f"this machine can reach ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ],
        ) from None
    return ResolvedModel(model, model, config_path.parent, json.loads(config_path.read_text()))


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _prompts(model: ResolvedModel, count: int, tokens: int, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.source)
    vocab = int((model.config.get("text_config") or model.config).get("vocab_size") or len(tokenizer))
    return build_prompts(tokenizer, min(vocab, len(tokenizer)), count, tokens, seed)


def measure(request: MeasureRequest, progress: Progress | None = None) -> MeasureResult:
    """Start the engine sized for the workload, drive the load, and turn the peak into a `vram_gb`.

    Raises ConfigError for bad input (before anything starts) and EngineStartError when vLLM fails.
    """
    from ..core.config import ModelSpec

    progress = progress or _Silent()
    model = resolve_model(request.model)
    model_id = request.model_id or model_id_for(request.model)
    try:  # the same rules as a values file's engine_kwargs (ray-vram owns the sizing arguments)
        ModelSpec(model_id=model_id, model=request.model, vram_gb=1, engine_kwargs=request.engine_kwargs)
    except ValueError as error:
        raise ConfigError("--engine-kwargs / --model-id", [str(error)]) from None
    try:
        shape = model_shape(model.config, request.engine_kwargs)
    except ValueError as error:
        raise ConfigError("--model", [f"model = {request.model!r}: {error}"]) from None
    num_prompts = request.num_prompts if request.num_prompts is not None else 4 * request.concurrency
    problems = check_workload(shape, request.max_model_len, request.concurrency, request.max_tokens, num_prompts)
    if problems:
        raise ConfigError("ray-vram measure", problems)

    gpus = nvidia_gpus() if request.device != "cpu" else []
    if request.device == "cuda" and not gpus:
        raise ConfigError("--device", ["device = 'cuda' but NVML finds no NVIDIA GPU on this machine"])
    device: Device = "cuda" if gpus else "cpu"
    gpu = pick_gpu(gpus, request.gpu) if device == "cuda" else None

    per_token = kv_bytes_per_token(shape)
    block_size = int(request.engine_kwargs.get("block_size") or DEFAULT_BLOCK_SIZE[device])
    kv_bytes = kv_cache_bytes(request.concurrency, request.max_model_len, per_token, block_size)
    utilization = None
    if gpu is not None:
        try:
            utilization = gpu_memory_utilization(gpu.free_bytes, gpu.total_bytes)
        except ValueError as error:
            raise ConfigError("--gpu", [f"GPU {gpu.index} ({gpu.uuid}): {error}"]) from None

    log_path = request.log_path or Path(tempfile.mkdtemp(prefix="ray-vram-measure-")) / "vllm.log"
    server = EngineServer(
        model_source=model.source,
        max_model_len=request.max_model_len,
        kv_cache_bytes=kv_bytes,
        device=device,
        log_path=log_path,
        gpu_uuid=gpu.uuid if gpu else None,
        gpu_memory_utilization=utilization,
        engine_kwargs=request.engine_kwargs,
    )
    where = f"GPU {gpu.index} {gpu.name} ({gpu.uuid})" if gpu else "CPU"
    progress.step(
        f"sizing run on {where}: KV cache {format_size(kv_bytes)} for {request.concurrency} × "
        f"{request.max_model_len} tokens (log: {log_path})"
    )
    prompt_tokens = request.max_model_len - request.max_tokens
    prompts: list[str] = []

    def build_prompts_once() -> list[str]:
        if not prompts:  # built while the first engine starts (loading the tokenizer takes a while too)
            prompts.extend(_prompts(model, num_prompts, prompt_tokens, request.seed))
        return prompts

    sizing = _run_engine(server, gpu, request, num_prompts, build_prompts_once, progress)
    load = sizing.load

    weights = checkpoint_bytes(model.directory)
    peak = sizing.sampler.peak
    floor = weights + CPU_RUNTIME_BYTES + kv_bytes if device == "cpu" else 0
    vram_gb = recommend_vram_gb(device, peak, floor)
    vram_bytes = gib_to_bytes(vram_gb)
    replica: ReplicaRun | None = None
    if gpu is not None and request.replica_run:
        replica = _replica_run(model, gpu, vram_bytes, weights, request, num_prompts, build_prompts_once, progress)
        load = replica.load if replica.load.failed else load
        peak_over_share = replica.peak_bytes - vram_bytes
    else:  # a CPU replica runs the way the sizing run did: its KV cache in bytes
        peak_over_share = peak - vram_bytes
    overhead_gb = capacity.recommend_overhead_gb(peak_over_share)
    reservation_gb = capacity.reservation_gb(vram_gb, overhead_gb)
    entry: dict[str, Any] = {
        "model_id": model_id,
        "model": request.model,
        "vram_gb": vram_gb,
        "overhead_gb": overhead_gb,
        "max_model_len": request.max_model_len,
    }
    if request.engine_kwargs:
        entry["engine_kwargs"] = request.engine_kwargs
    return MeasureResult(
        model=request.model,
        model_source=model.source,
        device=device,
        gpu=f"{gpu.name} ({gpu.uuid})" if gpu else None,
        vllm_version=_vllm_version(),
        max_model_len=request.max_model_len,
        concurrency=request.concurrency,
        num_prompts=num_prompts,
        max_tokens=request.max_tokens,
        prompt_tokens_max=load.prompt_tokens_max,
        dtype=shape.dtype,
        kv_bytes_per_token=per_token,
        block_size=block_size,
        weights_bytes=weights,
        kv_cache_bytes=kv_bytes,
        gpu_memory_utilization=utilization,
        footprint_source=sizing.sampler.source,
        idle_bytes=sizing.idle_bytes,
        peak_start_bytes=sizing.sampler.peaks.get("start", 0),
        peak_load_bytes=sizing.sampler.peaks.get("load", 0),
        peak_bytes=peak,
        completed=load.completed,
        failed=load.failed,
        errors=load.errors,
        start_seconds=sizing.start_s,
        load_seconds=load.seconds,
        output_tokens_per_s=round(load.output_tokens / load.seconds, 1) if load.seconds else 0.0,
        sizing_floor_bytes=floor,
        replica_run=replica,
        peak_over_share_bytes=peak_over_share,
        margin_gb=capacity.MARGIN_GB,
        vram_gb=vram_gb,
        overhead_gb=overhead_gb,
        reservation_gb=reservation_gb,
        models_entry=entry,
        snippet=models_snippet(entry, reservation_gb, overhead_gb),
    )


MeasureResult.model_rebuild()
