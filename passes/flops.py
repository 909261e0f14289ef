"""Count what a Relax module costs: conv/matmul FLOPs and weight parameters.

Measured on the module itself (after a rewrite, on the rewritten one), so reported
reductions are facts about the graph, not estimates. A symbolic batch counts as 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .ops import linear_ops


@dataclass(frozen=True)
class Cost:
    flops: float
    params: int
    weights: tuple[tuple[int, ...], ...]  # shapes of conv/matmul constant weights, in order


def module_cost(mod: tvm.IRModule, func_name: str = "main") -> Cost:
    """FLOPs of the linear ops (:mod:`.ops`: conv2d, conv2d_transpose, matmul; 2 per
    multiply-add) and the element count of all constants."""
    func = mod[func_name]
    consts = set()  # tvm objects hash by identity: a constant used twice counts once

    def visit(expr):
        if isinstance(expr, tvm.ir.GenericConst):
            consts.add(expr)

    relax.analysis.post_order_visit(func.body, visit)
    params = sum(int(np.prod(c.value.shape)) for c in consts)
    ops = linear_ops(func)
    flops = sum(op.flops for op in ops)
    weights = tuple(
        tuple(op.weight_dims) for op in ops if isinstance(op.call.args[1], tvm.ir.GenericConst)
    )
    return Cost(flops=float(flops), params=params, weights=weights)
