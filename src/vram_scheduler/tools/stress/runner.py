"""The Ray side of `ray-vram check --stress`: one actor per GPU, one task per CPU node, results back.

GPU phase: the allocator's view lists the GPUs. Each one gets a one-call Ray actor on its node (hard
node affinity), which reserves `stress-<node>-<index>` from the allocator *before* touching the GPU
— owned by the actor, so the allocator reclaims it should the actor die — pins itself to the GPU by
UUID as replicas do, runs `stress.gpu`, and releases the reservation whatever happened; the driver
releases it once more, in case the actor never got that far. A GPU whose free memory cannot hold
the reservation is skipped, never forced.

CPU phase: one task per alive Ray node with CPUs, a numpy matrix product on as many threads as the
node has Ray CPUs, checked against its first result.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ...allocator.actor import AllocatorClient, ReservationError
from ...core import capacity
from ...core.config import GIB, ConfigError, format_gib
from ...core.contract import GPUState, VRAMState
from ...core.ray_names import NODE_NAME_LABEL
from ...serving.replica.pinning import PINNING_ENV, is_cuda_uuid, pin_process
from .report import CPUStress, GPUStress, StressReport, build_report

log = logging.getLogger(__name__)

#: Model id of every stress reservation (replica ids are `stress-<node>-<index>`).
STRESS_MODEL_ID = "ray-vram-stress"
#: The smallest budget worth a run: less room than this on a GPU and it is skipped.
MIN_STRESS_BYTES = GIB
#: Time a stress actor or task may take beyond `--seconds` (worker start, torch import, CUDA init).
STARTUP_ALLOWANCE_S = 300.0
#: Side of the CPU phase's float32 matrices.
CPU_MATRIX = 512


@dataclass(frozen=True)
class RayNode:
    """An alive Ray node and every name it answers to (`--nodes`, inventory node names)."""

    node_id: str
    name: str
    cpus: float
    aliases: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class GPUTarget:
    """One GPU of the allocator's view and what the GPU phase does with it."""

    gpu: GPUState
    ray_node: RayNode | None
    budget_bytes: int
    overhead_bytes: int
    skip: str | None

    @property
    def replica_id(self) -> str:
        return f"stress-{self.gpu.node}-{self.gpu.index}"


