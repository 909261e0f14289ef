"""Channel-group analysis of a normalized Relax function: the walker and its results.

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

The walker owns the bookkeeping (union-find over spaces, freezing, sites, open affine
chains); what each op does to the channel axis is a *rule*, one function per op registered
with :func:`rule` in :mod:`.rules`. An op without a rule freezes every space it touches,
naming the op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import tvm
from tvm import relax

from ..importer import node_of
from ..ops import linear_ops
from .layout import Layout, Segment

log = logging.getLogger(__name__)

# How a nonlinearity treats a merge ``a_j ~= c a_i`` (DESIGN.md, "Channel states").
LINEAR, HOMOGENEOUS, ODD, APPROXIMATE = "linear", "homogeneous", "odd", "approximate"
_MERGE_ORDER = {LINEAR: 0, HOMOGENEOUS: 1, ODD: 2, APPROXIMATE: 3}


@dataclass(frozen=True)
class Site:
    """One edit of one binding: slice ``arg``'s ``axis`` by the positions of ``layout``."""

    role: str  # "producer" | "affine" | "consumer" | "shape" | "depthwise" | "split" | "slice"
    arg: int
    axis: int
    layout: Layout
    out_axis: int = -1  # consumers: the weight axis of the output channels
    tap_scale: float = 1.0  # consumers: kernel taps that reach one output position, per tap


@dataclass
class Producer:
    """A channel-creating op and the per-channel affine chain that follows it."""

    var: relax.Var
    op: str
    weight: np.ndarray  # rows are the output features (the constant's dtype, often a view)
    bias: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    kernel: int  # columns per input channel of a filter as a matrix (kh*kw; K for dense)
    bn_mean: np.ndarray | None = None  # distribution of the chain's output when a BN is in it
    bn_std: np.ndarray | None = None
    rows: tuple[int, int] | None = None  # the op's output rows these are (after a split)

    def piece(self, a: int, b: int) -> Producer:
        """The producer of features ``[a, b)`` of this one (a space cut by a split)."""
        base = self.rows[0] if self.rows else 0

        def cut(x):
            return None if x is None else x[a:b].copy()

        return Producer(
            self.var,
            self.op,
            self.weight[a:b].copy(),
            self.bias[a:b].copy(),
            self.scale[a:b].copy(),
            self.shift[a:b].copy(),
            self.kernel,
            cut(self.bn_mean),
            cut(self.bn_std),
            (base + a, base + b),
        )


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
    refined: bool = False  # cut into sub-spaces by a split; holds nothing any more

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
    spaces_by_id: dict[int, Space] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.spaces_by_id = {s.id: s for s in self.spaces}

    def space_of(self, segment: Segment) -> Space:
        return self.spaces_by_id[self.root[segment.space]]

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


