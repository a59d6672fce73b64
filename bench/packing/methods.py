"""The four ways of placing an instance's replicas that the benchmark compares.

Every method sees the same need per replica (budget + per-replica overhead). A GPU is
overcommitted when memory used by other processes plus the needs of the replicas placed on it
exceed its total; only replicas on GPUs that are not overcommitted count as placed.

- planner: ray-vram's planner (`vram_scheduler.core.planner.plan`).
- ray_fractional: Ray's logical fractional GPUs. Each replica asks for `num_gpus = need / GPU size`,
  normalised per node (the node's mean GPU size: the best a user can do when GPUs differ between
  nodes), and Ray fits fractions into 1.0 per GPU, first node and first GPU that fits. It knows
  nothing of memory already used by other processes or of GPUs of different sizes in one node.
- node_sum: the original design's check: a replica goes to the first node whose free VRAM summed
  over its GPUs holds it, and lands on that node's GPU with the most room (its best case).
- optimum: an integer program (PuLP + CBC) maximising the number of replicas placed, per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulp

from vram_scheduler.core.config import ModelSpec
from vram_scheduler.core.inventory import GPUInfo
from vram_scheduler.core.planner import plan

from .instances import Instance


@dataclass
class Outcome:
    placed: int  # replicas on GPUs that are not overcommitted
    scheduled: int  # replicas the method believed it placed
    overcommitted_gpus: int
    seconds: float = 0.0
    note: str = ""
    assignment: dict[str, list[int]] = field(default_factory=dict, repr=False)  # GPU uuid → needs


def judge(instance: Instance, assignment: dict[str, list[int]], note: str = "") -> Outcome:
    """Count replicas per GPU, discounting every replica on an overcommitted GPU."""
    placed = scheduled = over = 0
    for gpu in instance.inventory.gpus:
        needs = assignment.get(gpu.uuid, [])
        scheduled += len(needs)
        if gpu.used_bytes + sum(needs) > gpu.total_bytes:
            over += 1
        else:
            placed += len(needs)
    return Outcome(placed=placed, scheduled=scheduled, overcommitted_gpus=over, note=note, assignment=assignment)


def _requests(instance: Instance) -> list[int]:
    """Replica needs in the order a deployment would ask for them: model by model, as listed."""
    return [instance.need(m) for m in instance.models for _ in range(m.replicas)]


def planner(instance: Instance) -> Outcome:
    result = plan(instance.inventory, instance.models, settings=instance.settings)
    needs = {m.model_id: instance.need(m) for m in instance.models}
    assignment: dict[str, list[int]] = {}
    for r in result.reservations:
        assignment.setdefault(r.gpu_uuid, []).append(needs[r.model_id])
    return judge(instance, assignment)


def ray_fractional(instance: Instance) -> Outcome:
    nodes = [(node, sum(g.total_bytes for g in node.gpus) / len(node.gpus)) for node in instance.inventory.nodes]
    left = {g.uuid: 1.0 for g in instance.inventory.gpus}
    assignment: dict[str, list[int]] = {}
    for need in _requests(instance):
        for node, gpu_size in nodes:
            fraction = need / gpu_size
            if fraction > 1:
                continue  # would need a whole-number GPU request; a replica spans one GPU here
            gpu = next((g for g in node.gpus if left[g.uuid] >= fraction - 1e-9), None)
            if gpu is not None:
                left[gpu.uuid] -= fraction
                assignment.setdefault(gpu.uuid, []).append(need)
                break
    return judge(instance, assignment)


def node_sum(instance: Instance) -> Outcome:
    room = {g.uuid: g.total_bytes - g.used_bytes for g in instance.inventory.gpus}
    assignment: dict[str, list[int]] = {}
    for need in _requests(instance):
        for node in instance.inventory.nodes:
            if sum(room[g.uuid] for g in node.gpus) >= need:
                gpu: GPUInfo = max(node.gpus, key=lambda g: (room[g.uuid], -g.index))
                room[gpu.uuid] -= need
                assignment.setdefault(gpu.uuid, []).append(need)
                break
    return judge(instance, assignment)


def optimum(instance: Instance, time_limit_s: float = 60) -> Outcome:
    # In MiB (needs rounded up, room down): byte-sized coefficients defeat the solver's tolerances.
    mib = 1024**2

    def need(m: ModelSpec) -> int:
        return -(-instance.need(m) // mib)

    def room(g: GPUInfo) -> int:
        return (g.total_bytes - g.used_bytes) // mib

    problem = pulp.LpProblem(f"packing_{instance.name}", pulp.LpMaximize)
    gpus = instance.inventory.gpus
    x = {
        (m.model_id, g.uuid): pulp.LpVariable(f"x_{i}_{j}", lowBound=0, upBound=m.replicas, cat="Integer")
        for i, m in enumerate(instance.models)
        for j, g in enumerate(gpus)
        if need(m) <= room(g)
    }
    problem += pulp.lpSum(x.values())
    for g in gpus:
        terms = [need(m) * x[m.model_id, g.uuid] for m in instance.models if (m.model_id, g.uuid) in x]
        if terms:
            problem += pulp.lpSum(terms) <= room(g)
    for m in instance.models:
        terms = [x[m.model_id, g.uuid] for g in gpus if (m.model_id, g.uuid) in x]
        if terms:
            problem += pulp.lpSum(terms) <= m.replicas
    problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    status = pulp.LpSolution[problem.sol_status]  # "Optimal Solution Found" only when proven
    assignment: dict[str, list[int]] = {}
    for m in instance.models:
        for g in gpus:
            if (m.model_id, g.uuid) in x:
                count = round(x[m.model_id, g.uuid].value() or 0)
                assignment.setdefault(g.uuid, []).extend([instance.need(m)] * count)
    outcome = judge(instance, assignment, note=status)
    if outcome.overcommitted_gpus:
        raise AssertionError(f"{instance.name}: the integer program overcommitted a GPU")
    return outcome


METHODS = {"planner": planner, "ray_fractional": ray_fractional, "node_sum": node_sum, "optimum": optimum}