def ray_nodes() -> list[RayNode]:
    """Alive Ray nodes; a name several nodes share (one machine, many nodes) gets its id appended."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    found = []
    for info in alive:
        label = (info.get("Labels") or {}).get(NODE_NAME_LABEL)
        aliases = {label, info.get("NodeManagerHostname"), info.get("NodeName"), info.get("NodeManagerAddress")}
        name = label or info.get("NodeManagerHostname") or info.get("NodeManagerAddress") or info["NodeID"]
        found.append((info, name, {a for a in aliases if a}))
    names = [name for _, name, _ in found]
    nodes = []
    for info, name, aliases in found:
        unique = name if names.count(name) == 1 else f"{name}/{info['NodeID'][:8]}"
        cpus = float((info.get("Resources") or {}).get("CPU", 0))
        nodes.append(RayNode(info["NodeID"], unique, cpus, frozenset(aliases | {unique, info["NodeID"]})))
    return sorted(nodes, key=lambda n: n.name)


def match_ray_node(name: str, nodes: Sequence[RayNode]) -> tuple[RayNode | None, str | None]:
    """The one Ray node called `name` (node id, node-name label, host name, address), or why none."""
    exact = [n for n in nodes if name in (n.node_id, n.name)]
    matches = exact or [n for n in nodes if name in n.aliases]
    if len(matches) == 1:
        return matches[0], None
    if not matches:
        return None, f"node {name} is not an alive Ray node (a declared inventory names it): nothing to run there"
    return None, f"node {name} matches {len(matches)} Ray nodes ({', '.join(n.name for n in matches)})"


def select_names(wanted: Sequence[str] | None, state: VRAMState, nodes: Sequence[RayNode]) -> set[str] | None:
    """Validate `--nodes`: each name must be an inventory node or a Ray node. None = every node."""
    if not wanted:
        return None
    known = {g.node for g in state.gpus} | {a for n in nodes for a in n.aliases}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        listed = sorted({g.node for g in state.gpus} | {n.name for n in nodes})
        names = ", ".join(listed) or "none"
        raise ConfigError("--nodes", [f"no node named {w!r} (inventory and Ray nodes: {names})" for w in unknown])
    return set(wanted)


def _wanted(selected: set[str] | None, *names: str) -> bool:
    return selected is None or any(n in selected for n in names)


def gpu_targets(
    state: VRAMState, nodes: Sequence[RayNode], gpu_fraction: float, selected: set[str] | None = None
) -> list[GPUTarget]:
    """Every GPU the GPU phase covers, its budget (`gpu_fraction` × the free memory the monitor last
    read, capped by the room the ledger leaves) or why it is skipped."""
    overhead = capacity.placement_overhead_bytes(state.settings)
    targets = []
    for gpu in state.gpus:
        ray_node, why = match_ray_node(gpu.node, nodes)
        if not _wanted(selected, gpu.node, *(ray_node.aliases if ray_node else ())):
            continue
        room = capacity.budget_room(gpu.free_bytes, overhead)
        budget = min(int(gpu_fraction * (gpu.total_bytes - gpu.used_bytes)), room)
        skip = None
        if not is_cuda_uuid(gpu.uuid):
            skip = f"{gpu.uuid} is host memory standing in for a GPU: nothing to stress (the CPU phase covers it)"
        elif not gpu.healthy:
            skip = "the monitor reports it unhealthy: it takes no reservations"
        elif gpu.stale:
            skip = f"node {gpu.node} is stale (no inventory lately): it takes no reservations"
        elif why is not None:
            skip = why
        elif budget < MIN_STRESS_BYTES:
            skip = (
                f"{gpu_fraction:g} × {format_gib(gpu.total_bytes - gpu.used_bytes)} free, within the ledger's room of "
                f"{format_gib(max(room, 0))} ({format_gib(gpu.free_bytes)} free − {format_gib(overhead)} overhead), "
                f"is {format_gib(max(budget, 0))}: under the {format_gib(MIN_STRESS_BYTES)} a stress run needs; "
                "not forced"
            )
        targets.append(GPUTarget(gpu, ray_node, max(budget, 0), overhead, skip))
    return targets


def _base_result(target: GPUTarget) -> GPUStress:
    gpu = target.gpu
    return GPUStress(node=gpu.node, index=gpu.index, uuid=gpu.uuid, name=gpu.name, replica_id=target.replica_id)


class GPUStressActor:
    """One GPU's stress run. An actor, not a task: its id owns the reservation, so the allocator
    reclaims it should the process die before releasing."""

    def run(self, target: GPUTarget, seconds: float) -> dict[str, Any]:
        from .gpu import SkipGPU, run_gpu_stress

        result = _base_result(target)
        allocator = AllocatorClient()
        owner = ray.get_runtime_context().get_actor_id()
        try:
            allocator.reserve(
                target.replica_id,
                STRESS_MODEL_ID,
                target.budget_bytes,
                target.gpu.uuid,
                owner,
                overhead_bytes=target.overhead_bytes,
            )
        except ReservationError as refusal:
            result.skipped = f"the allocator refused the stress reservation: {_refusal_text(refusal)}"
            return result.model_dump()
        result.reserved_bytes, result.overhead_bytes = target.budget_bytes, target.overhead_bytes
        start = time.monotonic()
        try:
            if pin_process(target.gpu.uuid) != "cuda":
                node_id = ray.get_runtime_context().get_node_id()[:8]
                result.error = (
                    f"GPU {target.gpu.uuid} is not visible through NVML on Ray node {platform.node()} "
                    f"({node_id}): the inventory names it, this node has no such GPU"
                )
            else:
                result = result.model_copy(
                    update=run_gpu_stress(target.gpu.uuid, target.budget_bytes, target.overhead_bytes, seconds)
                )
        except SkipGPU as skipped:
            result.skipped = str(skipped)
        except Exception as error:  # any failure of the workload is this GPU's verdict, not ours
            result.error = f"{type(error).__name__}: {error}"
        finally:
            result.seconds = round(time.monotonic() - start, 2)
            allocator.release(target.replica_id)
        return GPUStress.model_validate(result.model_dump()).model_dump()


def run_gpu_phase(targets: Sequence[GPUTarget], seconds: float) -> list[GPUStress]:
    """Run every stressable GPU at once (each on its own node and GPU); skipped ones pass through."""
    allocator = AllocatorClient()
    actor_class = ray.remote(GPUStressActor)
    running: list[tuple[GPUTarget, Any, Any]] = []
    for target in targets:
        if target.skip is None and target.ray_node is not None:
            actor = actor_class.options(
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=target.ray_node.node_id, soft=False),
                runtime_env={"env_vars": dict(PINNING_ENV)},
            ).remote()
            running.append((target, actor, actor.run.remote(target, seconds)))
    results: dict[str, GPUStress] = {}
    deadline = time.monotonic() + seconds + STARTUP_ALLOWANCE_S
    for target, actor, ref in running:
        try:
            data = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            results[target.replica_id] = GPUStress.model_validate(data)
        except ray.exceptions.GetTimeoutError:
            failed = _base_result(target)
            failed.error = f"no result within {seconds + STARTUP_ALLOWANCE_S:.0f} s (--seconds + startup allowance)"
            results[target.replica_id] = failed
        except ray.exceptions.RayError as error:
            failed = _base_result(target)
            where = target.ray_node.name if target.ray_node else "?"
            failed.error = f"the stress actor on {where} died: {_first_line(error)}"
            results[target.replica_id] = failed
        finally:
            ray.kill(actor, no_restart=True)
            allocator.release(target.replica_id)  # no-op when the actor released it
    out = []
    for target in targets:
        if target.replica_id in results:
            out.append(results[target.replica_id])
        else:
            skipped = _base_result(target)
            skipped.skipped = target.skip or "no Ray node to run on"
            out.append(skipped)
    return out


def _refusal_text(error: BaseException) -> str:
    """The allocator's own words: Ray re-raises a remote error as a subclass of it whose text
    starts with the remote traceback and terminal colours; `cause` is the original exception."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what Python knows of the machine."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_stress(node: str, node_id: str, threads: int, seconds: float) -> dict[str, Any]:
    """float32 matrix products for `seconds` on `threads` BLAS threads; GFLOP/s, and a failure if a
    product ever differs from the first one (a CPU that computes wrong is worse than a slow one)."""
    import numpy as np

    result = CPUStress(node=node, node_id=node_id, cpu_model=cpu_model(), threads=threads)
    rng = np.random.default_rng(16)
    a = rng.standard_normal((CPU_MATRIX, CPU_MATRIX), dtype=np.float32)
    b = rng.standard_normal((CPU_MATRIX, CPU_MATRIX), dtype=np.float32)
    reference = a @ b
    out = np.empty_like(reference)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        np.matmul(a, b, out=out)
        count += 1
        if count % 64 == 0 and not np.allclose(out, reference, rtol=1e-4, atol=1e-3):
            result.error = f"product {count} differs from the first one: the CPU computed a wrong result"
            break
    elapsed = time.perf_counter() - start
    result.seconds = round(elapsed, 2)
    if result.error is None:
        result.gflops = round(2 * CPU_MATRIX**3 * count / elapsed / 1e9, 2)
    return result.model_dump()


