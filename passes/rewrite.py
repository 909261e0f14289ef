"""Apply channel decisions to a normalized Relax function: slice, fold, re-emit.

Given the :class:`~.channels.ChannelAnalysis` sites and the decided
:class:`~tvm_qmfrg.plan.GroupPlan` of every pruned space, each edited binding is rebuilt:
constants sliced along their channel axes, consumer weights first receive the merges (or the
least-squares refit) of the pruned channels, reshape targets and depthwise ``groups`` shrink,
and a consumer whose inputs lost mean activation gets the compensation added to its output.
Every other binding is re-emitted unchanged, so Relax re-infers all shapes downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg.plan import GroupPlan

from .channels import ChannelAnalysis, Layout, Segment, Site
from .importer import bind_named

PRUNED_SUFFIX = "_pruned"  # a binding that then gets a compensation add keeps its name + this

log = logging.getLogger(__name__)


@dataclass
class _Edit:
    """Everything to change in one binding."""

    slices: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    folds: list[Site] = field(default_factory=list)  # consumer sites receiving merges
    shape: tuple[int, int] | None = None  # (axis, new size) of a reshape target
    groups: int | None = None  # new groups of a depthwise conv
    window: tuple[int, np.ndarray] | None = None  # (axis, kept positions) of a split / slice
    zero: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (arg, axis, kept)
    out_keep: np.ndarray | None = None  # kept output positions when the binding also produces


def _keep_positions(analysis: ChannelAnalysis, layout: Layout, decided: dict) -> np.ndarray | None:
    """Kept positions of a layout's axis, or None when nothing on it shrinks."""
    mask = np.ones(layout.size, dtype=bool)
    for seg in layout.segments:
        gp = decided.get(analysis.root[seg.space])
        if gp is None:
            continue
        kept = np.zeros(gp.units, dtype=bool)
        kept[gp.kept] = True
        dropped = [f for u in np.flatnonzero(~kept) for f in range(u * gp.unit, (u + 1) * gp.unit)]
        if dropped:
            mask[seg.positions(np.array(dropped))] = False
    return None if mask.all() else np.flatnonzero(mask)


def _fold_consumer(
    weight: np.ndarray, site: Site, analysis, decided, consumer: str
) -> tuple[np.ndarray, np.ndarray]:
    """Fold merges (or the refit of ``consumer``) into a consumer weight; also return the
    bias compensation.

    Merges ``a_p ~= c a_k``: ``V[:, k] += c V[:, p]``, and the output gains
    ``sum_p mu_p V[:, p]`` (summed over kernel taps) for the offsets. A refit
    ``x ~= R x_K + mu`` (every feature from the kept ones): ``V[:, k] = sum_f R[f, k] V[:, f]``
    and the output gains ``sum_f mu_f V[:, f]``.
    """
    w = np.moveaxis(weight.astype(np.float64), site.axis, 0).copy()
    out_axis = site.out_axis + 1 if site.out_axis < site.axis else site.out_axis
    taps = np.moveaxis(w, out_axis, 1).reshape(w.shape[0], w.shape[out_axis], -1).sum(axis=2)
    taps = taps * site.tap_scale
    bias = np.zeros(taps.shape[1])
    for seg in site.layout.segments:
        gp = decided.get(analysis.root[seg.space])
        if gp is None:
            continue
        u = gp.unit
        refit = next((rf for rf in gp.refits if rf.consumer == consumer), None)
        if refit is not None and seg.ppf >= 1 and seg.features == gp.channels:
            ppf = int(seg.ppf)
            every = np.arange(gp.channels)
            kept = np.array([f for k in gp.kept for f in range(k * u, (k + 1) * u)])
            bias += np.asarray(refit.mu, np.float64) @ taps[seg.positions(every)].reshape(
                gp.channels, ppf, -1
            ).sum(axis=1)
            wf = w[seg.positions(every)].reshape((gp.channels, ppf) + w.shape[1:])
            wk = np.tensordot(np.asarray(refit.r, np.float64), wf, axes=([0], [0]))
            w[seg.positions(kept)] = wk.reshape((-1,) + w.shape[1:])
            continue
        if seg.ppf >= 1 and seg.first == 0 and seg.features == gp.channels:
            _fold_merges(w, taps, bias, seg, gp)
            continue
        for f, mu in gp.offsets.items():
            bias += mu * taps[seg.positions(np.array([f]))].sum(axis=0)
        for j, i, c in gp.merges:
            pj = seg.positions(np.arange(j * u, (j + 1) * u))
            pi = seg.positions(np.arange(i * u, (i + 1) * u))
            w[pi] += c * w[pj]
    return np.moveaxis(w, 0, site.axis).astype(weight.dtype), bias


