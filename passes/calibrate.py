"""Data-aware mode: activations from calibration inputs, and least-squares refits.

With calibration data a pruned group's consumers are refit (ThiNet / He et al. 2017 style,
one-shot): the pruned features are reconstructed from the kept ones,
``a_P ~= R a_K + mu``, with ``R, mu`` the ridge least-squares fit on the activations the
consumers actually read in the dense model. Folding ``R`` and ``mu`` into the consumers is
then exact for those samples up to the fit's residual (see ``prune._fold_consumer``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg.compensation import least_squares_refit
from tvm_qmfrg.errors import OptionError

from .channels import Layout

log = logging.getLogger(__name__)


@relax.expr_functor.mutator
class _Expose(relax.PyExprMutator):
    """Re-emit ``main`` with the requested dataflow vars promoted to outputs."""

    def __init__(self, mod: tvm.IRModule, wanted: Sequence[relax.Var]):
        super().__init__(mod)
        self.mod_ = mod
        self.wanted = set(wanted)
        self.exposed: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.wanted:
            super().visit_var_binding_(binding)
            return
        value = self.visit_expr(binding.value)
        new_var = self.builder_.emit_output(value, binding.var.name)
        self.exposed[binding.var] = new_var
        self.set_var_remap(binding.var, new_var)


def probe_module(mod: tvm.IRModule, wanted: Sequence[relax.Var]) -> tvm.IRModule:
    """A copy of ``mod`` whose ``main`` returns ``(original result, *wanted)``."""
    expose = _Expose(mod, wanted)
    func = expose.visit_expr(mod["main"])
    outputs = [func.body.body] + [expose.exposed[v] for v in wanted]
    body = relax.SeqExpr(func.body.blocks, relax.Tuple(outputs))
    ret_ty = relax.TupleType([o.ty for o in outputs])
    new_func = relax.Function(func.params, body, ret_ty=ret_ty, attrs=func.attrs)
    probe = tvm.IRModule({"main": new_func})
    return relax.transform.Normalize()(probe)


def _batches(calibration, func: relax.Function) -> list[list[np.ndarray]]:
    """Split calibration data into input lists the function accepts (static batch kept)."""
    params = func.params
    if isinstance(calibration, Mapping):
        arrays = [np.asarray(calibration[p.name]) for p in params]
    elif isinstance(calibration, np.ndarray):
        arrays = [calibration]
    else:
        arrays = [np.asarray(a) for a in calibration]
    if len(arrays) != len(params):
        raise OptionError(f"calibration gives {len(arrays)} inputs, the model takes {len(params)}")
    n = arrays[0].shape[0]
    if n == 0 or any(a.shape[0] != n for a in arrays):
        raise OptionError("calibration inputs must share a non-zero leading (batch) size")
    first = params[0].ty.shape.values[0]
    batch = int(first) if isinstance(first, tvm.tirx.IntImm) else n
    for p, a in zip(params, arrays):
        want = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in p.ty.shape.values]
        if len(want) != a.ndim or any(
            w is not None and w != s for w, s in zip(want[1:], a.shape[1:])
        ):
            raise OptionError(
                f"calibration input for '{p.name}' has shape {a.shape}, the model wants {want}"
            )
    if n % batch:
        raise OptionError(f"{n} calibration samples do not split into batches of {batch}")
    return [
        [a[i : i + batch].astype(str(p.ty.dtype)) for a, p in zip(arrays, params)]
        for i in range(0, n, batch)
    ]


def collect(mod: tvm.IRModule, wanted: Sequence[relax.Var], calibration) -> dict:
    """Run the dense module on the calibration data; the values of ``wanted``, stacked."""
    if not wanted:
        return {}
    probe = probe_module(mod, wanted)
    ex = tvm.compile(probe, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    chunks: list[list[np.ndarray]] = [[] for _ in wanted]
    for inputs in _batches(calibration, mod["main"]):
        out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
        for k in range(len(wanted)):
            chunks[k].append(out[k + 1].numpy())
    return {v: np.concatenate(c, axis=0) for v, c in zip(wanted, chunks)}


def feature_samples(act: np.ndarray, layout: Layout, seg) -> np.ndarray | None:
    """``(samples, features)`` of one segment; a flattened block adds its offsets as samples."""
    a = np.moveaxis(act, layout.axis, -1).reshape(-1, layout.size)[:, seg.start : seg.stop]
    if seg.ppf < 1:
        return None
    ppf = int(seg.ppf)
    a = a.reshape(a.shape[0], seg.features, ppf)
    return np.moveaxis(a, 2, 1).reshape(-1, seg.features).astype(np.float64)


def refit(
    samples: np.ndarray, kept: np.ndarray, pruned: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares ``a_P ~= R a_K + mu`` (:func:`least_squares_refit`)."""
    return least_squares_refit(samples, kept, pruned)
