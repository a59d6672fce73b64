"""Placement planning: models × replicas → GPU slots, or a precise reason why not.

A pure function of the inventory, the existing reservations and the model specs — no Ray,
no NVML, no I/O — so it can be tested exhaustively and benchmarked.

Rules:
- capacity is per GPU: a GPU's room is its total minus memory used by processes ray-vram
  does not manage minus every reservation on it (budget + the model's overhead, `capacity`);
- existing reservations never move; those of removed models, of a changed budget, or beyond a
  lowered replica count are listed for release (highest replica numbers first); with
  `keep_others`, the models planned are some of the cluster's, not all of it (one Serve
  application beside others): reservations of the models not planned keep their room;
- fixed-count replicas are placed first, each on the fullest GPU that still holds it (best
  fit); two orders are tried — round-robin largest first (big holes for big replicas), and one
  replica per model then smallest first (more replicas when not all fit) — and the one placing
  more replicas wins;
- `max_replicas` models then fill what is left, one replica per model per round;
- ties break on (node, index), so the same input always gives the same plan.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import capacity
from .config import ModelSpec, PlacementSettings, SleepPolicy, format_gib, sleep_policy
from .contract import GPUPlan, Plan, Reservation, Unplaced
from .inventory import GPUInfo, Inventory

#: The models a plan is made of live in `contract` (they cross the allocator's boundary).
__all__ = ["GPUPlan", "Plan", "Reservation", "Unplaced", "plan", "replica_id_for", "replica_number"]


@dataclass
class _Slot:
    gpu: GPUInfo
    free: int
    reserved: int
    unmanaged: int
    replicas: list[str] = field(default_factory=list)
    fixed: int = 0  # held by replicas that never sleep: what a wake can never evict
    sleeper_demand: int = 0  # whole reservations of the replicas here that sleep

    @property
    def wake_room(self) -> int:
        """What one replica can have here once every replica that sleeps is stopped."""
        return self.gpu.total_bytes - self.unmanaged - self.fixed

    @property
    def order(self) -> tuple[str, int]:
        return (self.gpu.node, self.gpu.index)


_REPLICA_NUMBER = re.compile(r"-(\d+)$")


def replica_number(replica_id: str) -> int:
    match = _REPLICA_NUMBER.search(replica_id)
    return int(match.group(1)) if match else -1


def replica_id_for(model_id: str, number: int) -> str:
    return f"{model_id}-{number}"


def _eligible(spec: ModelSpec, slot: _Slot) -> bool:
    return spec.gpu_type is None or spec.gpu_type.lower() in slot.gpu.name.lower()


def plan(
    inventory: Inventory,
    models: Sequence[ModelSpec],
    existing: Iterable[Reservation] = (),
    settings: PlacementSettings | None = None,
    managed_pids: frozenset[int] = frozenset(),
    excluded_nodes: frozenset[str] = frozenset(),
    keep_others: bool = False,
    overheads: Mapping[str, int] | None = None,
    weights_bytes: Mapping[str, int] | None = None,
) -> Plan:
    """Place every requested replica that fits; explain the rest.

    `overheads`: each model's overhead in bytes, as its caller resolved it (`capacity.resolve_overhead`,
    from the model's files); a model missing there gets its own `overhead_gb`, the cluster's setting
    or the default.

    `excluded_nodes` (stale or draining nodes) keep their reservations but take no new ones.
    `weights_bytes`: each model's weights, where known (the host RAM a level-1 sleeper takes).

    Models that sleep (`config.sleep_policy`) get sleep terms on each reservation; their replicas
    beyond the room awake are placed stopped on a GPU where they could wake.

    `keep_others`: reservations of models not in `models` are someone else's (another application's),
    taken as used where they are and listed neither as kept nor for release; by default `models` is
    the whole desired state and such reservations are listed for release.
    """
    settings = settings or PlacementSettings()
    specs = {spec.model_id: spec for spec in models}
    weights = weights_bytes or {}
    sources = {node.node: node.source for node in inventory.nodes}
    given = overheads or {}
    overhead = {
        model_id: given[model_id] if model_id in given else capacity.resolve_overhead(spec, settings).bytes
        for model_id, spec in specs.items()
    }

    slots = {
        gpu.uuid: _Slot(gpu=gpu, free=0, reserved=0, unmanaged=gpu.unmanaged_bytes(managed_pids))
        for gpu in sorted(inventory.gpus, key=lambda g: (g.node, g.index))
    }
    policies = {model_id: sleep_policy(spec, settings) for model_id, spec in specs.items()}
    kept, release, others = _split_existing(existing, specs, slots, keep_others, policies)
    for reservation in [*kept, *others]:
        slot = slots[reservation.gpu_uuid]
        held = reservation.overhead_bytes
        if held is None:
            held = overhead.get(reservation.model_id, capacity.placement_overhead_bytes(settings))
        footprint = capacity.footprint_bytes(
            reservation.state, reservation.bytes, held, reservation.sleep, settling=reservation.settling
        )
        slot.reserved += footprint
        if reservation.sleep is None:
            slot.fixed += footprint
        else:
            slot.sleeper_demand += capacity.reservation_bytes(reservation.bytes, held)
        slot.replicas.append(reservation.replica_id)
    for slot in slots.values():
        slot.free = slot.gpu.total_bytes - slot.unmanaged - slot.reserved

    open_slots = [s for s in slots.values() if s.gpu.healthy and s.gpu.node not in excluded_nodes]
    taken_numbers: dict[str, set[int]] = {model_id: set() for model_id in specs}
    counts = dict.fromkeys(specs, 0)
    for reservation in kept:
        taken_numbers[reservation.model_id].add(replica_number(reservation.replica_id))
        counts[reservation.model_id] += 1

    needs = {
        model_id: capacity.reservation_bytes(spec.vram_bytes, overhead[model_id]) for model_id, spec in specs.items()
    }
    fixed = [s for s in specs.values() if not s.max_replicas]
    pending = {s.model_id: max(0, s.replicas - counts[s.model_id]) for s in fixed}
    # Fixed-count replicas: run each strategy on a scratch packer and keep the one that places
    # the most (the first on a tie), so a shortage costs as few replicas as possible. Models that
    # never sleep go first (they cannot wait stopped), then those that sleep, awake while room lasts.
    packer = _Packer(open_slots, specs, needs)
    for group in ([s for s in fixed if policies[s.model_id] is None], [s for s in fixed if policies[s.model_id]]):
        wanted = {s.model_id: pending[s.model_id] for s in group}
        if any(wanted.values()):
            packer = _best_packing(packer, group, wanted)
    # max_replicas models then fill what is left, one replica per model per round, largest first.
    active = sorted((s for s in specs.values() if s.max_replicas), key=lambda s: (-s.vram_bytes, s.model_id))
    while active:
        active = [spec for spec in active if packer.place(spec.model_id)]

    new: list[Reservation] = []
    next_number = dict.fromkeys(specs, 0)  # numbers are only taken during a plan: scan forward once

    def next_free_number(model_id: str) -> int:
        number = next_number[model_id]
        while number in taken_numbers[model_id]:
            number += 1
        taken_numbers[model_id].add(number)
        next_number[model_id] = number + 1
        return number

    def new_reservation(model_id: str, number: int, slot: _Slot, state: capacity.ReplicaLife) -> Reservation:
        replica_id = replica_id_for(model_id, number)
        slot.replicas.append(replica_id)
        budget = specs[model_id].vram_bytes
        host_memory = sources.get(slot.gpu.node) == "host-memory"
        terms = capacity.sleep_terms(
            policies[model_id], budget, overhead[model_id], host_memory=host_memory, weights_bytes=weights.get(model_id)
        )
        return Reservation.model_construct(
            replica_id=replica_id,
            model_id=model_id,
            node=slot.gpu.node,
            gpu_uuid=slot.gpu.uuid,
            gpu_index=slot.gpu.index,
            bytes=budget,
            overhead_bytes=overhead[model_id],
            cap_bytes=capacity.cap_bytes(budget, overhead[model_id], slot.gpu.total_bytes),
            state=state,
            sleep=terms,
            asleep_level=None,
            settling=False,
        )

    for model_id, uuid in packer.placements:
        number = next_free_number(model_id)
        slot = slots[uuid]
        slot.free -= needs[model_id]
        slot.reserved += needs[model_id]
        if policies[model_id] is None:
            slot.fixed += needs[model_id]
        else:
            slot.sleeper_demand += needs[model_id]
        counts[model_id] += 1
        new.append(new_reservation(model_id, number, slot, "awake"))

    # Replicas of models that sleep, beyond the room awake: placed stopped where they could wake
    # (evicting every sleeper), least contended GPU first; their first request starts them.
    for spec in _largest_first(fixed):
        model_id = spec.model_id
        if policies[model_id] is None:
            continue
        for _ in range(max(0, spec.replicas - counts[model_id])):
            fits = [s for s in open_slots if _eligible(spec, s) and s.wake_room >= needs[model_id]]
            if not fits:
                break
            slot = min(fits, key=lambda s: (-(s.wake_room - s.sleeper_demand), *s.order))
            slot.sleeper_demand += needs[model_id]
            counts[model_id] += 1
            new.append(new_reservation(model_id, next_free_number(model_id), slot, "stopped"))

    missing: dict[str, int] = {}
    for spec in specs.values():
        if spec.max_replicas and counts[spec.model_id] == 0:
            missing[spec.model_id] = 1
        elif not spec.max_replicas and counts[spec.model_id] < spec.replicas:
            missing[spec.model_id] = spec.replicas - counts[spec.model_id]

    unplaced = [
        _explain(specs[model_id], count, overhead[model_id], open_slots, slots.values(), excluded_nodes)
        for model_id, count in sorted(missing.items())
    ]
    gpus = [
        GPUPlan(
            node=s.gpu.node,
            index=s.gpu.index,
            uuid=s.gpu.uuid,
            name=s.gpu.name,
            total_bytes=s.gpu.total_bytes,
            unmanaged_bytes=s.unmanaged,
            reserved_bytes=s.reserved,
            free_bytes=s.free,
            replicas=sorted(s.replicas, key=lambda r: (_REPLICA_NUMBER.sub("", r), replica_number(r))),
        )
        for s in slots.values()
    ]
    return Plan(kept=kept, new=new, release=release, unplaced=unplaced, gpus=gpus)


class _Packer:
    """Best fit over open GPUs, indexed: per GPU-type constraint, GPUs sorted by (free, node, index),
    so each placement is a bisection instead of a scan of every GPU."""

    def __init__(self, open_slots: Sequence[_Slot], specs: dict[str, ModelSpec], needs: dict[str, int]):
        self.needs = needs
        self.free = {s.gpu.uuid: s.free for s in open_slots}
        self.order = {s.gpu.uuid: s.order for s in open_slots}
        self.group_of = {model_id: (spec.gpu_type or "").lower() for model_id, spec in specs.items()}
        self.groups: dict[str, list[tuple[int, str, int, str]]] = {}
        self.member_of: dict[str, list[str]] = {s.gpu.uuid: [] for s in open_slots}
        for key in sorted(set(self.group_of.values())):
            members = [s for s in open_slots if key in s.gpu.name.lower()]
            self.groups[key] = sorted(self._key(s.gpu.uuid) for s in members)
            for s in members:
                self.member_of[s.gpu.uuid].append(key)
        self.placements: list[tuple[str, str]] = []

    def copy(self) -> _Packer:
        """An independent packer in the same state (a strategy's scratch copy)."""
        twin = object.__new__(_Packer)
        twin.needs, twin.order, twin.group_of, twin.member_of = self.needs, self.order, self.group_of, self.member_of
        twin.free = dict(self.free)
        twin.groups = {key: list(group) for key, group in self.groups.items()}
        twin.placements = list(self.placements)
        return twin

    def _key(self, uuid: str) -> tuple[int, str, int, str]:
        return (self.free[uuid], *self.order[uuid], uuid)

    def eligible(self, model_id: str, uuid: str) -> bool:
        return self.group_of[model_id] in self.member_of[uuid]

    def place(self, model_id: str) -> bool:
        """Put one replica on the fullest eligible GPU that holds it; False if none does."""
        index = self.groups[self.group_of[model_id]]
        position = bisect.bisect_left(index, (self.needs[model_id],))
        if position == len(index):
            return False
        self.put(model_id, index[position][3])
        return True

    def put(self, model_id: str, uuid: str) -> None:
        """Put one replica on this GPU (the caller checked that it fits)."""
        for key in self.member_of[uuid]:
            group = self.groups[key]
            del group[bisect.bisect_left(group, self._key(uuid))]
        self.free[uuid] -= self.needs[model_id]
        for key in self.member_of[uuid]:
            bisect.insort(self.groups[key], self._key(uuid))
        self.placements.append((model_id, uuid))


def _best_packing(base: _Packer, group: Sequence[ModelSpec], pending: dict[str, int]) -> _Packer:
    """`base` with `group`'s pending replicas placed by the strategy that places the most."""
    best: _Packer | None = None
    for strategy in _STRATEGIES:
        packer = base.copy()
        strategy(packer, group, pending)
        if best is None or len(packer.placements) > len(best.placements):
            best = packer
        if len(best.placements) - len(base.placements) == sum(pending.values()):
            break  # everything placed: no strategy can do better
    assert best is not None
    return best


def _largest_first(fixed: Sequence[ModelSpec]) -> list[ModelSpec]:
    return sorted(fixed, key=lambda s: (-s.vram_bytes, s.model_id))


def _round_robin(packer: _Packer, fixed: Sequence[ModelSpec], pending: dict[str, int]) -> None:
    """Round-robin, largest model first in each round: big replicas get the big holes, and a
    shortfall spreads over models instead of starving one entirely."""
    left = dict(pending)
    order = _largest_first(fixed)
    while any(left.values()):
        for spec in order:
            if left[spec.model_id]:
                left[spec.model_id] -= 1
                packer.place(spec.model_id)


def _one_each(packer: _Packer, fixed: Sequence[ModelSpec], pending: dict[str, int]) -> dict[str, int]:
    """One replica of every model first (largest first), so every model runs; returns what is left."""
    left = dict(pending)
    for spec in _largest_first(fixed):
        if left[spec.model_id]:
            left[spec.model_id] -= 1
            packer.place(spec.model_id)
    return left


def _smallest_first(packer: _Packer, fixed: Sequence[ModelSpec], pending: dict[str, int]) -> None:
    """Every model once, then the rest smallest first: when not everything fits, small replicas
    make more replicas fit."""
    left = _one_each(packer, fixed, pending)
    for spec in reversed(_largest_first(fixed)):
        for _ in range(left[spec.model_id]):
            if not packer.place(spec.model_id):
                break


def _fill_gpus(packer: _Packer, fixed: Sequence[ModelSpec], pending: dict[str, int]) -> None:
    """Every model once, then GPU by GPU (least room first): as many replicas as fit, taking the
    smallest, then each swapped for a bigger one while the slack allows — tight GPUs, max count."""
    left = _one_each(packer, fixed, pending)
    ascending = [s.model_id for s in reversed(_largest_first(fixed))]
    for uuid in sorted(packer.free, key=lambda u: (packer.free[u], *packer.order[u])):
        sizes = [m for m in ascending if left[m] and packer.eligible(m, uuid)]
        if not sizes:
            continue
        room = packer.free[uuid]
        taken = dict.fromkeys(sizes, 0)
        for model_id in sizes:
            count = min(left[model_id], room // packer.needs[model_id])
            taken[model_id] += count
            room -= count * packer.needs[model_id]
        swapped = True
        while swapped:  # each swap uses more of the GPU, so this ends
            swapped = False
            for small in sizes:
                if not taken[small]:
                    continue
                for big in reversed(sizes):
                    grow = packer.needs[big] - packer.needs[small]
                    if grow <= 0 or grow > room or taken[big] >= left[big]:
                        continue
                    taken[small] -= 1
                    taken[big] += 1
                    room -= grow
                    swapped = True
                    break
        for model_id in reversed(sizes):
            for _ in range(taken[model_id]):
                packer.put(model_id, uuid)
            left[model_id] -= taken[model_id]


_STRATEGIES = (_round_robin, _smallest_first, _fill_gpus)


def _split_existing(
    existing: Iterable[Reservation],
    specs: dict[str, ModelSpec],
    slots: dict[str, _Slot],
    keep_others: bool,
    policies: Mapping[str, SleepPolicy | None],
) -> tuple[list[Reservation], list[Reservation], list[Reservation]]:
    """Existing reservations to keep in place, those to release (highest numbers first), and
    (`keep_others`) those of models not planned that hold room on a known GPU. A replica asleep or
    stopped whose model no longer sleeps is released (placed again awake)."""
    kept: list[Reservation] = []
    release: list[Reservation] = []
    others: list[Reservation] = []
    by_model: dict[str, list[Reservation]] = {}
    for reservation in sorted(existing, key=lambda r: (r.model_id, replica_number(r.replica_id))):
        spec = specs.get(reservation.model_id)
        if spec is None and keep_others:
            if reservation.gpu_uuid in slots:
                others.append(reservation)
        elif (
            spec is None
            or reservation.bytes != spec.vram_bytes
            or reservation.gpu_uuid not in slots
            or (reservation.state != "awake" and policies.get(reservation.model_id) is None)
        ):
            release.append(reservation)
        else:
            by_model.setdefault(reservation.model_id, []).append(reservation)
    for model_id, reservations in by_model.items():
        spec = specs[model_id]
        limit = len(reservations) if spec.max_replicas else spec.replicas
        kept.extend(reservations[:limit])
        release.extend(reversed(reservations[limit:]))
    return kept, release, others


def _explain(
    spec: ModelSpec,
    count: int,
    overhead: int,
    open_slots: list[_Slot],
    all_slots: Iterable[_Slot],
    excluded_nodes: frozenset[str],
) -> Unplaced:
    need = capacity.reservation_bytes(spec.vram_bytes, overhead)
    need_text = f"{format_gib(need)} per replica ({spec.vram_gb:g} GiB budget + {format_gib(overhead)} overhead)"
    eligible = [s for s in open_slots if _eligible(spec, s)]
    all_list = list(all_slots)
    matching = [s for s in all_list if _eligible(spec, s)]
    largest = min(eligible, key=lambda s: (-s.free, s.gpu.node, s.gpu.index), default=None)
    largest_free = max(0, largest.free) if largest else 0
    where = largest.gpu.label if largest else None
    biggest = min(matching, key=lambda s: (-s.gpu.total_bytes, s.gpu.node, s.gpu.index), default=None)
    biggest_text = (
        f"{biggest.gpu.name}, {format_gib(biggest.gpu.total_bytes)} on {biggest.gpu.label}" if biggest else None
    )
    too_big = biggest is not None and need > biggest.gpu.total_bytes
    what = f"{count} replica{'s' if count > 1 else ''} of model {spec.model_id}"
    needs = "needs" if count == 1 else "need"
    if not all_list:
        reason = f"{what} cannot be placed: the inventory has no GPUs"
    elif not matching:
        names = sorted({s.gpu.name for s in all_list})
        reason = f"{what} cannot be placed: no GPU matches gpu_type {spec.gpu_type!r} (GPUs: {', '.join(names)})"
    elif too_big:
        assert biggest is not None
        reason = (
            f"{what} {needs} {need_text}, more than any GPU holds: the largest is "
            f"{format_gib(biggest.gpu.total_bytes)} ({biggest.gpu.name}) on {biggest.gpu.label}; "
            "it needs a bigger GPU, not a free one"
        )
    elif not eligible:
        reason = (
            f"{what} cannot be placed: every matching GPU is unhealthy or on a stale node "
            f"({', '.join(sorted(excluded_nodes)) or 'none stale'})"
        )
    else:
        reason = (
            f"{what} {needs} {need_text}; the largest free slot is {format_gib(largest_free)} on {where}"
            f" (short by {format_gib(need - largest_free)})"
        )
    return Unplaced(
        model_id=spec.model_id,
        count=count,
        need_bytes=need,
        largest_free_bytes=largest_free,
        largest_free_gpu=where,
        too_big=too_big,
        largest_gpu=biggest_text,
        reason=reason,
    )