def _fold_merges(
    w: np.ndarray, taps: np.ndarray, bias: np.ndarray, seg: Segment, gp: GroupPlan
) -> None:
    """The offsets and merges of ``gp`` folded into ``w`` and ``bias`` (in place), for a
    segment holding every feature of the group with whole positions per feature: the
    positions of all units at once, and the same sums in the same order as one merge at a
    time (a merge reads a pruned unit and writes a kept one, so none reads another's write).
    """
    k, u = int(seg.ppf), gp.unit
    if gp.offsets:
        feats = np.fromiter(gp.offsets, np.int64, len(gp.offsets))
        mus = np.fromiter(gp.offsets.values(), np.float64, len(gp.offsets))
        per_feature = taps[seg.positions(feats)].reshape(feats.size, k, -1).sum(axis=1)
        for mu, row in zip(mus, per_feature):
            bias += mu * row
    if gp.merges:
        js, is_, cs = (np.array(col) for col in zip(*gp.merges))
        units = np.arange(u)
        pj = seg.positions((js[:, None] * u + units).reshape(-1)).reshape(js.size, u * k)
        pi = seg.positions((is_[:, None] * u + units).reshape(-1)).reshape(js.size, u * k)
        np.add.at(w, pi, cs.reshape((-1,) + (1,) * (w.ndim)) * w[pj])


def plan_edits(analysis: ChannelAnalysis, decided: dict, *, mask: bool = False) -> dict:
    """Per binding var, the :class:`_Edit` that realizes ``decided`` (space id -> GroupPlan).

    ``mask``: keep every shape; consumers get their folds and read zeros from the pruned
    positions instead (the same function as the pruned module, on the dense graph).
    """
    edits: dict = {}
    for var, sites in analysis.sites.items():
        edit = _Edit()
        for site in sites:
            keep = _keep_positions(analysis, site.layout, decided)
            if site.role == "consumer" and any(
                analysis.root[seg.space] in decided for seg in site.layout.segments
            ):  # a consumer of undecided groups only is left as it is
                edit.folds.append(site)
            if keep is None:
                continue
            if mask:
                if site.role == "consumer":
                    edit.zero.append((site.arg, site.axis, keep))
                continue
            if site.role == "shape":
                edit.shape = (site.axis, int(keep.size))
                continue
            if site.role in ("split", "slice"):
                edit.window = (site.axis, keep)
                continue
            edit.slices.setdefault(site.arg, []).append((site.axis, keep))
            if site.role == "depthwise":
                edit.groups = int(keep.size)
            if site.role == "producer":
                edit.out_keep = keep
        if edit.slices or edit.shape or edit.folds or edit.window is not None:
            edits[var] = edit
    return edits


class FoldCache:
    """The folded constants of each edited binding, kept between rewrites of one module
    with one kind of edits (all masked, or all pruned), so that a binding whose decisions
    did not change since the last rewrite is not folded again.

    A binding's constants depend only on the plans of the spaces its sites read or write
    (their kept units, merges and offsets, and the refit of that binding): the entry is
    reused while those are the same (a refit compared by identity: a new fit is a new
    :class:`~tvm_qmfrg.plan.Refit`). One entry per binding (the last one).
    """

    def __init__(self):
        self._entries: dict[str, tuple] = {}  # binding -> (key, refits held, consts, bias)

    @staticmethod
    def _key(analysis, sites: list[Site], decided: dict, binding: str) -> tuple[tuple, list]:
        spaces = sorted({analysis.root[seg.space] for s in sites for seg in s.layout.segments})
        key, held = [], []
        for space in spaces:
            gp = decided.get(space)
            if gp is None:
                key.append((space,))
                continue
            refit = next((rf for rf in gp.refits if rf.consumer == binding), None)
            held.append(refit)
            key.append(
                (
                    space,
                    gp.unit,
                    tuple(gp.kept),
                    tuple(gp.merges),
                    tuple(gp.offsets.items()),
                    None if refit is None else id(refit),
                )
            )
        return tuple(key), held

    def get(self, analysis, sites, decided, binding: str, make):
        """``make()`` (the binding's ``(consts, bias)``) or the entry it returned for the
        same decisions."""
        key, held = self._key(analysis, sites, decided, binding)
        entry = self._entries.get(binding)
        if entry is not None and entry[0] == key:
            return entry[2], entry[3]
        consts, bias = make()
        self._entries[binding] = (key, held, consts, bias)
        return consts, bias


def _new_consts(call: relax.Call, args: list, edit: _Edit, analysis, decided, consumer: str):
    """The edited constant arguments of ``call`` (by index) and its output bias."""
    arrays = {i: args[i].value.numpy() for i in edit.slices}
    bias = None
    for site in edit.folds:
        arr = arrays.get(site.arg, args[site.arg].value.numpy())
        arr, b = _fold_consumer(arr, site, analysis, decided, consumer)
        arrays[site.arg] = arr
        if np.any(b):
            bias = b if bias is None else bias + b
    for i, cuts in edit.slices.items():
        for axis, keep in cuts:
            arrays[i] = np.take(arrays[i], keep, axis=axis)
    for i, axis, keep in edit.zero:
        arr = arrays.get(i, args[i].value.numpy()).copy()
        gone = np.ones(arr.shape[axis], dtype=bool)
        gone[keep] = False
        index = [slice(None)] * arr.ndim
        index[axis] = gone
        arr[tuple(index)] = 0
        arrays[i] = arr
    consts = {i: relax.const(np.ascontiguousarray(arr)) for i, arr in arrays.items()}
    if bias is not None and edit.out_keep is not None:
        bias = bias[edit.out_keep]
    return consts, bias


