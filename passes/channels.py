"""Channel-group analysis of a normalized Relax function.

Follows the channel axis of every producer (``conv2d`` with ``groups=1``, ``matmul`` with a
constant weight) through the graph (DESIGN.md, "Graph rules") and records, per group of
coupled channels (a *space*), every place a rewrite must edit:

- producer sites: the weight axis that creates the channels (rows to drop);
- affine sites: per-channel constants on the way (bias add, BatchNorm parameters,
  depthwise-conv filters, whose ``groups`` attribute shrinks with them);
- consumer sites: the weight axis that reads the channels (columns to drop and fold merges
  into);
- shape sites: reshape targets whose channel axis shrinks.

A tensor carries at most one channel axis, described by a :class:`Layout`: which positions
of that axis belong to which space, and how many positions one feature occupies (``ppf``:
``H*W`` after a flatten, ``1/d_head`` on the head axis of an attention reshape). Residual
adds and elementwise products of two channel-carrying tensors couple their spaces
(union-find); concat places spaces at offsets; an attention reshape makes a space's prunable
unit a whole head. Any use the analysis does not understand freezes the spaces involved,
with the reason, and so does reaching the function's output. Nothing is guessed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import tvm
from tvm import relax

from .importer import node_of

log = logging.getLogger(__name__)

# How a nonlinearity treats a merge ``a_j ~= c a_i`` (DESIGN.md, "Channel states").
LINEAR, HOMOGENEOUS, ODD, APPROXIMATE = "linear", "homogeneous", "odd", "approximate"
_MERGE_ORDER = {LINEAR: 0, HOMOGENEOUS: 1, ODD: 2, APPROXIMATE: 3}

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


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, start + features * ppf)`` of an axis hold the features of ``space``."""

    space: int
    start: int
    features: int
    ppf: Fraction  # positions per feature

    @property
    def stop(self) -> int:
        return self.start + int(self.features * self.ppf)

    def positions(self, features: np.ndarray) -> np.ndarray:
        """Axis positions occupied by ``features`` (whole positions; needs unit alignment)."""
        f = np.asarray(features, dtype=np.int64)
        if self.ppf >= 1:
            k = int(self.ppf)
            return (self.start + f[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        fpp = int(1 / self.ppf)
        return np.unique(self.start + f // fpp)


@dataclass(frozen=True)
class Layout:
    """Where channels live in one tensor: ``segments`` on axis ``axis`` of length ``size``."""

    axis: int
    size: int
    segments: tuple[Segment, ...]

    def shifted(self, axis: int, offset: int = 0, size: int | None = None) -> Layout:
        segs = tuple(Segment(s.space, s.start + offset, s.features, s.ppf) for s in self.segments)
        return Layout(axis, self.size if size is None else size, segs)


@dataclass(frozen=True)
class Site:
    """One edit of one binding: slice ``arg``'s ``axis`` by the positions of ``layout``."""

    role: str  # "producer" | "affine" | "consumer" | "shape" | "depthwise"
    arg: int
    axis: int
    layout: Layout
    out_axis: int = -1  # consumers: the weight axis of the output channels


@dataclass
class Producer:
    """A channel-creating op and the per-channel affine chain that follows it."""

    var: relax.Var
    op: str
    weight: np.ndarray  # rows are the output features
    bias: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    kernel: int  # columns per input channel of a filter as a matrix (kh*kw; K for dense)
    bn_mean: np.ndarray | None = None  # distribution of the chain's output when a BN is in it
    bn_std: np.ndarray | None = None


@dataclass
class Space:
    """A set of coupled channels: pruned together, unit by unit."""

    id: int
    size: int
    unit: int = 1
    producers: list[Producer] = field(default_factory=list)
    merge: str = LINEAR
    acts: set[str] = field(default_factory=set)  # nonlinear ops the channels pass through
    frozen: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return self.size // self.unit


@dataclass(frozen=True)
class OpCost:
    """FLOPs of one conv/matmul: ``flops * prod(kept fraction of each axis in axes)``."""

    var: relax.Var
    op: str
    flops: float
    axes: tuple[Layout, ...]


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels` (spaces are roots after every union)."""

    func: relax.Function
    spaces: list[Space]
    sites: dict[relax.Var, list[Site]]
    ops: list[OpCost]
    root: dict[int, int]

    def space_of(self, segment: Segment) -> Space:
        return self.spaces_by_id[self.root[segment.space]]

    @property
    def spaces_by_id(self) -> dict[int, Space]:
        return {s.id: s for s in self.spaces}

    def prunable(self) -> list[Space]:
        return [s for s in self.spaces if not s.frozen and s.producers]


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _shape(expr) -> list:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return []
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in ty.shape.values]


def _static_size(shape: list) -> int | None:
    return int(np.prod(shape)) if all(isinstance(v, int) for v in shape) else None


class _Walker:
    """One pass over the bindings, building spaces, sites and layouts."""

    def __init__(self, func: relax.Function, name: str):
        self.func = func
        self.name = name
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.layout: dict[relax.Var, Layout] = {}
        self.sites: dict[relax.Var, list[Site]] = {}
        self.ops: list[OpCost] = []
        self.chain: dict[relax.Var, Producer] = {}  # open affine chains by tensor
        self.uses: dict[relax.Var, int] = {}
        self.tuples: dict[relax.Var, relax.Var] = {}  # batch_norm tuple var -> its input

    # ---- union-find -------------------------------------------------------------------
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def new_space(self, size: int) -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size))
        self.parent.append(sid)
        return sid

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        keep, gone = self.spaces[ra], self.spaces[rb]
        self.parent[rb] = ra
        keep.unit = math.lcm(keep.unit, gone.unit)
        keep.producers += gone.producers
        keep.frozen += gone.frozen
        keep.acts |= gone.acts
        keep.merge = max(keep.merge, gone.merge, key=_MERGE_ORDER.__getitem__)

    def space(self, seg: Segment) -> Space:
        return self.spaces[self.find(seg.space)]

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for seg in layout.segments:
            sp = self.space(seg)
            if reason not in sp.frozen:
                sp.frozen.append(reason)

    def mark(self, layout: Layout | None, merge: str, op: str = "") -> None:
        if layout is None:
            return
        for seg in layout.segments:
            sp = self.space(seg)
            sp.merge = max(sp.merge, merge, key=_MERGE_ORDER.__getitem__)
            if op:
                sp.acts.add(op)

    def add_site(self, var: relax.Var, site: Site) -> None:
        self.sites.setdefault(var, []).append(site)

    def couple(self, a: Layout, b: Layout, where: str) -> Layout | None:
        """Union two layouts position by position; None (and frozen) if they differ."""
        same = a.axis == b.axis and a.size == b.size and len(a.segments) == len(b.segments)
        same = same and all(
            (x.start, x.features, x.ppf) == (y.start, y.features, y.ppf)
            for x, y in zip(a.segments, b.segments)
        )
        if not same:
            reason = f"{where}: combines tensors whose channels are laid out differently"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return None
        for x, y in zip(a.segments, b.segments):
            self.union(x.space, y.space)
        return a

    # ---- walk -------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        bindings = [b for block in self.func.body.blocks for b in block.bindings]
        for b in bindings:
            relax.analysis.post_order_visit(b.value, self._count_use)
        for b in bindings:
            where = f"binding '{b.var.name}'"
            if isinstance(b, relax.VarBinding):
                self.visit(b.var, b.value, where)
            else:
                for v in _vars_in(b.value):
                    self.freeze(self.layout.get(v), f"{where}: match_cast is not understood")
        for v in _vars_in(self.func.body.body):
            self.freeze(self.layout.get(v), "channels reach the function output")
        roots = sorted({self.find(i) for i in range(len(self.spaces))})
        root = {i: self.find(i) for i in range(len(self.spaces))}
        return ChannelAnalysis(
            self.func, [self.spaces[r] for r in roots], self.sites, self.ops, root
        )

    def _count_use(self, expr) -> None:
        if isinstance(expr, relax.Var):
            self.uses[expr] = self.uses.get(expr, 0) + 1

    def visit(self, var: relax.Var, value, where: str) -> None:
        if isinstance(value, relax.Var):
            if value in self.layout:
                self.layout[var] = self.layout[value]
            return
        if isinstance(value, relax.TupleGetItem):
            src = value.tuple_value
            if src in self.tuples and value.index == 0 and self.tuples[src] in self.layout:
                self.layout[var] = self.layout[self.tuples[src]]
                self._chain_step(self.tuples[src], var)
            elif src in self.tuples and value.index != 0:
                self.freeze(
                    self.layout.get(self.tuples[src]), f"{where}: uses batch-norm statistics"
                )
            return
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
            for v in _vars_in(value):
                self.freeze(
                    self.layout.get(v), f"{where}: {type(value).__name__} is not understood"
                )
            return
        op = value.op.name
        where = f"{where} ({op})"
        handler = _HANDLERS.get(op)
        if handler is None:
            if op in _UNARY:
                handler = _Walker.unary
            elif op in _BINARY:
                handler = _Walker.binary
            elif op in _POOL2D:
                handler = _Walker.pool2d
            elif op in _REDUCE:
                handler = _Walker.reduce
        if handler is None:
            for v in _vars_in(value):
                self.freeze(self.layout.get(v), f"{where}: op is not understood")
            return
        handler(self, var, value, where)

    # ---- producers & consumers --------------------------------------------------------
    def _produce(
        self,
        var,
        weight_arg: int,
        w_axis: int,
        out_axis: int,
        out_size: int,
        weight: np.ndarray,
        op: str,
    ) -> None:
        sid = self.new_space(out_size)
        seg = Segment(sid, 0, out_size, Fraction(1))
        layout = Layout(out_axis, out_size, (seg,))
        rows = np.moveaxis(weight, w_axis, 0).reshape(out_size, -1).astype(np.float64)
        kernel = int(np.prod(weight.shape[2:])) if op == "conv2d" else rows.shape[1]
        prod = Producer(
            var, op, rows, np.zeros(out_size), np.ones(out_size), np.zeros(out_size), kernel
        )
        self.spaces[sid].producers.append(prod)
        self.layout[var] = layout
        self.chain[var] = prod
        self.add_site(var, Site("producer", weight_arg, w_axis, layout))

    def _consume(self, var, data_layout, weight_arg, w_axis, out_axis) -> None:
        self.add_site(var, Site("consumer", weight_arg, w_axis, data_layout, out_axis))

    def conv2d(self, var, call, where):
        data, weight = call.args
        a = call.attrs
        w = _const(weight)
        lay = self.layout.get(data)
        if w is None or a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
            self.freeze(lay, f"{where}: only NCHW/OIHW conv2d with a constant weight is handled")
            return
        if a.out_layout not in ("NCHW", ""):
            self.freeze(lay, f"{where}: out_layout {a.out_layout} is not handled")
            return
        out_shape = _shape(var)
        in_ch = _shape(data)[1]
        groups = int(a.groups)
        spatial = _static_size(out_shape[2:]) or 1
        batch = out_shape[0] if isinstance(out_shape[0], int) else 1
        flops = 2.0 * batch * spatial * w.size
        if lay is not None and lay.axis != 1:
            self.freeze(lay, f"{where}: channels are not on the conv's channel axis")
            lay = None
        if groups == 1:
            if lay is not None:
                self._consume(var, lay, 1, 1, 0)
            self._produce(var, 1, 0, 1, w.shape[0], w, "conv2d")
            self.ops.append(
                OpCost(
                    var, "conv2d", flops, tuple(x for x in (lay, self.layout[var]) if x is not None)
                )
            )
            return
        if groups == in_ch == w.shape[0]:  # depthwise, one filter per channel
            self.ops.append(OpCost(var, "conv2d", flops, (lay,) if lay else ()))
            if lay is not None:
                self.add_site(var, Site("depthwise", 1, 0, lay))
                self.layout[var] = lay
                self.mark(lay, APPROXIMATE)  # each channel gets its own spatial filter
            return
        self.freeze(lay, f"{where}: grouped conv (groups={groups}) is not handled yet")
        self.ops.append(OpCost(var, "conv2d", flops, ()))

    def matmul(self, var, call, where):
        x, w_expr = call.args
        w = _const(w_expr)
        lx = self.layout.get(x)
        out_shape = _shape(var)
        rank = len(out_shape)
        if w is not None and w.ndim == 2:
            rows = _static_size([d for d in out_shape[:-1] if isinstance(d, int)]) or 1
            flops = 2.0 * rows * w.size
            if lx is not None and lx.axis != len(_shape(x)) - 1:
                self.freeze(lx, f"{where}: channels are not on the contracted axis")
                lx = None
            if lx is not None:
                self._consume(var, lx, 1, 0, 1)
            self._produce(var, 1, 1, rank - 1, w.shape[1], w, "matmul")
            self.ops.append(
                OpCost(
                    var, "matmul", flops, tuple(v for v in (lx, self.layout[var]) if v is not None)
                )
            )
            return
        if _const(x) is not None or w is not None:
            self.freeze(
                self.layout.get(x) or self.layout.get(w_expr),
                f"{where}: constant left operand or non-2-D weight",
            )
            return
        # activation x activation (attention): channels may only sit on batch axes
        lw = self.layout.get(w_expr)
        k = _shape(x)[-1]
        flops = (
            2.0
            * (_static_size([d if isinstance(d, int) else 1 for d in out_shape]) or 0)
            * (k if isinstance(k, int) else 1)
        )
        out = None
        for lay, operand_rank in ((lx, len(_shape(x))), (lw, len(_shape(w_expr)))):
            if lay is None:
                continue
            offset = rank - operand_rank
            if lay.axis >= operand_rank - 2:
                self.freeze(lay, f"{where}: channels on a matrix axis of an activation product")
                return
            shifted = lay.shifted(lay.axis + offset)
            out = shifted if out is None else self.couple(out, shifted, where)
            if out is None:
                return
        if out is not None:
            self.layout[var] = out
            self.mark(out, APPROXIMATE)
        self.ops.append(OpCost(var, "matmul", flops, (out,) if out is not None else ()))

    # ---- per-channel ops ----------------------------------------------------------------
    def _chain_step(self, src, dst, scale=None, shift=None, bn=None) -> bool:
        """Extend the open affine chain of ``src`` to ``dst``; False if there is none.

        A chain is open from a producer's output through single-use per-channel affine ops
        up to the first nonlinearity; ``bn`` is the ``(mean, std)`` a BatchNorm gives its
        output.
        """
        prod = self.chain.get(src)
        if prod is None or self.uses.get(src, 0) != 1:
            return False
        if scale is not None:
            prod.scale = prod.scale * scale
            prod.shift = prod.shift * scale
            if prod.bn_mean is not None:
                prod.bn_mean, prod.bn_std = prod.bn_mean * scale, prod.bn_std * np.abs(scale)
        if shift is not None:
            prod.shift = prod.shift + shift
            if prod.bn_mean is not None:
                prod.bn_mean = prod.bn_mean + shift
        if bn is not None:
            prod.bn_mean, prod.bn_std = bn
        self.chain[dst] = prod
        return True

    def batch_norm(self, var, call, where):
        data = call.args[0]
        lay = self.layout.get(data)
        if lay is None:
            return
        params = [_const(a) for a in call.args[1:5]]
        if any(p is None for p in params) or int(call.attrs.axis) != lay.axis:
            self.freeze(lay, f"{where}: batch_norm with non-constant parameters or other axis")
            return
        for i in range(1, 5):
            self.add_site(var, Site("affine", i, 0, lay))
        self.tuples[var] = data
        gamma, beta, mean, variance = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(variance + float(call.attrs.epsilon))
        if not self._chain_step(
            data, data, scale=scale, shift=beta - mean * scale, bn=(beta, np.abs(gamma))
        ):
            self.mark(lay, APPROXIMATE)  # a per-channel affine after the first nonlinearity

    def unary(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        self.layout[var] = lay
        self.mark(lay, _UNARY[call.op.name], call.op.name)
        if _UNARY[call.op.name] == LINEAR and call.op.name != "relax.negative":
            self._chain_step(call.args[0], var)

    def pool2d(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        if getattr(call.attrs, "layout", "NCHW") != "NCHW" or lay.axis != 1:
            self.freeze(lay, f"{where}: pooling layout is not NCHW over channels on axis 1")
            return
        self.layout[var] = lay
        self.mark(lay, _POOL2D[call.op.name], call.op.name)

    def reduce(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        rank = len(_shape(call.args[0]))
        axes = call.attrs.axis
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        if lay.axis in axes:
            self.freeze(lay, f"{where}: reduces over the channel axis")
            return
        new_axis = lay.axis if call.attrs.keepdims else lay.axis - sum(a < lay.axis for a in axes)
        self.layout[var] = lay.shifted(new_axis)
        if call.op.name in ("relax.max", "relax.min"):
            self.mark(lay, APPROXIMATE)

    def binary(self, var, call, where):
        a, b = call.args
        la, lb = self.layout.get(a), self.layout.get(b)
        out_shape = _shape(var)
        rank = len(out_shape)
        op = call.op.name
        if la is None and lb is None:
            return
        if la is not None and lb is not None:
            la2 = la.shifted(la.axis + rank - len(_shape(a)))
            lb2 = lb.shifted(lb.axis + rank - len(_shape(b)))
            out = self.couple(la2, lb2, where)
            if out is not None:
                self.layout[var] = out
                if op in ("relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"):
                    self.mark(out, APPROXIMATE)
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
                self.layout[var] = lay
                self.mark(lay, APPROXIMATE)
                return
            self.freeze(lay, f"{where}: combines channels with a tensor of unknown channels")
            return
        caxis = axis - (rank - const.ndim)
        per_channel = caxis >= 0 and const.shape[caxis] != 1
        if per_channel and const.shape[caxis] != lay.size:
            self.freeze(lay, f"{where}: constant does not broadcast over the channel axis")
            return
        self.layout[var] = lay
        if per_channel:
            self.add_site(var, Site("affine", 0 if const_left else 1, caxis, lay))
        if op in ("relax.maximum", "relax.minimum"):
            relu = op == "relax.maximum" and not per_channel and np.all(const == 0)
            self.mark(lay, HOMOGENEOUS if relu else APPROXIMATE, "relax.nn.relu" if relu else op)
            return
        if op == "relax.divide" and const_left:
            self.mark(lay, APPROXIMATE)
            return
        absorbed = (
            len(lay.segments) == 1
            and lay.segments[0].ppf == 1
            and self._affine_chain(tensor_arg, var, op, const, caxis, lay.size, const_left)
        )
        if per_channel and not absorbed:
            self.mark(lay, APPROXIMATE)  # a per-channel affine after the first nonlinearity

    def _affine_chain(self, src, dst, op, const, caxis, size, const_left) -> bool:
        if caxis >= 0 and const.shape[caxis] != 1:
            vec = np.moveaxis(const, caxis, 0).reshape(size, -1)[:, 0].astype(np.float64)
        else:
            vec = np.full(size, float(const.reshape(-1)[0]))
        if op == "relax.add":
            return self._chain_step(src, dst, shift=vec)
        if op == "relax.subtract":
            if const_left:
                return self._chain_step(src, dst, scale=-np.ones(size), shift=vec)
            return self._chain_step(src, dst, shift=-vec)
        if op == "relax.multiply":
            return self._chain_step(src, dst, scale=vec)
        return self._chain_step(src, dst, scale=1.0 / vec)

    def softmax(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        rank = len(_shape(call.args[0]))
        if int(call.attrs.axis) % rank == lay.axis:
            self.freeze(lay, f"{where}: normalizes across channels")
            return
        self.layout[var] = lay
        self.mark(lay, APPROXIMATE)

    def layer_norm(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        rank = len(_shape(call.args[0]))
        if lay.axis in [int(a) % rank for a in call.attrs.axes]:
            self.freeze(lay, f"{where}: normalizes across channels")
            return
        self.layout[var] = lay
        self.mark(lay, APPROXIMATE)

    # ---- layout ops -------------------------------------------------------------------
    def permute_dims(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        rank = len(_shape(call.args[0]))
        axes = call.attrs.axes
        axes = list(reversed(range(rank))) if axes is None else [int(x) for x in axes]
        self.layout[var] = lay.shifted(axes.index(lay.axis))

    def reshape(self, var, call, where):
        lay = self.layout.get(call.args[0])
        if lay is None:
            return
        old, new = _shape(call.args[0]), _shape(var)
        result = _reshape_layout(old, new, lay)
        if isinstance(result, str):
            self.freeze(lay, f"{where}: {result}")
            return
        new_lay, unit = result
        if unit > 1:
            for seg in new_lay.segments:
                sp = self.space(seg)
                if sp.size % unit:
                    self.freeze(
                        new_lay, f"{where}: {sp.size} channels do not split into blocks of {unit}"
                    )
                    return
                sp.unit = math.lcm(sp.unit, unit)
        self.layout[var] = new_lay
        if isinstance(call.args[1], relax.ShapeExpr):
            self.add_site(var, Site("shape", 1, new_lay.axis, new_lay))
        else:
            self.freeze(new_lay, f"{where}: reshape target is not a constant shape")

    def concat(self, var, call, where):
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
        if fields is None:
            self.freeze(self.layout.get(call.args[0]), f"{where}: concat of a tuple variable")
            return
        rank = len(_shape(var))
        axis = int(call.attrs.axis) % rank
        lays = [self.layout.get(f) for f in fields]
        if all(x is None for x in lays):
            return
        if any(x is not None and x.axis != axis for x in lays):
            carried = [x for x in lays if x is not None]
            out = carried[0]
            if len(carried) == len(lays):
                for other in carried[1:]:
                    out = self.couple(out, other, where) if out is not None else None
                if out is not None:
                    self.layout[var] = out
                return
            for x in carried:
                self.freeze(x, f"{where}: concat along a non-channel axis with plain tensors")
            return
        segs, offset = [], 0
        for f, x in zip(fields, lays):
            if x is not None:
                segs += list(x.shifted(axis, offset).segments)
            offset += _shape(f)[axis]
        self.layout[var] = Layout(axis, offset, tuple(segs))


def _vars_in(expr) -> list[relax.Var]:
    found: list[relax.Var] = []
    relax.analysis.post_order_visit(
        expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None
    )
    return found


def _reshape_layout(old: list, new: list, lay: Layout) -> tuple[Layout, int] | str:
    """Map ``lay`` through a reshape ``old -> new``; a reason string when it cannot."""
    groups = _reshape_groups(old, new)
    if groups is None:
        return "reshape with symbolic dims that do not line up"
    for olds, news in groups:
        if lay.axis not in olds:
            continue
        sizes_old = [old[i] for i in olds]
        sizes_new = [new[i] for i in news]
        if len(olds) == 1 and len(news) == 1:
            return lay.shifted(news[0], size=sizes_new[0]), 1
        pos = olds.index(lay.axis)
        outer = _prod(sizes_old[:pos])
        inner = _prod(sizes_old[pos + 1 :])
        if len(news) == 1:  # merge: each channel position becomes a block of `inner`
            if outer != 1:
                return "reshape merges the channel axis with an outer axis"
            segs = tuple(
                Segment(s.space, s.start * inner, s.features, s.ppf * inner) for s in lay.segments
            )
            return Layout(news[0], lay.size * inner, segs), 1
        if len(olds) == 1:  # split: the first non-trivial new axis indexes blocks of `q`
            lead = next(i for i, n in enumerate(sizes_new) if n != 1)
            q = _prod(sizes_new[lead + 1 :])
            segs = []
            unit = 1
            for s in lay.segments:
                if s.start % q or int(s.features * s.ppf) % q:
                    return "reshape splits the channel axis across segment boundaries"
                ppf = s.ppf / q
                if ppf < 1:
                    unit = math.lcm(unit, int(1 / ppf))
                segs.append(Segment(s.space, s.start // q, s.features, ppf))
            return Layout(news[lead], sizes_new[lead], tuple(segs)), unit
        return "reshape regroups the channel axis with others"
    return "reshape lost the channel axis"


def _prod(values) -> int:
    return int(np.prod(values)) if values else 1


def _reshape_groups(old: list, new: list) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes into aligned runs of axes with equal products (None if impossible).

    Symbolic dims must stand alone on both sides; size-1 axes at the end join the last run.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        if not isinstance(old[i], int) or not isinstance(new[j], int):
            if isinstance(old[i], int) or isinstance(new[j], int) or not old[i].same_as(new[j]):
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        oi, nj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            side_old = po < pn
            seq, k = (old, i) if side_old else (new, j)
            if k >= len(seq) or not isinstance(seq[k], int):
                return None
            if side_old:
                po *= old[i]
                oi.append(i)
                i += 1
            else:
                pn *= new[j]
                nj.append(j)
                j += 1
        groups.append((oi, nj))
    rest_old, rest_new = list(range(i, len(old))), list(range(j, len(new)))
    if any(old[k] != 1 for k in rest_old) or any(new[k] != 1 for k in rest_new):
        return None
    if groups:
        groups[-1][0].extend(rest_old)
        groups[-1][1].extend(rest_new)
    return groups


_HANDLERS = {
    "relax.nn.conv2d": _Walker.conv2d,
    "relax.matmul": _Walker.matmul,
    "relax.nn.batch_norm": _Walker.batch_norm,
    "relax.permute_dims": _Walker.permute_dims,
    "relax.reshape": _Walker.reshape,
    "relax.concat": _Walker.concat,
    "relax.nn.softmax": _Walker.softmax,
    "relax.nn.log_softmax": _Walker.softmax,
    "relax.nn.layer_norm": _Walker.layer_norm,
}


def analyze_channels(func: relax.Function, name: str = "model") -> ChannelAnalysis:
    """Channel spaces, edit sites and FLOPs of a normalized function (see module doc)."""
    result = _Walker(func, name).run()
    for sp in result.spaces:
        if sp.frozen and sp.producers:
            log.debug("%s: group of %s frozen: %s", name, sp.producers[0].var.name, sp.frozen[0])
    return result


def producer_names(func: relax.Function, names: Sequence[str] | None) -> dict:
    """Name every conv2d/matmul with a constant weight.

    The ONNX node a binding came from when the module was imported by :mod:`.importer`
    (bindings are named after nodes); else ``names`` in graph order if given; else ``op_k``.
    """
    ops = []
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if (
                isinstance(v, relax.Call)
                and isinstance(v.op, tvm.ir.Op)
                and v.op.name in ("relax.nn.conv2d", "relax.matmul")
                and isinstance(v.args[1], tvm.ir.GenericConst)
            ):
                ops.append((b.var, "conv" if v.op.name == "relax.nn.conv2d" else "matmul"))
    nodes = [node_of(var.name) for var, _ in ops]
    if all(nodes) and len(set(nodes)) == len(nodes):
        return {var: node for (var, _), node in zip(ops, nodes)}
    if names is not None and len(names) != len(ops):
        log.warning(
            "%d operator names given for %d conv/matmul ops; using generic names",
            len(names),
            len(ops),
        )
        names = None
    if names is None:
        names = [f"{kind}_{i}" for i, (_, kind) in enumerate(ops)]
    return {var: name for (var, _), name in zip(ops, names)}
