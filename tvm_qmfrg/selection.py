"""Choosing which units of which groups go, for a sparsity, FLOPs or lossless target.

All three modes use the criterion's :class:`~tvm_qmfrg.criteria.Scorer` lazily: a unit's
cost is computed once and recomputed only when the partner it would merge into has gone
itself (its cost can only grow then), so the greedy order is exact at every step.

- ``sparsity``: every prunable group loses ``floor(sparsity * units)`` units, cheapest first.
- ``flops_reduction``: the model's conv/matmul FLOPs drop by the requested fraction, with
  one of two allocations across groups. ``uniform`` (default): the smallest common fraction
  of every group that reaches the target, then units given back (most-pruned group first)
  while the target still holds, and, when that still overshoots by more than half a point
  (small models of few narrow groups), single units swapped between groups, never more
  than one unit beyond the common fraction; the criterion only decides *which* units go,
  so criteria are compared at equal layer widths. ``global``: one ranking across all groups
  (costs on one normalized scale), removing the cheapest unit anywhere; allocation falls out of the
  criterion. On the shipped digits ResNet ``global`` over-prunes some layers for most
  criteria (``tvm-qmfrg eval`` chooses between the two on the validation split).
- ``epsilon`` (lossless): merges only, of units within ``epsilon`` radians of an alive
  partner whose merge is exact through the activation.

``min_units`` and ``round_to`` (kept channel counts rounded up to a multiple, for SIMD and
tensor-core friendly shapes) hold in every mode.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .criteria import ChannelGroup, Scorer, merge_is_exact
from .errors import OptionError

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class AxisCost:
    """One shrinking axis of an op: ``fixed`` positions no group owns, plus group parts."""

    fixed: int
    total: int
    parts: tuple[tuple[int, float], ...]  # (group index, positions per unit)

    def kept(self, kept_units: Sequence[int]) -> float:
        return self.fixed + sum(kept_units[g] * ppu for g, ppu in self.parts)


@dataclass(frozen=True)
class FlopsModel:
    """``flops = sum_op flops_op * prod_axis kept(axis) / total(axis)``."""

    ops: tuple[tuple[float, tuple[AxisCost, ...]], ...]

    @property
    def total(self) -> float:
        return float(sum(f for f, _ in self.ops))

    def op_flops(self, i: int, kept_units: Sequence[int]) -> float:
        flops, axes = self.ops[i]
        for ax in axes:
            flops *= ax.kept(kept_units) / ax.total
        return flops

    def flops(self, kept_units: Sequence[int]) -> float:
        return float(sum(self.op_flops(i, kept_units) for i in range(len(self.ops))))

    def ops_of(self, n_groups: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(n_groups)]
        for i, (_, axes) in enumerate(self.ops):
            for g in sorted({g for ax in axes for g, _ in ax.parts}):
                out[g].append(i)
        return out


@dataclass
class Selection:
    """Outcome for one group: alive units and the merges of the pruned ones."""

    alive: np.ndarray
    order: list[int] = field(default_factory=list)  # pruned units, in pruning order
    merges: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return int(self.alive.sum())

    def prune(self, j: int, partner: int, scale: float) -> None:
        self.alive[j] = False
        self.order.append(j)
        if partner >= 0:
            self.merges[j] = (partner, scale)

    def restore_last(self) -> None:
        j = self.order.pop()
        self.alive[j] = True
        self.merges.pop(j, None)


def _step(units: int, unit_width: int, round_to: int) -> int:
    """Kept units must be a multiple of this for ``kept * unit_width % round_to == 0``."""
    return max(1, round_to // math.gcd(round_to, unit_width))


def _round_up(sel: Selection, step: int, units: int) -> None:
    while sel.kept % step and sel.kept < units and sel.order:
        sel.restore_last()


class _Heap:
    """Lazy min-heap of ``(cost, group, unit, partner, scale)``."""

    def __init__(self):
        self.items: list[tuple[float, int, int, int, float]] = []

    def push(self, g: int, j: int, best: tuple[float, int, float]) -> None:
        cost, partner, scale = best
        heapq.heappush(self.items, (cost, g, j, partner, scale))

    def pop(self):
        return heapq.heappop(self.items) if self.items else None


def select(
    groups: Sequence[ChannelGroup],
    scorers: Sequence[Scorer],
    unit_widths: Sequence[int],
    *,
    sparsity: float | None = None,
    flops_reduction: float | None = None,
    epsilon: float | None = None,
    flops_model: FlopsModel | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    allocation: str = "uniform",
) -> list[Selection]:
    """Run one of the three modes (exactly one of sparsity/flops_reduction/epsilon)."""
    check_options(sparsity, flops_reduction, epsilon, min_channels, round_to)
    if allocation not in ALLOCATIONS:
        raise OptionError(
            f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})"
        )
    mins = [max(1, math.ceil(min_channels / w)) for w in unit_widths]
    steps = [_step(g.units, w, round_to) for g, w in zip(groups, unit_widths)]
    if sparsity is not None:
        return [
            _per_group(g, s, max(m, g.units - math.floor(sparsity * g.units)), st)
            for g, s, m, st in zip(groups, scorers, mins, steps)
        ]
    if epsilon is not None:
        return [_lossless(g, s, epsilon, m) for g, s, m in zip(groups, scorers, mins)]
    if flops_model is None:
        raise OptionError("flops_reduction needs a FLOPs model")
    if allocation == "uniform":
        return _uniform_flops(groups, scorers, flops_reduction, flops_model, mins, steps)
    return _by_flops(groups, scorers, flops_reduction, flops_model, mins, steps)


def check_options(sparsity, flops_reduction, epsilon, min_channels: int, round_to: int) -> None:
    """Raise :class:`OptionError` unless exactly one target is given and all are in range."""
    if sum(x is not None for x in (sparsity, flops_reduction, epsilon)) != 1:
        raise OptionError("give exactly one of sparsity, flops_reduction, epsilon")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise OptionError(f"sparsity={sparsity} is outside [0, 1)")
    if flops_reduction is not None and not 0 <= flops_reduction < 1:
        raise OptionError(f"flops_reduction={flops_reduction} is outside [0, 1)")
    if epsilon is not None and not 0 <= epsilon <= np.pi / 2:
        raise OptionError(f"epsilon={epsilon} is outside [0, pi/2]")
    if min_channels < 1 or round_to < 1:
        raise OptionError(f"min_channels={min_channels} and round_to={round_to} must be >= 1")


def _per_group(group: ChannelGroup, scorer: Scorer, keep: int, step: int) -> Selection:
    sel = Selection(np.ones(group.units, dtype=bool))
    heap = _Heap()
    for j, best in enumerate(scorer.best_all(sel.alive)):
        heap.push(0, j, best)
    while sel.kept > keep and (item := heap.pop()) is not None:
        _, _, j, partner, scale = item
        if not sel.alive[j]:
            continue
        if partner >= 0 and not sel.alive[partner]:
            heap.push(0, j, scorer.best(j, sel.alive))
            continue
        sel.prune(j, partner, scale)
    _round_up(sel, step, group.units)
    return sel


def _lossless(group: ChannelGroup, scorer: Scorer, epsilon: float, min_units: int) -> Selection:
    removal = group.removal_costs() / scorer.scale
    sel = Selection(np.ones(group.units, dtype=bool))
    heap = _Heap()

    def angle_best(j: int):
        cost, partner, scale = scorer.best(j, sel.alive)
        if removal[j] == 0:
            return 0.0, -1, 0.0  # a dead unit: removing it changes nothing
        if partner < 0 or not merge_is_exact(group.merge, scale, max(epsilon, 1e-12)):
            return np.inf, -1, 0.0
        return float(np.arcsin(min(1.0, cost / removal[j]))), partner, scale

    for j in range(group.units):
        heap.push(0, j, angle_best(j))
    while sel.kept > min_units and (item := heap.pop()) is not None:
        angle, _, j, partner, scale = item
        if angle > epsilon:
            break
        if not sel.alive[j]:
            continue
        if partner >= 0 and not sel.alive[partner]:
            heap.push(0, j, angle_best(j))
            continue
        sel.prune(j, partner, scale)
    return sel


def _by_flops(groups, scorers, target, model: FlopsModel, mins, steps) -> list[Selection]:
    """Greedy to an internal target, rounded; the internal target is bisected so that the
    rounded result lands on the requested one."""
    total = model.total
    if total <= 0:
        raise OptionError("the model has no conv/matmul FLOPs to reduce")

    def attempt(internal: float) -> tuple[float, list[Selection]]:
        sels = _greedy_flops(groups, scorers, internal, model, mins)
        for g, (sel, step) in enumerate(zip(sels, steps)):
            _round_up(sel, step, groups[g].units)
        return 1.0 - model.flops([s.kept for s in sels]) / total, sels

    achieved, best = attempt(target)
    if achieved >= target - 0.005 or all(s == 1 for s in steps):
        return best
    best_gap = abs(achieved - target)
    lo, hi = target, 0.999
    for _ in range(12):
        mid = (lo + hi) / 2
        achieved, sels = attempt(mid)
        if abs(achieved - target) < best_gap:
            best, best_gap = sels, abs(achieved - target)
        if achieved < target:
            lo = mid
        else:
            hi = mid
        if best_gap <= 0.005:
            break
    return best


def _uniform_keep(groups, fraction: float, mins, steps) -> list[int]:
    keep = []
    for g, m, st in zip(groups, mins, steps):
        k = max(m, g.units - math.floor(fraction * g.units))
        keep.append(min(g.units, -(-k // st) * st))
    return keep


def _uniform_flops(groups, scorers, target, model: FlopsModel, mins, steps) -> list[Selection]:
    """One pruning fraction for every group, the smallest whose FLOPs reach the target."""
    total = model.total
    if total <= 0:
        raise OptionError("the model has no conv/matmul FLOPs to reduce")

    def reduction(fraction: float) -> float:
        return 1.0 - model.flops(_uniform_keep(groups, fraction, mins, steps)) / total

    lo, hi = 0.0, 1.0 - 1e-9
    if reduction(hi) < target:
        lo = hi
    for _ in range(40):
        if reduction(lo) >= target:
            break
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid
    fraction = lo if reduction(lo) >= target else hi
    keep = _uniform_keep(groups, fraction, mins, steps)
    # no group loses more than one unit beyond the common fraction
    floor = [max(k - st, m) for k, st, m in zip(keep, steps, mins)]
    # the fraction moves in whole units per group: give back units, most-pruned group
    # first, while the target still holds, so the result lands on it rather than past it;
    # then swap units between groups (at most one unit beyond the common fraction) to land
    # closer still
    for _ in range(8 * len(groups) + 1):  # the reduction falls with every step: it ends
        _give_back(groups, keep, target, model, steps)
        if not _swap_towards(groups, keep, target, model, floor, steps):
            break
    return [_per_group(g, s, k, 1) for g, s, k in zip(groups, scorers, keep)]


def _give_back(groups, keep, target, model: FlopsModel, steps) -> None:
    """Give units back, most-pruned group first, while the target still holds (in place)."""
    total = model.total
    changed = True
    while changed:
        changed = False
        order = sorted(range(len(groups)), key=lambda g: keep[g] / groups[g].units)
        for g in order:
            if keep[g] + steps[g] > groups[g].units:
                continue
            keep[g] += steps[g]
            if 1.0 - model.flops(keep) / total >= target:
                changed = True
                break
            keep[g] -= steps[g]


SWAP_SLACK = 0.005  # overshoot of the FLOPs target above which single-unit swaps are tried


def _swap_towards(groups, keep, target, model: FlopsModel, floor, steps) -> bool:
    """One swap towards the target, if the reached reduction overshoots it by more than
    ``SWAP_SLACK``: give one unit back in group ``a`` and take one in group ``b`` (never
    below ``floor[b]``, one unit under the common fraction's width), the pair that lands
    closest while the target still holds. In place on ``keep``; whether a swap was made.

    Small models with few, narrow groups move in large FLOPs steps; a swap lands closer
    where giving back alone cannot."""
    total = model.total

    def reduction() -> float:
        return 1.0 - model.flops(keep) / total

    current = reduction()
    if current - target <= SWAP_SLACK:
        return False
    best, move = current, None
    for a, ga in enumerate(groups):
        if keep[a] + steps[a] > ga.units:
            continue
        keep[a] += steps[a]
        for b in range(len(groups)):
            if b == a or keep[b] - steps[b] < floor[b]:
                continue
            keep[b] -= steps[b]
            r = reduction()
            if target <= r < best - 1e-12:
                best, move = r, (a, b)
            keep[b] += steps[b]
        keep[a] -= steps[a]
    if move is None:
        return False
    keep[move[0]] += steps[move[0]]
    keep[move[1]] -= steps[move[1]]
    return True


def _greedy_flops(groups, scorers, target, model: FlopsModel, mins) -> list[Selection]:
    sels = [Selection(np.ones(g.units, dtype=bool)) for g in groups]
    kept = [g.units for g in groups]
    op_ids = model.ops_of(len(groups))
    op_now = {i: model.op_flops(i, kept) for i in range(len(model.ops))}
    flops = sum(op_now.values())
    goal = (1.0 - target) * model.total
    heap = _Heap()
    for g, scorer in enumerate(scorers):
        for j, best in enumerate(scorer.best_all(sels[g].alive)):
            heap.push(g, j, best)
    slack = 0.01 * model.total  # a coarse unit (a whole head) may not overshoot by more
    aside = []
    while flops > goal and (item := heap.pop()) is not None:
        _, g, j, partner, scale = item
        sel = sels[g]
        if not sel.alive[j] or kept[g] <= mins[g]:
            continue
        if partner >= 0 and not sel.alive[partner]:
            heap.push(g, j, scorers[g].best(j, sel.alive))
            continue
        kept[g] -= 1
        new = {i: model.op_flops(i, kept) for i in op_ids[g]}
        after = flops + sum(new[i] - op_now[i] for i in op_ids[g])
        if after < goal - slack:
            kept[g] += 1
            aside.append(item)
            continue
        sel.prune(j, partner, scale)
        flops = after
        op_now.update(new)
    for _, g, j, partner, scale in aside:  # nothing finer was left: accept the overshoot
        if flops <= goal:
            break
        if sels[g].alive[j] and kept[g] > mins[g] and (partner < 0 or sels[g].alive[partner]):
            sels[g].prune(j, partner, scale)
            kept[g] -= 1
            for i in op_ids[g]:
                new_i = model.op_flops(i, kept)
                flops += new_i - op_now[i]
                op_now[i] = new_i
    return sels


def resolve(sel: Selection) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Kept units and merges with every chain ``j -> i -> k`` composed onto a kept unit."""
    merges = []
    for j in sel.order:
        scale, target = 1.0, j
        seen = set()
        while not sel.alive[target] and target in sel.merges and target not in seen:
            seen.add(target)
            partner, s = sel.merges[target]
            scale *= s
            target = partner
        if sel.alive[target] and target != j:
            merges.append((j, target, scale))
    return [int(i) for i in np.flatnonzero(sel.alive)], merges
