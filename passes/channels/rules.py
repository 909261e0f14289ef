"""Channel rules: what each Relax op does to the channel axis (one function per op).

Each rule is registered with :func:`~.walker.rule` for the ops it handles and gets the
walker, the bound variable, the call and a ``where`` string for messages. Spatial and
per-channel ops pass the layout through; producers start spaces; consumers record the weight
axis that reads them; adds and products couple spaces; concat places them at offsets; reshapes
map them (a head becomes the unit). A use a rule does not understand freezes the spaces it
touches, with the reason. See DESIGN.md, "Graph rules".
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import tvm
from tvm import relax

from ..ops import LinearOp
from .layout import Layout, reshape_layout
from .walker import (
    APPROXIMATE,
    HOMOGENEOUS,
    LINEAR,
    ODD,
    OpCost,
    Site,
    Walker,
    _const,
    _shape,
    rule,
)

_UNARY = {
    "relax.nn.relu": HOMOGENEOUS,
    "relax.nn.leakyrelu": HOMOGENEOUS,
    "relax.negative": LINEAR,
    "relax.astype": LINEAR,
    "relax.tanh": ODD,
    "relax.nn.gelu": APPROXIMATE,
    "relax.nn.gelu_tanh": APPROXIMATE,
    "relax.nn.silu": APPROXIMATE,
    "relax.sigmoid": APPROXIMATE,
    "relax.erf": APPROXIMATE,
    "relax.exp": APPROXIMATE,
    "relax.sqrt": APPROXIMATE,
    "relax.abs": APPROXIMATE,
    "relax.clip": APPROXIMATE,
    "relax.nn.softplus": APPROXIMATE,
    "relax.nn.dropout": LINEAR,
}
_POOL2D = {
    "relax.nn.max_pool2d": HOMOGENEOUS,
    "relax.nn.avg_pool2d": LINEAR,
    "relax.nn.adaptive_avg_pool2d": LINEAR,
}
_BINARY = {
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
}
_REDUCE = {"relax.mean", "relax.sum", "relax.max", "relax.min"}


@rule("relax.nn.conv2d")
def conv2d(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    data, weight = call.args
    a = call.attrs
    w = _const(weight)
    lay = ctx.layout.get(data)
    if w is None or a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
        ctx.freeze(lay, f"{where}: only NCHW/OIHW conv2d with a constant weight is handled")
        return
    if a.out_layout not in ("NCHW", ""):
        ctx.freeze(lay, f"{where}: out_layout {a.out_layout} is not handled")
        return
    in_ch = _shape(data)[1]
    groups = int(a.groups)
    flops = LinearOp(var, call, "conv2d").flops
    if lay is not None and lay.axis != 1:
        ctx.freeze(lay, f"{where}: channels are not on the conv's channel axis")
        lay = None
    if groups == 1:
        if lay is not None:
            ctx._consume(var, lay, 1, 1, 0)
        ctx._produce(var, 1, 0, 1, w.shape[0], w, "conv2d")
        ctx.ops.append(
            OpCost(var, "conv2d", flops, tuple(x for x in (lay, ctx.layout[var]) if x is not None))
        )
        return
    if groups == in_ch == w.shape[0]:  # depthwise, one filter per channel
        ctx.ops.append(OpCost(var, "conv2d", flops, (lay,) if lay else ()))
        if lay is not None:
            ctx.add_site(var, Site("depthwise", 1, 0, lay))
            ctx.layout[var] = lay
            ctx.mark(lay, APPROXIMATE)  # each channel gets its own spatial filter
        return
    _grouped_conv2d(ctx, var, call, where, lay, w, groups, flops)


def _tie_groups(ctx: Walker, var, groups: int, where: str) -> Layout | None:
    """Cut the channels of ``var`` into ``groups`` equal parts and couple the parts position
    by position (channel ``i`` of every part is one feature); the first part's layout."""
    size = ctx.layout[var].size
    part = size // groups
    wins = _windows(ctx, var, [k * part for k in range(groups + 1)], where)
    if wins is None:
        return None
    first = wins[0]
    for other in wins[1:]:
        if ctx.couple(first, other, where) is None:
            return None
    return first


