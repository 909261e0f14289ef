"""Bring an imported Relax module into the form the channel analysis reads.

After :func:`normalize` the ``main`` function is one flat sequence of bindings whose
weights are constants: parameters bound (``BindParams``), constant sub-expressions folded
(``FoldConstant``: a Gemm's ``permute_dims(W)`` becomes a transposed constant, a conv bias
``reshape(b)`` a ``(1, C, 1, 1)`` constant), ONNX ``Clip`` lowered from fixed-shape
``call_tir`` kernels back to ``maximum``/``minimum`` ops (a ``call_tir`` keeps its output
shape when its input shrinks, so a pruned graph through it would be ill-formed), the
``erf`` form of exact GELU fused into ``nn.gelu`` (one activation the analysis knows), trivial
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


def _gelu_pattern():
    from tvm.relax.dpl import is_const, is_op, wildcard

    def either(op, a, b):
        return is_op(op)(a, b) | is_op(op)(b, a)

    x, root2, one, half = wildcard(), is_const(), is_const(), is_const()
    erf = is_op("relax.erf")(is_op("relax.divide")(x, root2))
    gelu = either(
        "relax.multiply", either("relax.multiply", x, either("relax.add", erf, one)), half
    )
    return gelu, x, (root2, one, half)


def _const_is(expr, value: float) -> bool:
    return _scalar_const(expr) and bool(np.isclose(expr.value.numpy().item(), value, rtol=1e-6))


@tvm.transform.module_pass(opt_level=0, name="FuseErfGelu")
def fuse_erf_gelu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``x * (erf(x / sqrt 2) + 1) * 0.5`` (ONNX exports of exact GELU) -> ``nn.gelu(x)``."""
    from tvm.relax.dpl import rewrite_call

    pattern, x, consts = _gelu_pattern()

    def rewriter(expr, matches):
        values = [matches[c] for c in consts]
        if all(_const_is(v, t) for v, t in zip(values, (np.sqrt(2.0), 1.0, 0.5))):
            return relax.op.nn.gelu(matches[x])
        return expr

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewriter, func)
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
        relax.transform.FoldConstant(),
        lower_clip_kernels,
        fuse_erf_gelu,
        relax.transform.FoldConstant(),
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
