"""PruneOptions: every choice of the pruning pass, validated once.

``prune_module(mod, PruneOptions(flops_reduction=0.3))``, ``QMFRGPrune(...)``, the plan's
``options`` record and the CLI all go through this one dataclass: a bad value is an
:class:`~tvm_qmfrg.errors.OptionError` naming the option, raised before any work starts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from . import criteria
from .errors import OptionError
from .selection import ALLOCATIONS as DATA_FREE_ALLOCATIONS

ALLOCATIONS = ("auto", *DATA_FREE_ALLOCATIONS, "sensitivity")
SELECTIONS = ("activations", "criterion")


def _real(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise OptionError(f"{name}={value} is not finite")
    return float(value)


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < low:
        raise OptionError(f"{name}={value} must be >= {low}")
    return int(value)


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how (see :func:`tvm_qmfrg.passes.prune.prune_module`).

    Parameters
    ----------
    criterion
        A registered criterion (:data:`tvm_qmfrg.criteria.CRITERIA`): ``qmfrg`` (default),
        ``spectral``, ``magnitude``, ``random``, ``fpgm``.
    sparsity, flops_reduction, epsilon
        Exactly one target: the fraction of every group's units, the fraction of conv/matmul
        FLOPs (in ``[0, 1)``), or lossless merging within ``epsilon`` radians (``qmfrg``).
    min_channels, round_to
        Every group keeps at least ``min_channels`` and a multiple of ``round_to`` channels.
    allocation
        How a FLOPs budget spreads over groups: ``uniform``, ``global``, or ``sensitivity``
        (measured on calibration data); ``auto`` (default): ``sensitivity`` when the pass
        has calibration data, the ONNX model to run it in onnxruntime and a FLOPs target,
        else ``uniform`` (measuring through untuned TVM builds is slow).
    protect
        Glob patterns (or exact names) of producer nodes whose groups stay intact.
    compensate
        Fold data-free bias compensation into consumers (default: the criterion's trait).
    seed
        Seed of the ``random`` criterion.
    selection
        With calibration data: which units a group keeps. ``activations`` (default): the
        column subset that best reconstructs its consumers' outputs
        (:func:`tvm_qmfrg.reconstruction.select_units`); ``criterion``: the criterion's
        choice, refit afterwards.
    sequential
        With calibration data: decide groups one by one on the network already pruned
        upstream, then refit every consumer on the pruned network (default); ``False``:
        every group from the dense network's activations.
    reconstruct
        With calibration data: refit the consumers (default); ``False``: only choose.
    residual
        With calibration data, sequential: a consumer whose output is added to a residual
        stream (through per-channel affine ops) is fit to reproduce the dense *sum*, so it
        also cancels the drift the stream carries from the blocks pruned upstream
        (default); ``False``: it reproduces its own dense output.
    correction
        With calibration data, sequential: how much of the drift from the groups pruned
        upstream a refit corrects, in ``[0, 1]``: ``1`` fits a consumer to the dense
        network's activations, ``0`` to its own dense output on the input it now reads
        (layer-local). ``None`` (default): both are run, refit on the fitting samples, and
        the one whose network output is closer to the dense one on the held-out
        calibration samples is kept.
    ridge
        With calibration data: the refit's ridge, relative to the mean kept-feature variance;
        ``None`` (default): chosen per consumer on held-out calibration samples.
    """

    criterion: str = "qmfrg"
    sparsity: float | None = None
    flops_reduction: float | None = None
    epsilon: float | None = None
    min_channels: int = 1
    round_to: int = 1
    allocation: str = "auto"
    protect: tuple[str, ...] = field(default_factory=tuple)
    compensate: bool | None = None
    seed: int = 0
    selection: str = "activations"
    sequential: bool = True
    reconstruct: bool = True
    residual: bool = True
    correction: float | None = None
    ridge: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, str):
            raise OptionError(f"criterion must be a name, got {self.criterion!r}")
        criteria.get(self.criterion)
        targets = {
            "sparsity": _real("sparsity", self.sparsity),
            "flops_reduction": _real("flops_reduction", self.flops_reduction),
            "epsilon": _real("epsilon", self.epsilon),
        }
        given = [k for k, v in targets.items() if v is not None]
        if len(given) != 1:
            raise OptionError(
                "give exactly one of sparsity, flops_reduction, epsilon"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for key in ("sparsity", "flops_reduction"):
            v = targets[key]
            if v is not None and not 0 <= v < 1:
                raise OptionError(f"{key}={v} is outside [0, 1)")
        if targets["epsilon"] is not None:
            if not 0 <= targets["epsilon"] <= math.pi / 2:
                raise OptionError(f"epsilon={targets['epsilon']} is outside [0, pi/2]")
            if not criteria.traits(self.criterion).merges:
                merging = [c.name for c in criteria.CRITERIA.values() if c.merges]
                raise OptionError(
                    f"epsilon (lossless merging) needs a merging criterion ({', '.join(merging)})"
                )
        for key, v in targets.items():
            object.__setattr__(self, key, v)
        object.__setattr__(self, "min_channels", _int("min_channels", self.min_channels, 1))
        object.__setattr__(self, "round_to", _int("round_to", self.round_to, 1))
        object.__setattr__(self, "seed", _int("seed", self.seed, 0))
        if self.allocation not in ALLOCATIONS:
            raise OptionError(
                f"allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}"
            )
        if self.selection not in SELECTIONS:
            raise OptionError(f"selection={self.selection!r} is not one of {', '.join(SELECTIONS)}")
        for key in ("sequential", "reconstruct", "residual"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(f"{key} must be True or False, got {getattr(self, key)!r}")
        correction = _real("correction", self.correction)
        if correction is not None and not 0 <= correction <= 1:
            raise OptionError(f"correction={correction} is outside [0, 1]")
        object.__setattr__(self, "correction", correction)
        ridge = _real("ridge", self.ridge)
        if ridge is not None and ridge <= 0:
            raise OptionError(f"ridge={ridge} must be > 0")
        object.__setattr__(self, "ridge", ridge)
        object.__setattr__(self, "protect", _patterns(self.protect))
        if self.compensate is not None and not isinstance(self.compensate, bool):
            raise OptionError(f"compensate must be True, False or None, got {self.compensate!r}")

    def allocation_for(self, measurable: bool) -> str:
        """The allocation that runs: ``auto`` resolved; ``measurable``: the pass has
        calibration data and a fast engine to measure sensitivity with."""
        if self.allocation != "auto":
            return self.allocation
        return "sensitivity" if measurable and self.flops_reduction is not None else "uniform"

    @property
    def compensates(self) -> bool:
        """Whether bias compensation is folded in: ``compensate``, else the criterion's."""
        if self.compensate is not None:
            return self.compensate
        return criteria.traits(self.criterion).compensates

    def to_dict(self) -> dict:
        out = asdict(self)
        out["protect"] = list(self.protect)
        out["compensate"] = self.compensates
        return out


def _patterns(protect) -> tuple[str, ...]:
    if isinstance(protect, str):
        raise OptionError(
            f"protect must be a list of patterns, not the string {protect!r} "
            f"(write protect=[{protect!r}])"
        )
    if not isinstance(protect, Iterable):
        raise OptionError(f"protect must be a list of patterns, got {type(protect).__name__}")
    out = tuple(protect)
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise OptionError(f"protect patterns must be non-empty strings, got {bad[0]!r}")
    return out
