"""Bring an imported Relax module into the form the channel analysis reads.

After :func:`normalize` the ``main`` function is one flat sequence of bindings whose
weights are constants: parameters bound (``BindParams``); constant sub-expressions folded
(``FoldConstant`` on the bindings computable from constants: a Gemm's ``permute_dims(W)``
becomes a transposed constant, a conv bias ``reshape(b)`` a ``(1, C, 1, 1)`` constant);
ONNX ``Clip`` lowered from fixed-shape ``call_tir`` kernels back to ``maximum``/``minimum``
ops (a ``call_tir`` keeps its output shape when its input shrinks, so a pruned graph
through it would be ill-formed); the ``erf`` form of exact GELU fused into ``nn.gelu``
(one activation the analysis knows, in each exporter's order of the factors); trivial
bindings canonicalized and dead code removed.

BatchNorm is deliberately *not* folded into the convolutions here: its running statistics
are what data-free bias compensation reads (DESIGN.md, "Bias compensation"). The channel
analysis treats it as a per-channel affine op and slices it with the channel.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg.errors import GraphError, one_line

_CLIP_KERNELS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}


def _scalar_const(expr) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) and int(np.prod(expr.value.shape)) == 1


@relax.expr_functor.mutator
class _ClipKernelsToOps(relax.PyExprMutator):
    """``call_tir(maximum|minimum, (x, scalar))`` -> ``relax.op.maximum|minimum(x, scalar)``."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return call
        kernel, args = call.args[0], call.args[1]
        name = kernel.name_hint if isinstance(kernel, tvm.ir.GlobalVar) else ""
        op = next((fn for prefix, fn in _CLIP_KERNELS.items() if name.startswith(prefix)), None)
        if op is None or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return call
        x, bound = args.fields
        if not _scalar_const(bound):
            return call
        return op(x, bound)

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def _const_is(expr, value: float) -> bool:
    return _scalar_const(expr) and bool(np.isclose(expr.value.numpy().item(), value, rtol=1e-6))


def _call_of(expr, op: str, values: dict) -> relax.Call | None:
    """The call ``op`` that ``expr`` is (or is bound to), else None."""
    value = values.get(expr, expr) if isinstance(expr, relax.Var) else expr
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op:
        return value
    return None


def _erf_input(expr, values: dict):
    """``x`` when ``expr`` is ``erf(x / sqrt 2) + 1`` (either operand order; ``x * 1/sqrt 2``
    too), else None."""
    add = _call_of(expr, "relax.add", values)
    if add is None:
        return None
    for erf_arg, one in (add.args, add.args[::-1]):
        erf = _call_of(erf_arg, "relax.erf", values)
        if erf is None or not _const_is(one, 1.0):
            continue
        scaled = erf.args[0]
        div = _call_of(scaled, "relax.divide", values)
        if div is not None and _const_is(div.args[1], np.sqrt(2.0)):
            return div.args[0]
        mul = _call_of(scaled, "relax.multiply", values)
        if mul is not None:
            for x, c in (mul.args, mul.args[::-1]):
                if _const_is(c, np.sqrt(0.5)):
                    return x
    return None


def _gelu_input(expr, values: dict):
    """``x`` when ``expr`` is a product of the three factors ``x``, ``0.5`` and
    ``erf(x / sqrt 2) + 1`` in any order and association (the ONNX exports of exact GELU:
    ``x * (1 + erf) * 0.5``, ``x * 0.5 * (1 + erf)``, ...), else None."""
    top = _call_of(expr, "relax.multiply", values)
    if top is None:
        return None
    for outer, inner in (top.args, top.args[::-1]):
        mul = _call_of(inner, "relax.multiply", values)
        if mul is None:
            continue
        factors = [outer, *mul.args]
        for k, half in enumerate(factors):
            if not _const_is(half, 0.5):
                continue
            a, b = factors[:k] + factors[k + 1 :]
            for x, erf_term in ((a, b), (b, a)):
                if isinstance(x, relax.Var) and x.same_as(_erf_input(erf_term, values)):
                    return x
    return None


