"""PruningPlan: what a pruning pass decided, in a form that can be saved, read and re-applied.

A plan lists, per channel group (named after its first producer), the kept units and how
each pruned unit is folded into a kept one (``merges``), the bias compensation of each pruned
feature (``offsets``: the mean a consumer loses, ``E[a_j - c a_i]``), and, in calibrated
mode, per mixing consumer the least-squares reconstruction ``x ~= R x_kept + mu`` of the
features it read in the dense model from the kept ones it reads now (``refits``, see
:mod:`tvm_qmfrg.reconstruction`; saved as base64 float32).
Frozen groups carry the reason. FLOPs and parameter counts before and after are measured on
the modules, not estimated.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ModelError
from .report import format_table, write_json

PLAN_VERSION = 2


@dataclass
class Refit:
    """``x ~= r @ x_kept + mu`` at one consumer (a binding name): ``r`` is features x kept."""

    consumer: str
    r: np.ndarray
    mu: np.ndarray

    def to_dict(self) -> dict:
        r = np.ascontiguousarray(self.r, dtype="<f4")
        return {
            "consumer": self.consumer,
            "shape": list(r.shape),
            "r": base64.b64encode(r.tobytes()).decode("ascii"),
            "mu": [float(v) for v in self.mu],
        }

    @classmethod
    def from_dict(cls, data: dict, at: str) -> Refit:
        try:
            shape = tuple(int(v) for v in data["shape"])
            r = np.frombuffer(base64.b64decode(data["r"]), dtype="<f4").reshape(shape)
            return cls(str(data["consumer"]), r.astype(np.float32), np.asarray(data["mu"], float))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{at}: malformed 'refits' entry ({exc})") from exc


@dataclass
class GroupPlan:
    name: str
    producers: list[str]
    channels: int
    unit: int
    kept: list[int]
    merges: list[tuple[int, int, float]] = field(default_factory=list)
    offsets: dict[int, float] = field(default_factory=dict)
    refits: list[Refit] = field(default_factory=list)  # calibrated: one per mixing consumer

    @property
    def units(self) -> int:
        return self.channels // self.unit

    @property
    def kept_channels(self) -> int:
        return len(self.kept) * self.unit

    def validate(self, where: str) -> None:
        """Raise :class:`ModelError` naming ``where``, the group and the field unless the
        decisions are consistent: kept units distinct, in range and not empty; every merge
        from a pruned unit into a kept one with a finite scale; offsets and the refit on
        pruned features."""
        at = f"{where}: group '{self.name}'"
        if self.channels < 1 or self.unit < 1 or self.channels % self.unit:
            raise ModelError(f"{at}: 'channels' {self.channels} and 'unit' {self.unit} disagree")
        units = self.units
        if not self.kept:
            raise ModelError(f"{at}: 'kept' is empty (a group keeps at least one unit)")
        bad = [k for k in self.kept if not 0 <= k < units]
        if bad:
            raise ModelError(f"{at}: 'kept' index {bad[0]} is outside 0..{units - 1}")
        if len(set(self.kept)) != len(self.kept):
            raise ModelError(f"{at}: 'kept' repeats a unit")
        kept = set(self.kept)
        for j, i, c in self.merges:
            if not 0 <= j < units or j in kept:
                raise ModelError(f"{at}: 'merges' moves unit {j}, which is not a pruned unit")
            if i not in kept:
                raise ModelError(f"{at}: 'merges' folds unit {j} into {i}, which is not kept")
            if not math.isfinite(c):
                raise ModelError(f"{at}: 'merges' scale of unit {j} is {c}")
        for f, mu in self.offsets.items():
            if not 0 <= f < self.channels or f // self.unit in kept:
                raise ModelError(f"{at}: 'offsets' names feature {f}, which is not pruned")
            if not math.isfinite(mu):
                raise ModelError(f"{at}: 'offsets' of feature {f} is {mu}")
        for rf in self.refits:
            want = (self.channels, self.kept_channels)
            if tuple(rf.r.shape) != want or np.shape(rf.mu) != (self.channels,):
                raise ModelError(
                    f"{at}: refit of consumer '{rf.consumer}' must be {want[0]} x {want[1]} "
                    f"with {want[0]} means, got {'x'.join(map(str, np.shape(rf.r)))}"
                )
            if not (np.isfinite(rf.r).all() and np.isfinite(rf.mu).all()):
                raise ModelError(f"{at}: refit of consumer '{rf.consumer}' is not finite")


@dataclass
class FrozenGroup:
    name: str
    channels: int
    reason: str


@dataclass
class PruningPlan:
    model: str
    criterion: str
    options: dict
    groups: list[GroupPlan]
    frozen: list[FrozenGroup]
    flops_before: float = 0.0
    flops_after: float = 0.0
    params_before: int = 0
    params_after: int = 0
    op_flops: float = 0.0  # conv/matmul FLOPs the channel analysis saw
    prunable_flops: float = 0.0  # of those, in ops that read or make prunable channels
    version: int = PLAN_VERSION

    @property
    def coverage(self) -> float:
        """Share of conv/matmul FLOPs in ops whose channels the pass may prune."""
        return self.prunable_flops / self.op_flops if self.op_flops else 0.0

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def to_dict(self) -> dict:
        out = asdict(self, dict_factory=_no_refits)
        for g, gp in zip(out["groups"], self.groups):
            g["refits"] = [rf.to_dict() for rf in gp.refits]
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> PruningPlan:
        if not isinstance(data, dict):
            raise ModelError(f"{where}: a pruning plan is a JSON object, not {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise ModelError(f"plan version {data.get('version')} is not {PLAN_VERSION}")
        groups = [
            GroupPlan(
                name=g["name"],
                producers=list(g["producers"]),
                channels=int(g["channels"]),
                unit=int(g["unit"]),
                kept=[int(k) for k in g["kept"]],
                merges=[(int(a), int(b), float(c)) for a, b, c in g["merges"]],
                offsets={int(k): float(v) for k, v in g["offsets"].items()},
                refits=[
                    Refit.from_dict(r, f"{where}: group '{g['name']}'") for r in g.get("refits", [])
                ],
            )
            for g in data["groups"]
        ]
        for g in groups:
            g.validate(where)
        frozen = [FrozenGroup(**f) for f in data["frozen"]]
        fields = {
            k: data[k]
            for k in (
                "model",
                "criterion",
                "options",
                "flops_before",
                "flops_after",
                "params_before",
                "params_after",
            )
        }
        for k in ("op_flops", "prunable_flops"):
            if k in data:
                fields[k] = float(data[k])
        return cls(groups=groups, frozen=frozen, **fields)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot read pruning plan ({exc})") from exc
        try:
            return cls.from_dict(data, where=str(path))
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ModelError(
                f"{path}: malformed pruning plan ({type(exc).__name__}: {exc})"
            ) from exc

    def table(self) -> str:
        """Per-group channels before/after, then totals and frozen groups, as text."""
        rows = [
            [
                g.name,
                len(g.producers),
                g.channels,
                g.kept_channels,
                len(g.merges),
                f"{1 - g.kept_channels / g.channels:.0%}",
            ]
            for g in self.groups
        ]
        text = format_table(["group", "producers", "channels", "kept", "merged", "pruned"], rows)
        lines = [
            text,
            "",
            f"FLOPs  {self.flops_before:,.0f} -> {self.flops_after:,.0f} "
            f"({self.flops_reduction:.1%} fewer)",
            f"params {self.params_before:,} -> {self.params_after:,} "
            + (
                f"({1 - self.params_after / self.params_before:.1%} fewer)"
                if self.params_before
                else "(n/a)"
            ),
        ]
        if self.op_flops:
            lines.append(
                f"prunable: {self.coverage:.1%} of conv/matmul FLOPs are in ops of the "
                f"{len(self.groups)} prunable groups"
            )
        if self.frozen:
            lines += ["", f"frozen groups ({len(self.frozen)}), by reason:"]
            by_reason: dict[str, list[FrozenGroup]] = {}
            for f in self.frozen:
                by_reason.setdefault(f.reason.split(": ", 1)[-1], []).append(f)
            for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {reason} ({len(items)}):")
                lines += [f"    {f.name} ({f.channels} channels): {f.reason}" for f in items]
        return "\n".join(lines)


def _no_refits(items) -> dict:
    """``asdict`` factory that leaves refits (numpy arrays) to :meth:`Refit.to_dict`."""
    return {k: ([] if k == "refits" else v) for k, v in items}
