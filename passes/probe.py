"""A copy of a module that also returns some of its intermediate values (for calibration).

:func:`probe_module` re-emits ``main`` with the requested bindings promoted to outputs, so
one run of the compiled probe gives the model's result and the activations the calibrated
pass reads (:mod:`.calibrated`, when no ONNX model is at hand for onnxruntime).
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax


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