@relax.expr_functor.mutator
class _FuseErfGelu(relax.PyExprMutator):
    """Rebinds each binding that computes exact GELU (:func:`_gelu_input`) to ``nn.gelu``;
    the bindings it read become dead code."""

    def __init__(self, mod: tvm.IRModule, inputs: dict):
        super().__init__(mod)
        self.inputs = inputs  # binding var -> x of its GELU

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        x = self.inputs.get(binding.var)
        if x is None:
            super().visit_var_binding_(binding)
            return
        value = self.builder_.normalize(relax.op.nn.gelu(self.visit_expr(x)))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))


@tvm.transform.module_pass(opt_level=0, name="FuseErfGelu")
def fuse_erf_gelu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``x * (erf(x / sqrt 2) + 1) * 0.5`` (ONNX exports of exact GELU) -> ``nn.gelu(x)``.

    One scan of the bindings (a pattern rewrite re-scans the function after every match).
    """
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        if not any(_call_of(v, "relax.erf", values) is not None for v in values.values()):
            continue
        inputs = {var: x for var in values if (x := _gelu_input(var, values)) is not None}
        if inputs:
            mod[gv] = _FuseErfGelu(mod, inputs).visit_expr(func)
    return mod


@relax.expr_functor.mutator
class _UseConstants(relax.PyExprMutator):
    """Replaces the uses of some bindings by the constants they fold to."""

    def __init__(self, mod: tvm.IRModule, consts: dict):
        super().__init__(mod)
        self.consts = consts

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.consts.get(var, var)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:
        return self.consts.get(var, var)


def _constant_bindings(func: relax.Function) -> list[relax.VarBinding]:
    """The bindings computable from constants alone (no parameter, no symbolic shape)."""
    out, known = [], set()
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding) or isinstance(b.value, relax.Function):
                continue
            if relax.analysis.free_symbolic_vars(b.value) or relax.analysis.free_symbolic_vars(
                b.var
            ):
                continue
            if all(v in known for v in relax.analysis.free_vars(b.value)):
                known.add(b.var)
                out.append(b)
    return out


@tvm.transform.module_pass(opt_level=0, name="FoldConstantBindings")
def fold_constant_bindings(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """TVM's ``FoldConstant`` on the bindings of each function computable from constants.

    ``FoldConstant`` lowers every op of a dataflow block to a TIR kernel before it looks
    at the arguments (on a ResNet-50, 53 convolutions and 53 batch norms are lowered and
    dropped); here it gets a function of the constant bindings only, and the values it
    folds replace their uses (the bindings then are dead code).
    """
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bindings = _constant_bindings(func)
        if not bindings:
            continue
        outs = [relax.Var(f"fold{k}", b.var.ty) for k, b in enumerate(bindings)]
        block = relax.DataflowBlock(
            [*bindings, *(relax.VarBinding(o, b.var) for o, b in zip(outs, bindings))]
        )
        body = relax.BlockBuilder().normalize(relax.SeqExpr([block], relax.Tuple(outs)))
        mini = tvm.IRModule({"fold": relax.Function([], body)})
        folded = relax.transform.FoldConstant()(mini)["fold"].body.body
        consts = {
            b.var: v for b, v in zip(bindings, folded.fields) if isinstance(v, tvm.ir.GenericConst)
        }
        if consts:
            mod[gv] = _UseConstants(mod, consts).visit_expr(func)
    return mod


@tvm.transform.module_pass(opt_level=0, name="LowerClipKernels")
def lower_clip_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _ClipKernelsToOps(mod).transform()


def normalize(
    mod: tvm.IRModule,
    params: dict[str, np.ndarray] | None = None,
    func_name: str = "main",
    *,
    model: str = "model",
) -> tvm.IRModule:
    """The normalized copy of ``mod`` (see module docstring); ``params`` bind weight inputs.

    A failure inside TVM's passes (folding legalizes ops, which needs known shapes) is a
    :class:`GraphError` naming ``model``.
    """
    if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise GraphError(f"{model}: module has no function '{func_name}'")
    steps = []
    if params:
        steps.append(relax.transform.BindParams(func_name, dict(params)))
    steps += [
        fold_constant_bindings,
        lower_clip_kernels,
        fuse_erf_gelu,
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]
    try:
        return tvm.transform.Sequential(steps)(mod)
    except Exception as exc:  # TVM raises TVMError, AssertionError, ValueError, ...
        reason = one_line(exc, last=True, limit=200)
        raise GraphError(
            f"{model}: TVM cannot fold the imported module ({reason}); if the model "
            "computes shapes at run time, give static input sizes (--input-shape)"
        ) from exc
