"""What `ray-vram check --stress` measured and what it concludes, without Ray, NVML or torch.

The Ray side (`stress.runner`) fills `GPUStress` and `CPUStress` results; everything that turns them
into verdicts (failed, memory misreported, slow against the median of the same model, skipped) and
into table rows is here, so that every rule is tested with plain pydantic inputs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import Field

from ...core import capacity
from ...core.config import GIB, StrictModel

Status = Literal["ok", "slow", "misreported", "failed", "skipped"]
#: Statuses that make `check --stress` exit 1 (a skipped GPU is reported, never a failure).
BAD_STATUSES: frozenset[str] = frozenset({"slow", "misreported", "failed"})
#: NVML throttle reasons that mean the hardware protects itself (heat, power brake, a slowdown
#: signal): a GPU under them during a burn-in fails it. Power capping and idle are normal under load.
FATAL_THROTTLE_REASONS: frozenset[str] = frozenset(
    {"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown"}
)
#: NVML may round a process's usage: it may read this much below what torch holds and still be right.
NVML_UNDER_TOLERANCE = 0.02


class GPUStress(StrictModel):
    """One GPU's stress run: what was reserved, measured and read back through NVML."""

    node: str
    index: int
    uuid: str
    name: str
    replica_id: str = Field(description="The allocator replica id of the stress reservation.")
    skipped: str | None = Field(default=None, description="Why the GPU was not stressed (not a failure).")
    error: str | None = Field(default=None, description="Why the run failed.")
    reserved_bytes: int = Field(default=0, description="Budget reserved from the allocator.")
    overhead_bytes: int = Field(default=0, description="Per-replica overhead the ledger counts on top.")
    allocated_bytes: int = Field(default=0, description="Memory torch held at the peak of the run.")
    nvml_bytes: int | None = Field(default=None, description="NVML's per-process usage of the stress task at peak.")
    nvml_note: str = Field(default="", description="How the stress process was found in NVML's list.")
    seconds: float = 0.0
    bf16_tflops: float | None = None
    fp16_tflops: float | None = None
    copy_gbps: float | None = Field(default=None, description="Device-to-device copy, read + write bytes per s.")
    temperature_c: int | None = None
    max_temperature_c: int | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    ecc_uncorrected: int | None = Field(default=None, description="Uncorrected ECC errors new during the run.")
    ecc_corrected: int | None = Field(default=None, description="Corrected ECC errors new during the run.")
    xids: list[int] = Field(default_factory=list, description="Critical XID events during the run.")
    throttle_reasons: list[str] = Field(default_factory=list, description="NVML throttle reasons seen under load.")

    @property
    def label(self) -> str:
        return f"node {self.node}, GPU {self.index}"

    def throughputs(self) -> dict[str, float]:
        """The measured rates by name (only those measured)."""
        named = {"bf16 TFLOP/s": self.bf16_tflops, "fp16 TFLOP/s": self.fp16_tflops, "copy GB/s": self.copy_gbps}
        return {name: value for name, value in named.items() if value is not None}


class CPUStress(StrictModel):
    """One Ray node's CPU run."""

    node: str
    node_id: str
    cpu_model: str = "unknown CPU"
    threads: int = Field(default=1, ge=1, description="Threads the workload ran on (the node's Ray CPUs).")
    seconds: float = 0.0
    gflops: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"node {self.node}"

    @property
    def model(self) -> str:
        """Nodes compare only with nodes of the same CPU and the same number of threads."""
        return f"{self.cpu_model} × {self.threads} thread{'s' if self.threads > 1 else ''}"

    def throughputs(self) -> dict[str, float]:
        return {} if self.gflops is None else {"GFLOP/s": self.gflops}


class Verdict(StrictModel):
    phase: Literal["gpu", "cpu"]
    target: str = Field(description="node, or node and GPU index")
    model: str = Field(description="GPU name or CPU model: the group it is compared with")
    status: Status
    reasons: list[str] = Field(default_factory=list)


class StressReport(StrictModel):
    """The whole burn-in: settings, every result, and one verdict per result (same order)."""

    seconds: float
    gpu_fraction: float
    slow_ratio: float
    gpus: list[GPUStress]
    cpus: list[CPUStress]
    gpu_verdicts: list[Verdict]
    cpu_verdicts: list[Verdict]
    ok: bool