def run_cpu_phase(nodes: Sequence[RayNode], seconds: float) -> list[CPUStress]:
    """One task per node with CPUs, all at once (each on its own node)."""
    task = ray.remote(cpu_stress)
    refs = []
    for node in nodes:
        threads = max(1, int(node.cpus))
        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        options = task.options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False),
            runtime_env={"env_vars": env},
        )
        refs.append((node, threads, options.remote(node.name, node.node_id, threads, seconds)))
    results = []
    deadline = time.monotonic() + seconds + STARTUP_ALLOWANCE_S
    for node, threads, ref in refs:
        try:
            results.append(CPUStress.model_validate(ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            error = f"no result within {seconds + STARTUP_ALLOWANCE_S:.0f} s (--seconds + startup allowance)"
            results.append(CPUStress(node=node.name, node_id=node.node_id, threads=threads, error=error))
        except ray.exceptions.RayError as failure:
            error = f"the CPU task on {node.name} failed: {_first_line(failure)}"
            results.append(CPUStress(node=node.name, node_id=node.node_id, threads=threads, error=error))
    return results


def run_stress(
    seconds: float, gpu_fraction: float, slow_ratio: float, nodes: Sequence[str] | None = None
) -> StressReport:
    """Both phases on the connected Ray cluster, GPUs first (so the CPU load does not slow their feeding)."""
    state = AllocatorClient().vram_state()
    known = ray_nodes()
    selected = select_names(nodes, state, known)
    targets = gpu_targets(state, known, gpu_fraction, selected)
    log.info("stress: %d GPU(s), %d to run", len(targets), sum(t.skip is None for t in targets))
    gpus = run_gpu_phase(targets, seconds)
    cpu_nodes = [n for n in known if n.cpus > 0 and _wanted(selected, *n.aliases)]
    cpus = run_cpu_phase(cpu_nodes, seconds)
    return build_report(gpus, cpus, seconds, gpu_fraction, slow_ratio)
