"""SpectralSubstitution: replace operators by cheaper equivalent ones, with certified bounds.

Two kinds of substitution, each a rewrite of a normalized Relax ``main``:

- ``lowrank``: a dense/matmul weight ``W`` (``m x n`` as ``y = W x``) becomes two factors
  ``n -> r -> m`` for the smallest ``r`` whose truncation angle
  ``d_FS(psi(W), psi(W_r)) <= epsilon`` — by Eckart–Young this certifies the relative
  Frobenius error ``||W - W_r||_F / ||W||_F = sin d_FS`` — when it also removes at least
  ``min_gain`` of the op's FLOPs. A conv ``(O, I, kh, kw)`` becomes a conv with ``r`` output
  channels (same strides/padding) followed by a 1x1 conv. The bias stays exact. Every
  replaced op records both certificates: Frobenius ``sin d_FS`` and spectral
  ``s_{r+1} / s_1`` (``||(W - W_r) x|| <= s_{r+1} ||x||`` for every input ``x``).
- ``dedup``: two ops reading the same input (or a 1x1 conv and a dense layer reading the same
  features through a reshape) whose weights are equivalent compute once; the other becomes a
  scale of the first. Spectra screen first (equal spectra are necessary: ``d_FS`` and ``W2``
  within ``epsilon``), then the direct check in the network's own basis decides:
  ``||W_j - c W_i||_F <= delta ||W_j||_F`` with the best ``c``. Equal spectra with different
  singular vectors (``W_j = U W_i V^T``) pass the screen and fail the check: untouched.

``dedup`` also removes duplicate *units* inside a layer — neurons, channels and attention
heads that are exact scaled copies of another (a head: the same Q, K and V rows, hence the
same attention pattern and value map) — through :func:`~.prune.prune_module`'s lossless mode
at angle ``arcsin(delta)``: the twin is computed once and the output projection folds it in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg.errors import OptionError
from tvm_qmfrg.metrics import (
    best_scale,
    fubini_study,
    rank_for_angle,
    truncation_angle,
    wasserstein2,
)
from tvm_qmfrg.report import format_table

from .channels import producer_names
from .flops import module_cost
from .normalize import normalize
from .ops import dims as _dims
from .ops import linear_ops
from .pass_input import checks_its_input

log = logging.getLogger(__name__)

KINDS = ("lowrank", "dedup")


@dataclass(frozen=True)
class Substitution:
    """One replaced operator and what certifies the replacement."""

    operator: str
    kind: str  # "lowrank" | "dedup"
    detail: str  # "rank r of k" or "= c * <partner>"
    frobenius_bound: float  # ||W - W'||_F / ||W||_F
    spectral_bound: float  # ||W - W'||_2 / ||W||_2 (lowrank), same as Frobenius for dedup
    flops_before: float
    flops_after: float


@dataclass
class SubstitutionReport:
    """Per-op substitutions (unit merges carry no per-op FLOPs) and measured module totals."""

    substitutions: list[Substitution]
    flops_before: float = 0.0
    flops_after: float = 0.0

    def to_dict(self) -> dict:
        return {
            "substitutions": [asdict(s) for s in self.substitutions],
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }

    def table(self) -> str:
        if not self.substitutions:
            return "no operator qualifies for substitution (every bound above epsilon)"
        rows = [
            [
                s.operator,
                s.kind,
                s.detail,
                s.frobenius_bound,
                s.spectral_bound,
                s.flops_before - s.flops_after,
            ]
            for s in self.substitutions
        ]
        table = format_table(
            ["operator", "kind", "detail", "frob.bound", "spec.bound", "FLOPs saved"], rows
        )
        saved = 1 - self.flops_after / self.flops_before if self.flops_before else 0.0
        return (
            f"{table}\n\nFLOPs  {self.flops_before:,.0f} -> {self.flops_after:,.0f} "
            f"({saved:.1%} fewer)"
        )


@dataclass(frozen=True)
class _Op:
    var: relax.Var
    name: str
    kind: str  # "conv" | "matmul"
    data: relax.Expr
    weight: np.ndarray  # Relax layout: conv OIHW, matmul (in, out)
    matrix: np.ndarray  # y = W x view, (out, in*k)
    attrs: object
    flops: float


def _linear_ops(func: relax.Function, names: dict) -> list[_Op]:
    ops = []
    for op in linear_ops(func, constant_weight=True):
        v, w = op.call, op.weight
        if op.kind == "conv2d":
            if int(v.attrs.groups) != 1 or v.attrs.kernel_layout != "OIHW":
                continue
            matrix, kind = w.reshape(w.shape[0], -1), "conv"
        elif op.kind == "matmul":
            if w.ndim != 2:
                continue
            matrix, kind = w.T, "matmul"
        else:
            continue
        ops.append(
            _Op(
                op.var,
                names.get(op.var, op.var.name),
                kind,
                v.args[0],
                w,
                matrix.astype(np.float64),
                v.attrs,
                op.flops,
            )
        )
    return ops


def _same_input(a: _Op, b: _Op, values: dict) -> bool:
    """Same tensor, or a conv on (N, C, 1, 1) and a dense on its reshape to (N, C)."""
    if a.data.same_as(b.data) and a.kind == b.kind:
        return a.kind == "matmul" or _same_conv_attrs(a.attrs, b.attrs)
    conv, dense = (a, b) if a.kind == "conv" else (b, a)
    if conv.kind != "conv" or dense.kind != "matmul" or conv.weight.shape[2:] != (1, 1):
        return False
    src = values.get(dense.data)
    if not (isinstance(src, relax.Call) and src.op.name == "relax.reshape"):
        return False
    d4 = _dims(conv.data)
    flat = all(int(s) == 1 for s in conv.attrs.strides) and not any(
        int(p) for p in conv.attrs.padding
    )
    return src.args[0].same_as(conv.data) and d4[2:] == [1, 1] and flat


def _same_conv_attrs(a, b) -> bool:
    keys = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout")
    return all(
        [int(x) for x in getattr(a, k)] == [int(x) for x in getattr(b, k)]
        if k not in ("groups", "data_layout", "kernel_layout")
        else getattr(a, k) == getattr(b, k)
        for k in keys
    )


def _spectrum(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def find_duplicates(ops: list[_Op], values: dict, epsilon: float, delta: float):
    """``(keep, drop, c, residual)`` per confirmed duplicate; also the screened-but-rejected."""
    confirmed, rejected, dropped = [], [], set()
    for i, a in enumerate(ops):
        if a.var in dropped:
            continue
        for b in ops[i + 1 :]:
            if (
                b.var in dropped
                or a.matrix.shape != b.matrix.shape
                or not _same_input(a, b, values)
            ):
                continue
            sa, sb = _spectrum(a.matrix), _spectrum(b.matrix)
            if (
                fubini_study(sa, sb) > epsilon
                or wasserstein2(sa / np.linalg.norm(sa), sb / np.linalg.norm(sb)) > epsilon
            ):
                continue
            c, residual = best_scale(a.matrix, b.matrix)
            if residual <= delta:
                confirmed.append((a, b, c, residual))
                dropped.add(b.var)
            else:
                rejected.append((a, b, c, residual))
    return confirmed, rejected


def _lowrank_plan(op: _Op, epsilon: float, min_gain: float):
    """``(r, factors, frobenius, spectral, flops_after)`` or None when not worth it."""
    u, s, vt = np.linalg.svd(op.matrix, full_matrices=False)
    r = max(1, rank_for_angle(s, epsilon))
    m, n = op.matrix.shape
    if r * (m + n) > (1.0 - min_gain) * m * n:
        return None
    root = np.sqrt(s[:r])
    first = root[:, None] * vt[:r]  # (r, n): x -> r
    second = u[:, :r] * root[None, :]  # (m, r): r -> y
    frob = float(np.sin(truncation_angle(s, r)))
    spec = float(s[r] / s[0]) if r < s.size else 0.0
    return r, first, second, frob, spec, op.flops * r * (m + n) / (m * n)


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    def __init__(self, mod, dedup: dict, lowrank: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.dedup = dedup  # drop var -> (keep var, c, reshape dims or None)
        self.lowrank = lowrank  # var -> (op, first, second)

    def _emit(self, binding, value):
        if isinstance(binding.var, relax.DataflowVar):
            new = self.builder_.emit(value, binding.var.name)
        else:
            new = self.builder_.emit_output(value, binding.var.name)
        self.set_var_remap(binding.var, new)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.dedup:
            keep, c, dims = self.dedup[binding.var]
            src = self.visit_expr(keep)
            dtype = str(src.ty.dtype)
            value = relax.op.multiply(src, relax.const(np.array(c, dtype=dtype)))
            if dims is not None:
                value = relax.op.reshape(self.builder_.emit(value), dims)
            self._emit(binding, value)
            return
        if binding.var in self.lowrank:
            op, first, second = self.lowrank[binding.var]
            x = self.visit_expr(op.data)
            dtype = str(x.ty.dtype)
            if op.kind == "matmul":
                h = self.builder_.emit(relax.op.matmul(x, relax.const(first.T.astype(dtype))))
                self._emit(binding, relax.op.matmul(h, relax.const(second.T.astype(dtype))))
                return
            a = op.attrs
            k1 = first.reshape((first.shape[0],) + op.weight.shape[1:]).astype(dtype)
            h = self.builder_.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(k1),
                    strides=a.strides,
                    padding=a.padding,
                    dilation=a.dilation,
                    groups=1,
                    data_layout=a.data_layout,
                    kernel_layout=a.kernel_layout,
                    out_layout=a.out_layout,
                    out_dtype=a.out_dtype,
                )
            )
            k2 = second.reshape(second.shape + (1, 1)).astype(dtype)
            self._emit(binding, relax.op.nn.conv2d(h, relax.const(k2)))
            return
        super().visit_var_binding_(binding)

    def transform(self) -> tvm.IRModule:
        self.builder_.update_func(
            self.mod_.get_global_var("main"), self.visit_expr(self.mod_["main"])
        )
        return self.builder_.get()


def substitute_module(
    mod: tvm.IRModule,
    *,
    epsilon: float,
    kinds: Sequence[str] = KINDS,
    min_gain: float = 0.1,
    delta: float = 1e-6,
    names: Sequence[str] | None = None,
) -> tuple[SubstitutionReport, tvm.IRModule]:
    """Apply the substitutions of ``kinds`` to ``mod``; return the report and the module."""
    check_options(epsilon, kinds, min_gain, delta)
    before = module_cost(normalize(mod)).flops
    subs: list[Substitution] = []
    if "dedup" in kinds:
        mod, subs = _dedup_units(mod, delta, names)
    norm = normalize(mod)
    func = norm["main"]
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    ops = _linear_ops(func, producer_names(func, names))
    dedup, lowrank = {}, {}
    if "dedup" in kinds:
        confirmed, rejected = find_duplicates(ops, values, epsilon, delta)
        for keep, drop, c, residual in confirmed:
            dims = None
            if keep.kind != drop.kind:  # conv (N, O, 1, 1) vs dense (N, O): reshape the copy
                dims = relax.ShapeExpr(list(drop.var.ty.shape.values))
            dedup[drop.var] = (keep.var, c, dims)
            subs.append(
                Substitution(
                    drop.name,
                    "dedup",
                    f"= {c:.6g} * {keep.name}",
                    residual,
                    residual,
                    drop.flops,
                    0.0,
                )
            )
        for keep, drop, _, residual in rejected:
            log.info(
                "%s vs %s: spectra equal, direct check fails (residual %.3g): kept both",
                keep.name,
                drop.name,
                residual,
            )
    if "lowrank" in kinds:
        for op in ops:
            if op.var in dedup:
                continue
            found = _lowrank_plan(op, epsilon, min_gain)
            if found is None:
                continue
            r, first, second, frob, spec, after = found
            lowrank[op.var] = (op, first, second)
            subs.append(
                Substitution(
                    op.name,
                    "lowrank",
                    f"rank {r} of {min(op.matrix.shape)}",
                    frob,
                    spec,
                    op.flops,
                    after,
                )
            )
    new = norm
    if dedup or lowrank:
        new = _Substitute(norm, dedup, lowrank).transform()
        new = relax.transform.DeadCodeElimination()(new)
        relax.analysis.well_formed(new)
    return SubstitutionReport(subs, before, module_cost(new).flops), new


def _dedup_units(mod, delta: float, names) -> tuple[tvm.IRModule, list[Substitution]]:
    """Merge exactly duplicated channels, neurons and heads (lossless pruning mode)."""
    from .prune import prune_module

    plan, pruned = prune_module(mod, epsilon=float(np.arcsin(delta)), names=names, compensate=False)
    subs = []
    for g in plan.groups:
        what = "head" if g.unit > 1 else "unit"
        for j, i, c in g.merges:
            subs.append(
                Substitution(
                    f"{g.name}[{what} {j}]", "dedup", f"= {c:.6g} * {what} {i}", 0.0, 0.0, 0.0, 0.0
                )
            )
    return (pruned, subs) if subs else (mod, [])


def check_options(epsilon, kinds, min_gain, delta) -> None:
    if not 0 <= epsilon <= np.pi / 2:
        raise OptionError(f"epsilon={epsilon} is outside [0, pi/2]")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise OptionError(
            f"unknown substitution kind(s) {unknown} (choose from {', '.join(KINDS)})"
        )
    if not 0 <= min_gain < 1:
        raise OptionError(f"min_gain={min_gain} is outside [0, 1)")
    if not 0 <= delta < 1:
        raise OptionError(f"delta={delta} is outside [0, 1)")


@checks_its_input
@tvm.transform.module_pass(opt_level=0, name="SpectralSubstitution")
class SpectralSubstitution:
    """Module pass around :func:`substitute_module`; the last report is in ``self.report``."""

    def __init__(
        self,
        epsilon: float = 0.05,
        kinds: Sequence[str] = KINDS,
        min_gain: float = 0.1,
        delta: float = 1e-6,
        names: Sequence[str] | None = None,
    ):
        check_options(epsilon, tuple(kinds), min_gain, delta)
        self.options = dict(
            epsilon=epsilon, kinds=tuple(kinds), min_gain=min_gain, delta=delta, names=names
        )
        self.report: SubstitutionReport | None = None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report, new = substitute_module(mod, **self.options)
        return new
