"""The one view of a Relax function's linear ops: conv2d, conv2d_transpose and matmul.

Every pass that counts, names or rewrites them reads them here: :func:`linear_ops` lists
them in binding order with their kind, constant weight (when there is one), static dims and
FLOPs (2 per multiply-add):

- ``conv2d`` (OIHW weight): ``2 * |out| * (I/g) * kh * kw``;
- ``conv2d_transpose`` (IOHW weight): ``2 * |in| * (O/g) * kh * kw`` (every input pixel
  scatters a kernel);
- ``matmul``: ``2 * |out| * K``.

A symbolic dim counts as 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

KINDS = {
    "relax.nn.conv2d": "conv2d",
    "relax.nn.conv2d_transpose": "conv2d_transpose",
    "relax.matmul": "matmul",
}


def dims(expr) -> list[int]:
    """Static dims of a tensor expression (a symbolic dim is 1; no shape: ``[]``)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return []
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else 1 for v in ty.shape.values]


@dataclass(frozen=True)
class LinearOp:
    """One linear op binding."""

    var: relax.Var
    call: relax.Call
    kind: str  # "conv2d" | "conv2d_transpose" | "matmul"

    @property
    def weight(self) -> np.ndarray | None:
        """The constant weight (second argument), or None when it is computed."""
        w = self.call.args[1]
        return w.value.numpy() if isinstance(w, tvm.ir.GenericConst) else None

    @property
    def weight_dims(self) -> list[int]:
        return dims(self.call.args[1])

    @property
    def flops(self) -> float:
        w = self.weight_dims
        if self.kind == "conv2d":
            return 2.0 * float(np.prod(dims(self.var))) * float(np.prod(w[1:]))
        if self.kind == "conv2d_transpose":
            return 2.0 * float(np.prod(dims(self.call.args[0]))) * float(np.prod(w[1:]))
        a = dims(self.call.args[0])
        return 2.0 * float(np.prod(dims(self.var))) * (a[-1] if a else 1)


def linear_ops(func: relax.Function, *, constant_weight: bool = False) -> list[LinearOp]:
    """The linear op bindings of ``func`` in order (only constant-weight ones if asked)."""
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)):
                continue
            kind = KINDS.get(v.op.name)
            if kind is None:
                continue
            if constant_weight and not isinstance(v.args[1], tvm.ir.GenericConst):
                continue
            out.append(LinearOp(b.var, v, kind))
    return out
