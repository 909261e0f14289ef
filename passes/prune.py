"""QMFRGPrune: structured pruning of a Relax module, shapes really shrunk.

Data flow (DESIGN.md): normalize the module -> :mod:`.channels` finds channel groups and
edit sites -> each group becomes a numpy :class:`~tvm_qmfrg.criteria.ChannelGroup` -> the
core's criterion and :func:`~tvm_qmfrg.selection.select` decide -> a
:class:`~tvm_qmfrg.plan.PruningPlan` -> :func:`apply_plan` rewrites constants, reshape
targets and attributes, folds merges and bias compensation into the consumers, and checks
the result is well-formed.

Use it as a pass::

    mod = QMFRGPrune(flops_reduction=0.5)(mod)

or keeping the plan (to save it, or apply it again later)::

    plan, pruned = prune_module(mod, flops_reduction=0.5)
    plan.save("plan.json")
    same = apply_plan(mod, PruningPlan.load("plan.json"))
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from scipy.stats import norm
from tvm import relax

from tvm_qmfrg import criteria as criteria_registry
from tvm_qmfrg.criteria import EXACT_MERGES, ChannelGroup
from tvm_qmfrg.errors import GraphError, OptionError
from tvm_qmfrg.plan import FrozenGroup, GroupPlan, PruningPlan
from tvm_qmfrg.selection import AxisCost, FlopsModel, check_options, resolve, select

from .channels import ChannelAnalysis, Layout, Site, Space, analyze_channels
from .flops import module_cost
from .normalize import normalize

log = logging.getLogger(__name__)

_MEAN_SAFE_ACTS = {"relax.nn.relu", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}


@dataclass
class _Group:
    """A prunable space with its name and the numbers the core needs."""

    space: Space
    name: str
    producers: list[str]
    data: ChannelGroup
    feature_means: np.ndarray | None


def _check_static(func: relax.Function, model: str) -> None:
    """Only the batch (first) dim of an input may be symbolic: FLOPs and reshapes need the rest."""
    for p in func.params:
        ty = p.ty
        if not isinstance(ty, relax.TensorType):
            continue
        if ty.shape is None:
            raise GraphError(f"{model}: input '{p.name}' has unknown rank; pruning needs shapes")
        dims = list(ty.shape.values)
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, tvm.tirx.IntImm) and i > 0]
        if dynamic:
            raise GraphError(
                f"{model}: input '{p.name}' has dynamic dims {dynamic} besides the batch; "
                "import it with static shapes (from_onnx(..., shape_dict=...))"
            )


def _producer_names(func: relax.Function, names: Sequence[str] | None) -> dict:
    """Name every conv2d/matmul with a constant weight: ONNX names if given, else op_k."""
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


def _consumer_weight(binding_values: dict, var, site: Site) -> np.ndarray:
    return binding_values[var].args[site.arg].value.numpy()


def _space_sites(analysis: ChannelAnalysis, space: Space, role: str):
    """Every ``(var, site, segment)`` of ``role`` whose segment belongs to ``space``."""
    for var, sites in analysis.sites.items():
        for site in sites:
            if site.role != role:
                continue
            for seg in site.layout.segments:
                if analysis.root[seg.space] == space.id:
                    yield var, site, seg


def _build_groups(analysis: ChannelAnalysis, values: dict, names: dict) -> list[_Group]:
    groups = []
    for sp in analysis.prunable():
        units, w = sp.units, sp.unit
        rows = [
            np.concatenate(
                [p.weight * p.scale[:, None], (p.bias * p.scale + p.shift)[:, None]], axis=1
            )
            for p in sp.producers
        ]
        states = np.concatenate(rows, axis=1).reshape(units, -1)
        sq = np.zeros(units)
        for var, site, seg in _space_sites(analysis, sp, "consumer"):
            wt = np.moveaxis(_consumer_weight(values, var, site), site.axis, 0)
            per_position = np.square(wt.astype(np.float64)).reshape(wt.shape[0], -1).sum(axis=1)
            sq += per_position[seg.start:seg.stop].reshape(units, -1).sum(axis=1)
        spectra = np.concatenate([_unit_spectra(p.weight.reshape(units, -1, p.kernel))
                                  for p in sp.producers], axis=1)
        spec = -np.sort(-spectra, axis=1)
        pnames = [names.get(p.var, p.var.name) for p in sp.producers]
        data = ChannelGroup(pnames[0], states, np.sqrt(sq), spec, sp.merge)
        groups.append(_Group(sp, pnames[0], pnames, data, _feature_means(sp)))
    return groups


def _unit_spectra(mats: np.ndarray) -> np.ndarray:
    """Singular values of a batch of matrices (a one-row or one-column matrix: its norm)."""
    if 1 in mats.shape[1:]:
        return np.linalg.norm(mats.reshape(mats.shape[0], -1), axis=1, keepdims=True)
    return np.linalg.svd(mats, compute_uv=False)


def _feature_means(sp: Space) -> np.ndarray | None:
    """``E[a_f]`` at the consumers, data-free, from a BatchNorm's statistics (or None).

    Needs one producer whose affine chain holds a BatchNorm, a merge class that is linear or
    ReLU-like, and only ReLU / average pooling between: ``E[relu(z)]`` for
    ``z ~ N(m, s^2)`` is ``m Phi(m/s) + s phi(m/s)``.
    """
    if len(sp.producers) != 1 or sp.merge not in EXACT_MERGES or not sp.acts <= _MEAN_SAFE_ACTS:
        return None
    p = sp.producers[0]
    if p.bn_mean is None:
        return None
    m, s = p.bn_mean, np.maximum(p.bn_std, 1e-12)
    if "relax.nn.relu" in sp.acts:
        return m * norm.cdf(m / s) + s * norm.pdf(m / s)
    return m.copy()


def _flops_model(analysis: ChannelAnalysis, groups: list[_Group]) -> FlopsModel:
    index = {g.space.id: i for i, g in enumerate(groups)}
    ops = []
    for op in analysis.ops:
        axes = []
        for lay in op.axes:
            fixed, parts = lay.size, []
            for seg in lay.segments:
                g = index.get(analysis.root[seg.space])
                if g is None:
                    continue
                fixed -= seg.stop - seg.start
                parts.append((g, float(seg.ppf) * groups[g].space.unit))
            if parts:
                axes.append(AxisCost(fixed, lay.size, tuple(parts)))
        ops.append((op.flops, tuple(axes)))
    return FlopsModel(tuple(ops))


def _binding_values(func: relax.Function) -> dict:
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def _prepare(mod: tvm.IRModule, model: str, names: Sequence[str] | None):
    if not isinstance(mod, tvm.IRModule):
        raise OptionError(f"expected a tvm.IRModule, got {type(mod).__name__}")
    norm_mod = normalize(mod)
    func = norm_mod["main"]
    _check_static(func, model)
    analysis = analyze_channels(func, model)
    values = _binding_values(func)
    names_by_var = _producer_names(func, names)
    groups = _build_groups(analysis, values, names_by_var)
    return norm_mod, analysis, values, groups, names_by_var


def prune_module(
    mod: tvm.IRModule,
    *,
    criterion: str = "qmfrg",
    sparsity: float | None = None,
    flops_reduction: float | None = None,
    epsilon: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    protect: Sequence[str] = (),
    compensate: bool | None = None,
    seed: int = 0,
    model: str = "model",
    names: Sequence[str] | None = None,
) -> tuple[PruningPlan, tvm.IRModule]:
    """Decide what to prune in ``mod`` (its ``main``); return the plan and the pruned module.

    Exactly one of ``sparsity`` (fraction of every group), ``flops_reduction`` (fraction of
    conv/matmul FLOPs, allocated across groups by the criterion) or ``epsilon`` (lossless:
    exact merges within ``epsilon`` radians). ``protect`` holds glob patterns of producer
    names whose groups stay intact. ``compensate`` folds data-free bias compensation into
    the consumers (default: on for ``qmfrg``). ``names`` gives the conv/matmul producers
    their ONNX node names (in graph order).
    """
    factory = criteria_registry.get(criterion)
    check_options(sparsity, flops_reduction, epsilon, min_channels, round_to)
    if epsilon is not None and criterion != "qmfrg":
        raise OptionError("epsilon (lossless merging) needs the qmfrg criterion")
    compensate = criterion == "qmfrg" if compensate is None else compensate
    norm_mod, analysis, values, groups, names_by_var = _prepare(mod, model, names)
    frozen = [
        FrozenGroup(
            names_by_var.get(sp.producers[0].var, sp.producers[0].var.name), sp.size, sp.frozen[0]
        )
        for sp in analysis.spaces
        if sp.frozen and sp.producers
    ]
    matched = {p: False for p in protect}
    active = []
    for g in groups:
        hits = [p for p in protect if any(fnmatch.fnmatchcase(n, p) for n in g.producers)]
        for p in hits:
            matched[p] = True
        if hits:
            frozen.append(FrozenGroup(g.name, g.space.size, f"protected by '{hits[0]}'"))
        else:
            active.append(g)
    for p, hit in matched.items():
        if not hit:
            log.warning("%s: protect pattern '%s' matches no prunable group", model, p)
    if not active:
        log.warning("%s: nothing to prune (%d frozen groups)", model, len(frozen))
    rng = np.random.default_rng(seed)
    scorers = [factory(g.data, rng) for g in active]
    sels = (
        select(
            [g.data for g in active],
            scorers,
            [g.space.unit for g in active],
            sparsity=sparsity,
            flops_reduction=flops_reduction,
            epsilon=epsilon,
            flops_model=_flops_model(analysis, active),
            min_channels=min_channels,
            round_to=round_to,
        )
        if active
        else []
    )
    plans = []
    for g, sel in zip(active, sels):
        kept, merges = resolve(sel)
        offsets = {}
        if compensate and g.feature_means is not None:
            offsets = _offsets(g, sel, merges)
        plans.append(
            GroupPlan(
                g.name,
                g.producers,
                g.space.size,
                g.space.unit,
                kept,
                [(j, i, c) for j, i, c in merges],
                offsets,
            )
        )
    before = module_cost(norm_mod)
    plan = PruningPlan(
        model=model,
        criterion=criterion,
        options={
            "sparsity": sparsity,
            "flops_reduction": flops_reduction,
            "epsilon": epsilon,
            "min_channels": min_channels,
            "round_to": round_to,
            "protect": list(protect),
            "compensate": compensate,
            "seed": seed,
        },
        groups=plans,
        frozen=frozen,
        flops_before=before.flops,
        params_before=before.params,
    )
    pruned = _rewrite(norm_mod, analysis, values, groups, plan, model)
    after = module_cost(pruned)
    plan.flops_after, plan.params_after = after.flops, after.params
    return plan, pruned


def plan_pruning(mod: tvm.IRModule, **options) -> PruningPlan:
    """Only the plan of :func:`prune_module` (same keyword arguments)."""
    return prune_module(mod, **options)[0]


def _offsets(g: _Group, sel, merges) -> dict[int, float]:
    """Per pruned feature ``E[a_f] - c E[a_partner]`` (``c = 0`` when removed)."""
    w = g.space.unit
    means = g.feature_means
    target = {j: (i, c) for j, i, c in merges}
    out = {}
    for j in sel.order:
        i, c = target.get(j, (-1, 0.0))
        for t in range(w):
            f = j * w + t
            mu = means[f] - (c * means[i * w + t] if i >= 0 else 0.0)
            if mu != 0.0:
                out[f] = float(mu)
    return out


# ---- rewriting ---------------------------------------------------------------------------


@dataclass
class _Edit:
    """Everything to change in one binding."""

    slices: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    folds: list[tuple[Site, list]] = field(default_factory=list)  # consumer sites + merge specs
    shape: tuple[int, int] | None = None  # (axis, new size) of a reshape target
    groups: int | None = None  # new groups of a depthwise conv
    bias: np.ndarray | None = None  # compensation added to the output
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
    weight: np.ndarray, site: Site, analysis, decided
) -> tuple[np.ndarray, np.ndarray]:
    """Fold merges (or a refit) into a consumer weight; also return the bias compensation.

    For ``a_p ~= sum_k R[p, k] a_k + mu_p``: ``V[:, k] += sum_p R[p, k] V[:, p]`` and the output
    gains ``sum_p mu_p V[:, p]`` (summed over kernel taps).
    """
    w = np.moveaxis(weight.astype(np.float64), site.axis, 0).copy()
    out_axis = site.out_axis + 1 if site.out_axis < site.axis else site.out_axis
    taps = np.moveaxis(w, out_axis, 1).reshape(w.shape[0], w.shape[out_axis], -1).sum(axis=2)
    bias = np.zeros(taps.shape[1])
    for seg in site.layout.segments:
        gp = decided.get(analysis.root[seg.space])
        if gp is None:
            continue
        u = gp.unit
        for f, mu in gp.offsets.items():
            bias += mu * taps[seg.positions(np.array([f]))].sum(axis=0)
        if gp.refit is not None:
            kept = np.array([f for k in gp.kept for f in range(k * u, (k + 1) * u)])
            pruned = np.array(sorted(set(range(gp.channels)) - set(kept.tolist())))
            r = np.asarray(gp.refit)
            if seg.ppf < 1:
                log.warning("refit through a head-split layout is not supported; skipped")
                continue
            ppf = int(seg.ppf)
            wp = w[seg.positions(pruned)].reshape((pruned.size, ppf) + w.shape[1:])
            pos_k = seg.positions(kept)
            wk = w[pos_k].reshape((kept.size, ppf) + w.shape[1:])
            wk += np.tensordot(r, wp, axes=([0], [0]))
            w[pos_k] = wk.reshape((-1,) + w.shape[1:])
            continue
        for j, i, c in gp.merges:
            pj = seg.positions(np.arange(j * u, (j + 1) * u))
            pi = seg.positions(np.arange(i * u, (i + 1) * u))
            w[pi] += c * w[pj]
    return np.moveaxis(w, 0, site.axis).astype(weight.dtype), bias


def _edits(analysis: ChannelAnalysis, values: dict, decided: dict) -> dict:
    edits: dict = {}
    for var, sites in analysis.sites.items():
        edit = _Edit()
        for site in sites:
            keep = _keep_positions(analysis, site.layout, decided)
            if site.role == "consumer":
                edit.folds.append((site, None))
            if keep is None:
                continue
            if site.role == "shape":
                edit.shape = (site.axis, int(keep.size))
                continue
            edit.slices.setdefault(site.arg, []).append((site.axis, keep))
            if site.role == "depthwise":
                edit.groups = int(keep.size)
            if site.role == "producer":
                edit.out_keep = keep
        if edit.slices or edit.shape or edit.folds:
            edits[var] = edit
    return edits


def _new_call(call: relax.Call, args: list, edit: _Edit, analysis, decided):
    """The edited call (built from the already remapped ``args``) and its output bias."""
    arrays = {i: args[i].value.numpy() for i in edit.slices}
    bias = None
    for site, _ in edit.folds:
        arr = arrays.get(site.arg, args[site.arg].value.numpy())
        arr, b = _fold_consumer(arr, site, analysis, decided)
        arrays[site.arg] = arr
        if np.any(b):
            bias = b if bias is None else bias + b
    for i, cuts in edit.slices.items():
        for axis, keep in cuts:
            arrays[i] = np.take(arrays[i], keep, axis=axis)
    for i, arr in arrays.items():
        args[i] = relax.const(np.ascontiguousarray(arr))
    if bias is not None and edit.out_keep is not None:
        bias = bias[edit.out_keep]
    name = call.op.name
    if edit.shape is not None:
        axis, size = edit.shape
        dims = list(args[1].values)
        dims[axis] = size
        return relax.op.reshape(args[0], relax.ShapeExpr(dims)), bias
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
        ), bias
    return relax.Call(call.op, args, call.attrs, call.ty_args), bias


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, edits: dict, analysis, decided):
        super().__init__(mod)
        self.mod_ = mod
        self.edits = edits
        self.analysis = analysis
        self.decided = decided

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        edit = self.edits.get(binding.var)
        if edit is None:
            super().visit_var_binding_(binding)
            return
        call = binding.value
        args = [self.visit_expr(a) for a in call.args]
        value, bias = _new_call(call, args, edit, self.analysis, self.decided)
        output = not isinstance(binding.var, relax.DataflowVar)
        name = binding.var.name
        if bias is not None:
            out = self.builder_.emit(value, name_hint=name + "_pruned")
            dims = len(out.ty.shape.values)
            shape = [1] * dims
            shape[1 if call.op.name == "relax.nn.conv2d" else dims - 1] = bias.size
            dtype = str(out.ty.dtype)
            value = relax.op.add(out, relax.const(bias.reshape(shape).astype(dtype)))
        new_var = (
            self.builder_.emit_output(value, name) if output else self.builder_.emit(value, name)
        )
        self.set_var_remap(binding.var, new_var)

    def transform(self) -> tvm.IRModule:
        gv = self.mod_.get_global_var("main")
        self.builder_.update_func(gv, self.visit_expr(self.mod_["main"]))
        return self.builder_.get()


def _match_plan(groups: list[_Group], plan: PruningPlan, model: str) -> dict:
    """Plan groups by space id; a plan that does not fit the module is a GraphError."""
    by_name = {g.name: g for g in groups}
    decided = {}
    for gp in plan.groups:
        g = by_name.get(gp.name)
        if g is None or g.space.size != gp.channels or g.space.unit != gp.unit:
            raise GraphError(
                f"{model}: plan group '{gp.name}' ({gp.channels} channels) does not "
                "match this model; was the plan made for another model?"
            )
        decided[g.space.id] = gp
    return decided


def _rewrite(norm_mod, analysis, values, groups, plan: PruningPlan, model: str) -> tvm.IRModule:
    decided = _match_plan(groups, plan, model)
    edits = _edits(analysis, values, decided)
    new_mod = _Rewriter(norm_mod, edits, analysis, decided).transform()
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    try:
        relax.analysis.well_formed(new_mod)
    except Exception as exc:  # the analysis let something through: a bug, say so plainly
        raise GraphError(f"{model}: pruned module is not well-formed ({exc})") from exc
    return new_mod


def apply_plan(
    mod: tvm.IRModule,
    plan: PruningPlan,
    *,
    names: Sequence[str] | None = None,
    model: str | None = None,
) -> tvm.IRModule:
    """Rewrite ``mod`` by ``plan`` (from :func:`plan_pruning` or a saved JSON)."""
    model = model or plan.model
    norm_mod, analysis, values, groups, _ = _prepare(mod, model, names)
    return _rewrite(norm_mod, analysis, values, groups, plan, model)


@tvm.transform.module_pass(opt_level=0, name="QMFRGPrune")
class QMFRGPrune:
    """Structured pruning as a module pass; the last plan is kept in ``self.plan``.

    Parameters mirror :func:`plan_pruning`; ``plan`` applies a saved plan instead of
    deciding anew.
    """

    def __init__(
        self,
        criterion: str = "qmfrg",
        sparsity: float | None = None,
        flops_reduction: float | None = None,
        min_channels: int = 1,
        round_to: int = 1,
        epsilon: float | None = None,
        protect: Sequence[str] = (),
        calibration=None,
        seed: int = 0,
        compensate: bool | None = None,
        names: Sequence[str] | None = None,
        model: str = "model",
        plan: PruningPlan | None = None,
    ):
        criteria_registry.get(criterion)  # fail early, outside TVM's pass machinery
        if plan is None:
            check_options(sparsity, flops_reduction, epsilon, min_channels, round_to)
        if calibration is not None:
            raise OptionError("calibration data is not supported yet")
        self.options = dict(
            criterion=criterion,
            sparsity=sparsity,
            flops_reduction=flops_reduction,
            epsilon=epsilon,
            min_channels=min_channels,
            round_to=round_to,
            protect=tuple(protect),
            compensate=compensate,
            seed=seed,
            model=model,
            names=names,
        )
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.plan is None:
            self.plan, pruned = prune_module(mod, **self.options)
            return pruned
        return apply_plan(mod, self.plan, names=self.options["names"])