def _new_call(call: relax.Call, args: list, edit: _Edit) -> relax.Expr:
    """The edited call, built from the already remapped ``args`` (edited constants in)."""
    name = call.op.name
    if edit.shape is not None:
        axis, size = edit.shape
        dims = list(args[1].values)
        dims[axis] = size
        return relax.op.reshape(args[0], relax.ShapeExpr(dims))
    if edit.window is not None and name == "relax.split":
        return _split(call, args, edit.window[1])
    if edit.window is not None and name == "relax.strided_slice":
        return _slice(call, args, *edit.window)
    if edit.groups is not None and name == "relax.nn.conv2d":
        a = call.attrs
        return relax.op.nn.conv2d(
            args[0],
            args[1],
            strides=a.strides,
            padding=a.padding,
            dilation=a.dilation,
            groups=edit.groups,
            data_layout=a.data_layout,
            kernel_layout=a.kernel_layout,
            out_layout=a.out_layout,
            out_dtype=a.out_dtype,
        )
    return relax.Call(call.op, args, call.attrs, call.ty_args)


def _split(call: relax.Call, args: list, keep: np.ndarray) -> relax.Expr:
    """The split with its boundaries moved to where the kept positions now end."""
    spec = call.attrs.indices_or_sections
    axis = int(call.attrs.axis)
    size = [int(d) for d in call.args[0].ty.shape.values][axis]
    if isinstance(spec, tvm.tirx.IntImm):
        n = int(spec)
        bounds = [size * k // n for k in range(1, n)]
    else:
        bounds = [int(i) for i in spec]
    new = [int(np.count_nonzero(keep < b)) for b in bounds]
    return relax.op.split(args[0], new, axis)


def _slice(call: relax.Call, args: list, axis: int, keep: np.ndarray) -> relax.Expr:
    """The slice with its begin/end on the channel ``axis`` counted in kept positions."""
    data = call.args[0]
    rank = len(data.ty.shape.values)
    n = int(data.ty.shape.values[axis])
    axes = [int(f.value) for f in call.args[1].fields]
    begin = [int(f.value) for f in call.args[2].fields]
    end = [int(f.value) for f in call.args[3].fields]
    strides = [int(f.value) for f in call.args[4].fields] if len(call.args) > 4 else None
    k = [a % rank for a in axes].index(axis)
    b = min(max(begin[k] + n if begin[k] < 0 else begin[k], 0), n)
    e = min(max(end[k] + n if end[k] < 0 else end[k], 0), n)
    begin[k], end[k] = int(np.count_nonzero(keep < b)), int(np.count_nonzero(keep < e))
    return relax.op.strided_slice(args[0], axes, begin, end, strides)


@relax.expr_functor.mutator
class Rewriter(relax.PyExprMutator):
    """Re-emit ``main`` with the edits applied (see module docstring)."""

    def __init__(self, mod: tvm.IRModule, edits: dict, analysis, decided, cache=None):
        super().__init__(mod)
        self.mod_ = mod
        self.edits = edits
        self.analysis = analysis
        self.decided = decided
        self.cache: FoldCache | None = cache  # the folds of earlier rewrites of ``mod``

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        edit = self.edits.get(binding.var)
        if edit is None:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        args = [self.visit_expr(a) for a in call.args]
        name = binding.var.name

        def make():
            return _new_consts(call, args, edit, self.analysis, self.decided, name)

        if self.cache is None:
            consts, bias = make()
        else:
            sites = self.analysis.sites[binding.var]
            consts, bias = self.cache.get(self.analysis, sites, self.decided, name, make)
        for i, const in consts.items():
            args[i] = const
        value = _new_call(call, args, edit)
        output = not isinstance(binding.var, relax.DataflowVar)
        if bias is not None:
            out = bind_named(self.builder_, value, name + PRUNED_SUFFIX)
            dims = len(out.ty.shape.values)
            shape = [1] * dims
            conv = call.op.name in ("relax.nn.conv2d", "relax.nn.conv2d_transpose")
            shape[1 if conv else dims - 1] = bias.size
            dtype = str(out.ty.dtype)
            value = relax.op.add(out, relax.const(bias.reshape(shape).astype(dtype)))
        new_var = bind_named(self.builder_, value, name, output=output)
        self.set_var_remap(binding.var, new_var)

    def transform(self) -> tvm.IRModule:
        gv = self.mod_.get_global_var("main")
        self.builder_.update_func(gv, self.visit_expr(self.mod_["main"]))
        return self.builder_.get()