def _grouped_conv2d(ctx: Walker, var, call, where, lay, w, groups: int, flops: float) -> None:
    """A grouped conv (``1 < groups``, not depthwise) prunes channels evenly per group.

    Group ``k`` reads inputs ``[k*ci, (k+1)*ci)`` and makes outputs ``[k*co, (k+1)*co)``.
    Removing input ``i`` from every group removes weight column ``i``; removing output ``i``
    of every group removes one row per group: the weight stays ``(groups*co', ci', kh, kw)``
    with the same ``groups``. So the parts of the input (and of the output) are coupled
    position by position, and the consumer site reads the first part's layout.
    """
    data = call.args[0]
    in_lay = None
    if lay is not None:
        part = _tie_groups(ctx, data, groups, where)
        if part is not None:
            ctx._consume(var, part, 1, 1, 0)
            in_lay = ctx.layout[data]
    ctx._produce(var, 1, 0, 1, w.shape[0], w, "conv2d")
    _tie_groups(ctx, var, groups, where)
    axes = tuple(x for x in (in_lay, ctx.layout[var]) if x is not None)
    ctx.ops.append(OpCost(var, "conv2d", flops, axes))


@rule("relax.matmul")
def matmul(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    x, w_expr = call.args
    w = _const(w_expr)
    lx = ctx.layout.get(x)
    out_shape = _shape(var)
    rank = len(out_shape)
    if w is not None and w.ndim == 2:
        flops = LinearOp(var, call, "matmul").flops
        if lx is not None and lx.axis != len(_shape(x)) - 1:
            ctx.freeze(lx, f"{where}: channels are not on the contracted axis")
            lx = None
        if lx is not None:
            ctx._consume(var, lx, 1, 0, 1)
        ctx._produce(var, 1, 1, rank - 1, w.shape[1], w, "matmul")
        ctx.ops.append(
            OpCost(var, "matmul", flops, tuple(v for v in (lx, ctx.layout[var]) if v is not None))
        )
        return
    if _const(x) is not None or w is not None:
        ctx.freeze(
            ctx.layout.get(x) or ctx.layout.get(w_expr),
            f"{where}: constant left operand or non-2-D weight",
        )
        return
    # activation x activation (attention): channels may only sit on batch axes
    lw = ctx.layout.get(w_expr)
    flops = LinearOp(var, call, "matmul").flops
    out = None
    for lay, operand_rank in ((lx, len(_shape(x))), (lw, len(_shape(w_expr)))):
        if lay is None:
            continue
        offset = rank - operand_rank
        if lay.axis >= operand_rank - 2:
            ctx.freeze(lay, f"{where}: channels on a matrix axis of an activation product")
            return
        shifted = lay.shifted(lay.axis + offset)
        out = shifted if out is None else ctx.couple(out, shifted, where)
        if out is None:
            return
    if out is not None:
        ctx.layout[var] = out
        ctx.mark(out, APPROXIMATE)
    ctx.ops.append(OpCost(var, "matmul", flops, (out,) if out is not None else ()))


# ---- per-channel ops ----------------------------------------------------------------


@rule("relax.nn.batch_norm")
def batch_norm(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    data = call.args[0]
    lay = ctx.layout.get(data)
    if lay is None:
        return
    params = [_const(a) for a in call.args[1:5]]
    if any(p is None for p in params) or int(call.attrs.axis) != lay.axis:
        ctx.freeze(lay, f"{where}: batch_norm with non-constant parameters or other axis")
        return
    for i in range(1, 5):
        ctx.add_site(var, Site("affine", i, 0, lay))
    ctx.tuples[var] = data
    gamma, beta, mean, variance = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(variance + float(call.attrs.epsilon))
    if not ctx._chain_step(
        data, data, scale=scale, shift=beta - mean * scale, bn=(beta, np.abs(gamma))
    ):
        ctx.mark(lay, APPROXIMATE)  # a per-channel affine after the first nonlinearity


@rule(*_UNARY)
def unary(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    ctx.layout[var] = lay
    ctx.mark(lay, _UNARY[call.op.name], call.op.name)
    if _UNARY[call.op.name] == LINEAR and call.op.name != "relax.negative":
        ctx._chain_step(call.args[0], var)


@rule(*_POOL2D)
def pool2d(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    if getattr(call.attrs, "layout", "NCHW") != "NCHW" or lay.axis != 1:
        ctx.freeze(lay, f"{where}: pooling layout is not NCHW over channels on axis 1")
        return
    ctx.layout[var] = lay
    ctx.mark(lay, _POOL2D[call.op.name], call.op.name)


@rule(*_REDUCE)
def reduce(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    rank = len(_shape(call.args[0]))
    axes = call.attrs.axis
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if lay.axis in axes:
        ctx.freeze(lay, f"{where}: reduces over the channel axis")
        return
    new_axis = lay.axis if call.attrs.keepdims else lay.axis - sum(a < lay.axis for a in axes)
    ctx.layout[var] = lay.shifted(new_axis)
    if call.op.name in ("relax.max", "relax.min"):
        ctx.mark(lay, APPROXIMATE)


@rule(*_BINARY)
def binary(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    a, b = call.args
    la, lb = ctx.layout.get(a), ctx.layout.get(b)
    out_shape = _shape(var)
    rank = len(out_shape)
    op = call.op.name
    if la is None and lb is None:
        return
    if la is not None and lb is not None:
        la2 = la.shifted(la.axis + rank - len(_shape(a)))
        lb2 = lb.shifted(lb.axis + rank - len(_shape(b)))
        out = ctx.couple(la2, lb2, where)
        if out is not None:
            ctx.layout[var] = out
            if op in ("relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"):
                ctx.mark(out, APPROXIMATE)
        return
    const_left = la is None
    lay, tensor_arg, other = (lb, b, a) if const_left else (la, a, b)
    axis = lay.axis + rank - len(_shape(tensor_arg))
    lay = lay.shifted(axis)
    const = _const(other)
    if const is None:
        other_shape = _shape(other)
        oaxis = axis - (rank - len(other_shape))
        if other_shape and (oaxis < 0 or other_shape[oaxis] == 1):
            ctx.layout[var] = lay
            ctx.mark(lay, APPROXIMATE)
            return
        ctx.freeze(lay, f"{where}: combines channels with a tensor of unknown channels")
        return
    caxis = axis - (rank - const.ndim)
    per_channel = caxis >= 0 and const.shape[caxis] != 1
    if per_channel and const.shape[caxis] != lay.size:
        ctx.freeze(lay, f"{where}: constant does not broadcast over the channel axis")
        return
    ctx.layout[var] = lay
    if per_channel:
        ctx.add_site(var, Site("affine", 0 if const_left else 1, caxis, lay))
    if op in ("relax.maximum", "relax.minimum"):
        relu = op == "relax.maximum" and not per_channel and np.all(const == 0)
        ctx.mark(lay, HOMOGENEOUS if relu else APPROXIMATE, "relax.nn.relu" if relu else op)
        return
    if op == "relax.divide" and const_left:
        ctx.mark(lay, APPROXIMATE)
        return
    absorbed = (
        len(lay.segments) == 1
        and lay.segments[0].ppf == 1
        and ctx._affine_chain(tensor_arg, var, op, const, caxis, lay.size, const_left)
    )
    if per_channel and not absorbed:
        ctx.mark(lay, APPROXIMATE)  # a per-channel affine after the first nonlinearity


def _normalizes(ctx: Walker, var, call, where: str, axes) -> None:
    """A normalization over ``axes``: freezes channels it normalizes across, else passes
    them (not homogeneous: merges become approximate)."""
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    rank = len(_shape(call.args[0]))
    if lay.axis in [int(a) % rank for a in axes]:
        ctx.freeze(lay, f"{where}: normalizes across channels")
        return
    ctx.layout[var] = lay
    ctx.mark(lay, APPROXIMATE)


@rule("relax.nn.softmax", "relax.nn.log_softmax")
def softmax(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    _normalizes(ctx, var, call, where, [call.attrs.axis])


@rule("relax.nn.layer_norm")
def layer_norm(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    _normalizes(ctx, var, call, where, call.attrs.axes)


# ---- layout ops -------------------------------------------------------------------


@rule("relax.permute_dims")
def permute_dims(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    rank = len(_shape(call.args[0]))
    axes = call.attrs.axes
    axes = list(reversed(range(rank))) if axes is None else [int(x) for x in axes]
    ctx.layout[var] = lay.shifted(axes.index(lay.axis))


@rule("relax.reshape")
def reshape(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    old, new = _shape(call.args[0]), _shape(var)
    result = reshape_layout(old, new, lay)
    if isinstance(result, str):
        ctx.freeze(lay, f"{where}: {result}")
        return
    new_lay, unit = result
    if unit > 1:
        for seg in new_lay.segments:
            sp = ctx.space(seg)
            if sp.size % unit:
                ctx.freeze(
                    new_lay, f"{where}: {sp.size} channels do not split into blocks of {unit}"
                )
                return
            sp.unit = math.lcm(sp.unit, unit)
    ctx.layout[var] = new_lay
    if isinstance(call.args[1], relax.ShapeExpr):
        ctx.add_site(var, Site("shape", 1, new_lay.axis, new_lay))
    else:
        ctx.freeze(new_lay, f"{where}: reshape target is not a constant shape")


@rule("relax.concat")
def concat(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
    if fields is None:
        ctx.freeze(ctx.layout.get(call.args[0]), f"{where}: concat of a tuple variable")
        return
    rank = len(_shape(var))
    axis = int(call.attrs.axis) % rank
    lays = [ctx.layout.get(f) for f in fields]
    if all(x is None for x in lays):
        return
    if any(x is not None and x.axis != axis for x in lays):
        carried = [x for x in lays if x is not None]
        out = carried[0]
        if len(carried) == len(lays):
            for other in carried[1:]:
                out = ctx.couple(out, other, where) if out is not None else None
            if out is not None:
                ctx.layout[var] = out
            return
        for x in carried:
            ctx.freeze(x, f"{where}: concat along a non-channel axis with plain tensors")
        return
    segs, offset = [], 0
    for f, x in zip(fields, lays):
        if x is not None:
            segs += list(x.shifted(axis, offset).segments)
        offset += _shape(f)[axis]
    ctx.layout[var] = Layout(axis, offset, tuple(segs))


def _window_cuts(ctx: Walker, lay: Layout, bounds: list[int]) -> dict[int, set[int]] | str:
    """Feature cuts per root space so that every window boundary is a space boundary."""
    cuts: dict[int, set[int]] = {}
    for seg in lay.segments:
        for p in bounds:
            if seg.start < p < seg.stop:
                offset = Fraction(p - seg.start) / seg.ppf
                if offset.denominator != 1:
                    return "cuts through the positions of one channel"
                cuts.setdefault(ctx.find(seg.space), set()).add(seg.first + int(offset))
    return cuts


def _windows(ctx: Walker, arg, bounds: list[int], where: str) -> list[Layout] | None:
    """Layouts of the windows ``[bounds[k], bounds[k+1])`` of ``arg``'s channel axis."""
    lay = ctx.layout[arg]
    cuts = _window_cuts(ctx, lay, bounds)
    if isinstance(cuts, str):
        ctx.freeze(lay, f"{where}: {cuts}")
        return None
    if ctx.refine(cuts, where) is None:
        return None
    lay = ctx.layout[arg]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        win = lay.window(a, b)
        if isinstance(win, str):
            ctx.freeze(lay, f"{where}: {win}")
            return None
        out.append(win)
    return out


@rule("relax.split")
def split(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """Split along channels: each part holds whole sub-spaces (concat in reverse)."""
    data = call.args[0]
    lay = ctx.layout.get(data)
    if lay is None:
        return
    shape = _shape(data)
    axis = int(call.attrs.axis) % len(shape)
    spec = call.attrs.indices_or_sections
    size = shape[axis]
    if isinstance(spec, tvm.tirx.IntImm):
        n = int(spec)
        bounds = [size * k // n for k in range(n + 1)]
    else:
        bounds = [0, *[int(i) for i in spec], size]
    if lay.axis != axis:
        ctx.tuple_layouts[var] = [lay] * (len(bounds) - 1)
        return
    wins = _windows(ctx, data, bounds, where)
    if wins is None:
        return
    ctx.tuple_layouts[var] = wins
    ctx.add_site(var, Site("split", 0, axis, ctx.layout[data]))


@rule("relax.strided_slice")
def strided_slice(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """A unit-step slice of the channel axis keeps whole sub-spaces; other axes pass."""
    data = call.args[0]
    lay = ctx.layout.get(data)
    if lay is None:
        return
    shape = _shape(data)
    rank = len(shape)
    axes = [int(f.value) % rank for f in call.args[1].fields]
    if lay.axis not in axes:
        ctx.layout[var] = lay
        return
    k = axes.index(lay.axis)
    strides = call.args[4].fields if len(call.args) > 4 else None
    if strides is not None and int(strides[k].value) != 1:
        ctx.freeze(lay, f"{where}: a strided slice of the channel axis")
        return
    size = shape[lay.axis]
    begin = int(call.args[2].fields[k].value)
    end = int(call.args[3].fields[k].value)
    begin = min(max(begin + size if begin < 0 else begin, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    if end <= begin:
        ctx.freeze(lay, f"{where}: an empty slice of the channel axis")
        return
    wins = _windows(ctx, data, [0, begin, end, size], where)
    if wins is None:
        return
    ctx.layout[var] = wins[1]
    ctx.add_site(var, Site("slice", 0, lay.axis, ctx.layout[data]))


@rule("relax.image.resize2d")
def resize2d(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """Resizing is spatial: the channel axis passes (linear, so merges survive it)."""
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    if call.attrs.layout != "NCHW" or lay.axis != 1:
        ctx.freeze(lay, f"{where}: resize layout is not NCHW over channels on axis 1")
        return
    ctx.layout[var] = lay


@rule("relax.squeeze")
def squeeze(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """Removing unit axes moves the channel axis left."""
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    shape = _shape(call.args[0])
    axes = call.attrs.axis
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else axes
    axes = [int(a) % len(shape) for a in axes]
    if lay.axis in axes:
        ctx.freeze(lay, f"{where}: squeezes the channel axis")
        return
    ctx.layout[var] = lay.shifted(lay.axis - sum(a < lay.axis for a in axes))


@rule("relax.expand_dims")
def expand_dims(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """Inserting unit axes moves the channel axis right."""
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    rank = len(_shape(var))
    inserted = sorted(int(a) % rank for a in call.attrs.axis)
    kept = [i for i in range(rank) if i not in inserted]
    ctx.layout[var] = lay.shifted(kept[lay.axis])


@rule("relax.nn.conv2d_transpose")
def conv2d_transpose(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """A transposed conv (IOHW weight) reads channels on axis 0 and makes them on axis 1.

    As a consumer, a removed input's constant mean reaches an output position through
    ``kh*kw / (sh*sw)`` taps on average: the compensation scales each tap by ``1/(sh*sw)``.
    """
    data, weight = call.args
    a = call.attrs
    w = _const(weight)
    lay = ctx.layout.get(data)
    if w is None or a.data_layout != "NCHW" or a.kernel_layout != "IOHW":
        ctx.freeze(lay, f"{where}: only NCHW/IOHW conv2d_transpose with a constant weight")
        return
    flops = LinearOp(var, call, "conv2d_transpose").flops
    if int(a.groups) != 1:
        ctx.freeze(lay, f"{where}: grouped conv2d_transpose (groups={int(a.groups)})")
        ctx.ops.append(OpCost(var, "conv2d_transpose", flops, ()))
        return
    if lay is not None and lay.axis != 1:
        ctx.freeze(lay, f"{where}: channels are not on the conv's channel axis")
        lay = None
    if lay is not None:
        taps = 1.0 / float(np.prod([int(s) for s in a.strides]))
        ctx.add_site(var, Site("consumer", 1, 0, lay, 1, taps))
    ctx._produce(var, 1, 1, 1, w.shape[1], w, "conv2d_transpose")
    axes = tuple(x for x in (lay, ctx.layout[var]) if x is not None)
    ctx.ops.append(OpCost(var, "conv2d_transpose", flops, axes))


@rule("relax.nn.pad")
def pad(ctx: Walker, var: relax.Var, call: relax.Call, where: str) -> None:
    """Spatial padding passes the channel axis; a non-zero pad value is not homogeneous."""
    lay = ctx.layout.get(call.args[0])
    if lay is None:
        return
    width = [int(w) for w in call.attrs.pad_width]
    if width[2 * lay.axis] or width[2 * lay.axis + 1]:
        ctx.freeze(lay, f"{where}: pads the channel axis")
        return
    if call.attrs.pad_mode != "constant":
        ctx.freeze(lay, f"{where}: {call.attrs.pad_mode} padding")
        return
    ctx.layout[var] = lay
    if float(call.attrs.pad_value) != 0.0:
        ctx.mark(lay, APPROXIMATE, call.op.name)
