"""Count what a Relax module costs: conv/matmul FLOPs and weight parameters.

Measured on the module itself (after a rewrite, on the rewritten one), so reported
reductions are facts about the graph, not estimates. A symbolic batch counts as 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class Cost:
    flops: float
    params: int
    weights: tuple[tuple[int, ...], ...]  # shapes of conv/matmul constant weights, in order


def _dims(expr) -> list[int]:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return []
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else 1 for v in ty.shape.values]


def module_cost(mod: tvm.IRModule, func_name: str = "main") -> Cost:
    """FLOPs (2 per multiply-add) of conv2d, conv2d_transpose and matmul ops, and the element
    count of all constants.

    conv2d: ``2 * |out| * (I/g) * kh * kw``; conv2d_transpose (IOHW weight):
    ``2 * |in| * (O/g) * kh * kw``; matmul: ``2 * |out| * K``.
    """
    func = mod[func_name]
    flops = 0.0
    weights = []
    consts = set()  # tvm objects hash by identity: a constant used twice counts once

    def visit(expr):
        if isinstance(expr, tvm.ir.GenericConst):
            consts.add(expr)

    relax.analysis.post_order_visit(func.body, visit)
    params = sum(int(np.prod(c.value.shape)) for c in consts)
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
                continue
            name = call.op.name
            if name == "relax.nn.conv2d":
                w = _dims(call.args[1])
                out = _dims(b.var)
                flops += 2.0 * np.prod(out) * np.prod(w[1:])
                if isinstance(call.args[1], tvm.ir.GenericConst):
                    weights.append(tuple(w))
            elif name == "relax.nn.conv2d_transpose":  # every input pixel scatters a kernel
                w = _dims(call.args[1])
                x = _dims(call.args[0])
                flops += 2.0 * np.prod(x) * np.prod(w[1:])
                if isinstance(call.args[1], tvm.ir.GenericConst):
                    weights.append(tuple(w))
            elif name == "relax.matmul":
                a, w = _dims(call.args[0]), _dims(call.args[1])
                out = _dims(b.var)
                k = a[-1] if a else 1
                flops += 2.0 * np.prod(out) * k
                if isinstance(call.args[1], tvm.ir.GenericConst):
                    weights.append(tuple(w))
    return Cost(flops=float(flops), params=params, weights=tuple(weights))