def gpu_memory_problems(result: GPUStress) -> list[str]:
    """NVML's view of the stress process against what torch held and what the ledger reserved."""
    if result.nvml_bytes is None:
        note = f" ({result.nvml_note})" if result.nvml_note else ""
        return [f"NVML lists no memory for the stress process on {result.label}{note}: budgets cannot be watched here"]
    problems = []
    floor = result.allocated_bytes * (1 - NVML_UNDER_TOLERANCE)
    if result.nvml_bytes < floor:
        problems.append(
            f"NVML sees {_gib(result.nvml_bytes)} used by the stress process, less than the "
            f"{_gib(result.allocated_bytes)} torch holds (short by {_gib(result.allocated_bytes - result.nvml_bytes)})"
        )
    ceiling = capacity.reservation_bytes(result.reserved_bytes, result.overhead_bytes)
    if result.nvml_bytes > ceiling:
        problems.append(
            f"NVML sees {_gib(result.nvml_bytes)} used by the stress process, more than its reservation of "
            f"{_gib(ceiling)} ({_gib(result.reserved_bytes)} budget + {_gib(result.overhead_bytes)} overhead; "
            f"over by {_gib(result.nvml_bytes - ceiling)})"
        )
    return problems


def gpu_health_problems(result: GPUStress) -> list[str]:
    """ECC errors, critical XIDs and hardware throttling seen during the run."""
    problems = []
    if result.ecc_uncorrected:
        problems.append(f"{result.ecc_uncorrected} uncorrected ECC error(s) during the run")
    if result.xids:
        problems.append(f"critical XID event(s) {', '.join(str(x) for x in result.xids)} during the run")
    fatal = sorted(FATAL_THROTTLE_REASONS & set(result.throttle_reasons))
    if fatal:
        problems.append(f"throttled by {', '.join(fatal)} under load")
    return problems


def medians(results: Iterable[GPUStress | CPUStress], model_of: dict[int, str]) -> dict[tuple[str, str], float]:
    """Median of each throughput per model, over the results that measured it (keyed by id())."""
    samples: dict[tuple[str, str], list[float]] = {}
    for result in results:
        for name, value in result.throughputs().items():
            samples.setdefault((model_of[id(result)], name), []).append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def slow_problems(
    result: GPUStress | CPUStress, model: str, median_of: dict[tuple[str, str], float], slow_ratio: float, peers: int
) -> list[str]:
    """Each throughput below `slow_ratio` × the median of the same model."""
    problems = []
    for name, value in result.throughputs().items():
        median = median_of[(model, name)]
        if slow_ratio > 0 and value < slow_ratio * median:
            problems.append(
                f"{name} {value:.1f} is {value / median:.2f} × the median {median:.1f} of {peers} {model} "
                f"(limit {slow_ratio:g} ×)"
            )
    return problems


def _status(failed: list[str], misreported: list[str], slow: list[str]) -> Status:
    if failed:
        return "failed"
    if misreported:
        return "misreported"
    return "slow" if slow else "ok"


def judge_gpus(results: Sequence[GPUStress], slow_ratio: float) -> list[Verdict]:
    """One verdict per GPU; a GPU is compared only with GPUs of the same name."""
    measured = [r for r in results if r.skipped is None and r.error is None]
    model_of = {id(r): r.name for r in measured}
    median_of = medians(measured, model_of)
    peers = {name: sum(1 for r in measured if r.name == name) for name in model_of.values()}
    verdicts = []
    for r in results:
        if r.skipped is not None:
            verdicts.append(Verdict(phase="gpu", target=r.label, model=r.name, status="skipped", reasons=[r.skipped]))
            continue
        if r.error is not None:
            verdicts.append(Verdict(phase="gpu", target=r.label, model=r.name, status="failed", reasons=[r.error]))
            continue
        failed, memory = gpu_health_problems(r), gpu_memory_problems(r)
        slow = slow_problems(r, r.name, median_of, slow_ratio, peers[r.name])
        if not r.throughputs():
            failed.append("no throughput was measured")
        status = _status(failed, memory, slow)
        verdicts.append(
            Verdict(phase="gpu", target=r.label, model=r.name, status=status, reasons=failed + memory + slow)
        )
    return verdicts