Rule = Callable[["Walker", relax.Var, relax.Call, str], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    """Register ``fn(walker, var, call, where)`` as the channel rule of the Relax ``ops``.

    A rule reads the layouts of the call's arguments (``walker.layout``), sets the layout of
    ``var``, and records edit sites, couplings, merge classes or freezes. Registering an op
    twice is an error.
    """

    def register(fn: Rule) -> Rule:
        taken = [op for op in ops if op in RULES]
        if taken:
            raise ValueError(f"channel rule for {', '.join(taken)} registered twice")
        for op in ops:
            RULES[op] = fn
        return fn

    return register


class Walker:
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
        self.tuple_layouts: dict[relax.Var, list] = {}  # tuple var -> layout of each field

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
        """Union two layouts position by position; None (and frozen) if they differ.

        When both hold whole channels (``ppf == 1``) on the same axis but are cut into
        segments at different places (one side split into groups, the other not), both are
        first cut at the union of their boundaries.
        """

        def same(x: Layout, y: Layout) -> bool:
            ok = x.axis == y.axis and x.size == y.size and len(x.segments) == len(y.segments)
            return ok and all(
                (p.start, p.features, p.ppf, p.first) == (q.start, q.features, q.ppf, q.first)
                for p, q in zip(x.segments, y.segments)
            )

        if not same(a, b) and a.axis == b.axis and a.size == b.size:
            whole = all(s.ppf == 1 for s in a.segments + b.segments)
            covered = all(sum(s.features for s in x.segments) == x.size for x in (a, b))
            if whole and covered:
                bounds = {s.start for s in a.segments + b.segments}
                cuts: dict[int, set[int]] = {}
                for lay in (a, b):
                    for seg in lay.segments:
                        for p in bounds:
                            if seg.start < p < seg.stop:
                                cuts.setdefault(self.find(seg.space), set()).add(
                                    seg.first + p - seg.start
                                )
                cut = self.refine(cuts, where)
                if cut is None:
                    return None
                a, b = cut(a), cut(b)
        if not same(a, b):
            reason = f"{where}: combines tensors whose channels are laid out differently"
            self.freeze(a, reason)
            self.freeze(b, reason)
            return None
        for x, y in zip(a.segments, b.segments):
            self.union(x.space, y.space)
        return a

    def refine(self, cuts: dict[int, set[int]], where: str):
        """Cut spaces into sub-spaces at feature indices (a split or slice of their channels).

        ``cuts`` maps a root space to the features where a new sub-space starts. Every
        layout, site and FLOPs axis that holds the space is rewritten to the sub-spaces,
        and every producer is cut row-wise, so the pieces prune independently (the q, k and
        v of a fused projection; the two halves of a C2f block). Returns the function that
        maps any layout to its cut form, or None (and the space frozen) when a cut falls
        inside a unit (a head).
        """
        pieces: dict[int, list[tuple[int, int, int]]] = {}
        for root, at in cuts.items():
            sp = self.spaces[root]
            bounds = sorted({0, sp.size, *at})
            if any(b % sp.unit for b in bounds):
                self.freeze_space(root, f"{where}: cuts through a unit of {sp.unit} channels")
                return None
            if len(bounds) <= 2:
                continue
            new = []
            for a, b in zip(bounds, bounds[1:]):
                sid = self.new_space(b - a)
                sub = self.spaces[sid]
                sub.unit, sub.merge = sp.unit, sp.merge
                sub.acts, sub.frozen = set(sp.acts), list(sp.frozen)
                sub.producers = [p.piece(a, b) for p in sp.producers]
                new.append((a, b, sid))
            for p in sp.producers:
                for var, open_p in list(self.chain.items()):
                    if open_p is p:
                        del self.chain[var]
            sp.producers = []
            sp.refined = True
            pieces[root] = new
        if not pieces:
            return lambda lay: lay

        def cut_layout(lay: Layout | None) -> Layout | None:
            if lay is None:
                return None
            segs = []
            for seg in lay.segments:
                parts = pieces.get(self.find(seg.space))
                if parts is None:
                    segs.append(seg)
                    continue
                lo, hi = seg.first, seg.first + seg.features
                for a, b, sid in parts:
                    x, y = max(a, lo), min(b, hi)
                    if x >= y:
                        continue
                    start = seg.start + (x - lo) * seg.ppf
                    segs.append(Segment(sid, int(start), y - x, seg.ppf, x - a))
            return Layout(lay.axis, lay.size, tuple(segs))

        self.layout = {v: cut_layout(lay) for v, lay in self.layout.items()}
        self.tuple_layouts = {
            v: [cut_layout(f) for f in fields] for v, fields in self.tuple_layouts.items()
        }
        self.sites = {
            v: [
                Site(st.role, st.arg, st.axis, cut_layout(st.layout), st.out_axis, st.tap_scale)
                for st in sites
            ]
            for v, sites in self.sites.items()
        }
        self.ops = [
            OpCost(op.var, op.op, op.flops, tuple(cut_layout(a) for a in op.axes))
            for op in self.ops
        ]
        return cut_layout

    def freeze_space(self, sid: int, reason: str) -> None:
        sp = self.spaces[self.find(sid)]
        if reason not in sp.frozen:
            sp.frozen.append(reason)

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
            for lay in self.tuple_layouts.get(v, []):
                self.freeze(lay, "channels reach the function output")
        roots = sorted(
            {self.find(i) for i in range(len(self.spaces)) if not self.spaces[i].refined}
        )
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
        if isinstance(value, relax.Tuple):
            self.tuple_layouts[var] = [
                self.layout.get(f) if isinstance(f, relax.Var) else None for f in value.fields
            ]
            return
        if isinstance(value, relax.TupleGetItem):
            src = value.tuple_value
            if src in self.tuple_layouts:
                fields = self.tuple_layouts[src]
                if value.index < len(fields) and fields[value.index] is not None:
                    self.layout[var] = fields[value.index]
                return
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
        handler = RULES.get(op)
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
        rows = np.moveaxis(weight, w_axis, 0).reshape(out_size, -1)  # a view where it can be
        kernel = int(np.prod(weight.shape[2:])) if op.startswith("conv2d") else rows.shape[1]
        prod = Producer(
            var, op, rows, np.zeros(out_size), np.ones(out_size), np.zeros(out_size), kernel
        )
        self.spaces[sid].producers.append(prod)
        self.layout[var] = layout
        self.chain[var] = prod
        self.add_site(var, Site("producer", weight_arg, w_axis, layout))

    def _consume(self, var, data_layout, weight_arg, w_axis, out_axis) -> None:
        self.add_site(var, Site("consumer", weight_arg, w_axis, data_layout, out_axis))

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


def _vars_in(expr) -> list[relax.Var]:
    found: list[relax.Var] = []
    relax.analysis.post_order_visit(
        expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None
    )
    return found


def analyze_channels(func: relax.Function, name: str = "model") -> ChannelAnalysis:
    """Channel spaces, edit sites and FLOPs of a normalized function (see module doc)."""
    result = Walker(func, name).run()
    for sp in result.spaces:
        if sp.frozen and sp.producers:
            log.debug("%s: group of %s frozen: %s", name, sp.producers[0].var.name, sp.frozen[0])
    return result


def producer_names(func: relax.Function, names: Sequence[str] | None) -> dict:
    """Name every conv2d/matmul with a constant weight.

    The ONNX node a binding came from when the module was imported by :mod:`.importer`
    (bindings are named after nodes); else ``names`` in graph order if given; else ``op_k``.
    """
    ops = [
        (op.var, "matmul" if op.kind == "matmul" else "conv")
        for op in linear_ops(func, constant_weight=True)
    ]
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