def judge_cpus(results: Sequence[CPUStress], slow_ratio: float) -> list[Verdict]:
    """One verdict per node; a node is compared only with nodes of the same CPU model and thread count."""
    measured = [r for r in results if r.error is None and r.gflops is not None]
    model_of = {id(r): r.model for r in measured}
    median_of = medians(measured, model_of)
    peers = {model: sum(1 for r in measured if r.model == model) for model in model_of.values()}
    verdicts = []
    for r in results:
        if r.error is not None or r.gflops is None:
            reason = r.error or "no throughput was measured"
            verdicts.append(Verdict(phase="cpu", target=r.label, model=r.model, status="failed", reasons=[reason]))
            continue
        slow = slow_problems(r, r.model, median_of, slow_ratio, peers[r.model])
        verdicts.append(Verdict(phase="cpu", target=r.label, model=r.model, status=_status([], [], slow), reasons=slow))
    return verdicts


def build_report(
    gpus: Sequence[GPUStress], cpus: Sequence[CPUStress], seconds: float, gpu_fraction: float, slow_ratio: float
) -> StressReport:
    gpu_verdicts, cpu_verdicts = judge_gpus(gpus, slow_ratio), judge_cpus(cpus, slow_ratio)
    ok = not any(v.status in BAD_STATUSES for v in gpu_verdicts + cpu_verdicts)
    return StressReport(
        seconds=seconds,
        gpu_fraction=gpu_fraction,
        slow_ratio=slow_ratio,
        gpus=list(gpus),
        cpus=list(cpus),
        gpu_verdicts=gpu_verdicts,
        cpu_verdicts=cpu_verdicts,
        ok=ok,
    )


# --------------------------------------------------------------------------- table rows

COLUMNS = ["phase", "node", "device", "model", "throughput", "memory NVML / torch / reserved", "end state", "verdict"]


def _gib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f} GiB"


def verdicts(report: StressReport) -> list[Verdict]:
    """Every verdict in table order: GPUs first, then nodes."""
    return report.gpu_verdicts + report.cpu_verdicts


def notes(report: StressReport) -> list[str]:
    """One line per verdict with reasons, printed under the table (reasons are too long for a cell)."""
    return [f"{v.phase} {v.target}: {v.status}: {'; '.join(v.reasons)}" for v in verdicts(report) if v.reasons]


def gpu_row(result: GPUStress, verdict: Verdict) -> list[str]:
    rates = result.throughputs()
    throughput = " · ".join(f"{name.split()[0]} {value:.1f}" for name, value in rates.items())
    if rates:
        throughput += " (TFLOP/s, GB/s)"
    memory = "-"
    if result.reserved_bytes:
        nvml = "-" if result.nvml_bytes is None else f"{result.nvml_bytes / GIB:.2f}"
        memory = (
            f"{nvml} / {result.allocated_bytes / GIB:.2f} / {result.reserved_bytes / GIB:.2f}"
            f"+{result.overhead_bytes / GIB:.2f} GiB"
        )
    state = []
    if result.temperature_c is not None:
        peak = f" (max {result.max_temperature_c} °C)" if result.max_temperature_c is not None else ""
        state.append(f"{result.temperature_c} °C{peak}")
    if result.sm_clock_mhz is not None:
        state.append(f"SM {result.sm_clock_mhz} / mem {result.mem_clock_mhz} MHz")
    if result.ecc_uncorrected is not None:
        state.append(f"ECC {result.ecc_uncorrected} uncorr / {result.ecc_corrected} corr")
    if result.xids:
        state.append(f"XID {','.join(str(x) for x in result.xids)}")
    if result.throttle_reasons:
        state.append(f"throttle {','.join(result.throttle_reasons)}")
    device = f"GPU {result.index} {result.uuid}"
    end_state = "; ".join(state) or "-"
    return ["gpu", result.node, device, result.name, throughput or "-", memory, end_state, verdict.status]


def cpu_row(result: CPUStress, verdict: Verdict) -> list[str]:
    throughput = "-" if result.gflops is None else f"{result.gflops:.1f} GFLOP/s"
    device = f"CPU ({result.node_id[:8]})"
    return ["cpu", result.node, device, result.model, throughput, "-", "-", verdict.status]


def rows(report: StressReport) -> list[list[str]]:
    """The table: GPUs first, then nodes, each with its verdict (reasons: `notes`)."""
    table = [gpu_row(r, v) for r, v in zip(report.gpus, report.gpu_verdicts, strict=True)]
    return table + [cpu_row(r, v) for r, v in zip(report.cpus, report.cpu_verdicts, strict=True)]
