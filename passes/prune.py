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
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg import criteria as criteria_registry
from tvm_qmfrg import reconstruction
from tvm_qmfrg.compensation import pruned_offsets, relu_mean, unit_spectra
from tvm_qmfrg.criteria import EXACT_MERGES, ChannelGroup
from tvm_qmfrg.errors import GraphError, OptionError
from tvm_qmfrg.options import PruneOptions
from tvm_qmfrg.plan import FrozenGroup, GroupPlan, PruningPlan
from tvm_qmfrg.selection import AxisCost, FlopsModel, resolve, select

from . import calibrated
from .channels import ChannelAnalysis, Producer, Space, analyze_channels, producer_names
from .flops import module_cost
from .normalize import normalize
from .pass_input import checks_its_input
from .rewrite import Rewriter, plan_edits

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


def _space_sites(analysis: ChannelAnalysis, space: Space, role: str):
    """Every ``(var, site, segment)`` of ``role`` whose segment belongs to ``space``."""
    for var, sites in analysis.sites.items():
        for site in sites:
            if site.role != role:
                continue
            for seg in site.layout.segments:
                if analysis.root[seg.space] == space.id:
                    yield var, site, seg


def _build_groups(
    analysis: ChannelAnalysis, values: dict, names: dict, spectra: bool = False
) -> list[_Group]:
    """The numpy view of every prunable space; per-unit filter spectra (one SVD per unit)
    only when ``spectra`` (a criterion with the ``filter_spectra`` trait reads them)."""
    groups = []
    for sp in analysis.prunable():
        units = sp.units
        rows = [
            np.concatenate(
                [p.weight * p.scale[:, None], (p.bias * p.scale + p.shift)[:, None]], axis=1
            )
            for p in sp.producers
        ]
        states = np.concatenate(rows, axis=1).reshape(units, -1)
        sq = np.zeros(units)
        for var, site, seg in _space_sites(analysis, sp, "consumer"):
            wt = np.moveaxis(values[var].args[site.arg].value.numpy(), site.axis, 0)
            per_position = np.square(wt.astype(np.float64)).reshape(wt.shape[0], -1).sum(axis=1)
            sq += per_position[seg.start : seg.stop].reshape(units, -1).sum(axis=1)
        if spectra:
            per_unit = np.concatenate(
                [
                    unit_spectra(p.weight.astype(np.float64).reshape(units, -1, p.kernel))
                    for p in sp.producers
                ],
                axis=1,
            )
            spec = -np.sort(-per_unit, axis=1)
        else:
            spec = np.zeros((units, 0))
        pnames = [producer_name(p, names) for p in sp.producers]
        if len(sp.producers) > 1 and len({p.var for p in sp.producers}) == 1:  # grouped conv
            pnames = [names.get(sp.producers[0].var, sp.producers[0].var.name)] * len(pnames)
        data = ChannelGroup(pnames[0], states, np.sqrt(sq), spec, sp.merge)
        groups.append(_Group(sp, pnames[0], pnames, data, _feature_means(sp)))
    return groups


def producer_name(p: Producer, names: dict) -> str:
    """A producer's name in plans: its node, with ``[a:b]`` for a part cut off by a split."""
    base = names.get(p.var, p.var.name)
    return f"{base}[{p.rows[0]}:{p.rows[1]}]" if p.rows else base


def _coverage(analysis: ChannelAnalysis, active: list[_Group]) -> float:
    """FLOPs of the conv/matmul ops that read or make channels of an active group."""
    ids = {g.space.id for g in active}
    total = 0.0
    for op in analysis.ops:
        if any(analysis.root[seg.space] in ids for lay in op.axes for seg in lay.segments):
            total += op.flops
    return total


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
    if "relax.nn.relu" in sp.acts:
        return relu_mean(p.bn_mean, p.bn_std)
    return p.bn_mean.copy()


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


@dataclass
class _Prepared:
    """A module made ready to decide on: normalized, its channels analyzed, its prunable
    groups in numpy, producer names by binding."""

    mod: tvm.IRModule  # normalized
    analysis: ChannelAnalysis
    values: dict  # binding var -> value
    groups: list[_Group]
    names: dict


def _binding_values(func: relax.Function) -> dict:
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def _prepare(
    mod: tvm.IRModule, model: str, names: Sequence[str] | None, params=None, spectra=False
) -> _Prepared:
    if not isinstance(mod, tvm.IRModule):
        raise OptionError(f"expected a tvm.IRModule, got {type(mod).__name__}")
    norm_mod = normalize(mod, params, model=model)
    func = norm_mod["main"]
    inputs = func.attrs.get("num_input") if func.attrs is not None else None
    if inputs is not None and len(func.params) > int(inputs):
        raise GraphError(
            f"{model}: main keeps {len(func.params) - int(inputs)} weights as parameters; "
            "pass them as params={name: array} (e.g. from relax.frontend.detach_params) "
            "or import with keep_params_in_input=False"
        )
    _check_static(func, model)
    analysis = analyze_channels(func, model)
    values = _binding_values(func)
    names_by_var = producer_names(func, names)
    groups = _build_groups(analysis, values, names_by_var, spectra)
    return _Prepared(norm_mod, analysis, values, groups, names_by_var)


def prune_module(
    mod: tvm.IRModule,
    options: PruneOptions | None = None,
    *,
    calibration=None,
    onnx_model=None,
    model: str = "model",
    names: Sequence[str] | None = None,
    params: dict | None = None,
    **option_values,
) -> tuple[PruningPlan, tvm.IRModule]:
    """Decide what to prune in ``mod`` (its ``main``); return the plan and the pruned module.

    Parameters
    ----------
    mod
        The module; its ``main`` is normalized first (:func:`.normalize.normalize`).
    options
        A :class:`~tvm_qmfrg.options.PruneOptions`, or its fields as keyword arguments
        (``prune_module(mod, flops_reduction=0.3)``): exactly one of ``sparsity`` (fraction of
        every group), ``flops_reduction`` (fraction of conv/matmul FLOPs) or ``epsilon``
        (lossless: exact merges within ``epsilon`` radians), the criterion, ``allocation``
        (``uniform``: the same fraction of every group, the criterion picks which units;
        ``global``: one ranking of the criterion's normalized costs), ``protect`` (glob
        patterns of producer names whose groups stay intact), ``compensate`` (data-free bias
        compensation, default on for ``qmfrg``), ``min_channels``, ``round_to``, ``seed``.
    calibration
        Input samples (an array, a list of them, or a dict by input name; leading axis =
        samples, run in batches of the module's static batch): calibrated pruning
        (:mod:`.calibrated`): each group keeps the units that best reconstruct its mixing
        consumers' outputs, the consumers are refit on the activations of the network
        pruned upstream, and ``allocation='auto'`` spreads a FLOPs budget by measured
        sensitivity.
    onnx_model
        The ONNX model ``mod`` was imported from by :mod:`tvm_qmfrg.passes.importer` (with
        :func:`~.onnx_io.import_model`: ``imported.prepared.model``): calibration activations
        are then collected by onnxruntime, much faster than an untuned TVM build.
    model
        The model's name in messages and in the plan.
    names
        Producer names in graph order, for modules not imported by
        :mod:`tvm_qmfrg.passes.importer` (whose bindings carry ONNX node names).
    params
        Weights of a module imported with ``keep_params_in_input=True``.
    """
    opts = _options(options, option_values)
    criterion = opts.criterion
    factory = criteria_registry.get(criterion)
    sparsity, flops_reduction, epsilon = opts.sparsity, opts.flops_reduction, opts.epsilon
    min_channels, round_to = opts.min_channels, opts.round_to
    calibrated = calibration is not None
    allocation = opts.allocation_for(calibrated and onnx_model is not None)
    if allocation == "sensitivity" and not (calibrated and flops_reduction is not None):
        raise OptionError(
            "allocation 'sensitivity' measures each group on calibration data: it needs "
            "calibration samples and a flops_reduction target"
        )
    if calibrated and epsilon is not None:
        raise OptionError("epsilon (lossless merging) is data-free: drop the calibration data")
    protect, seed, compensate = opts.protect, opts.seed, opts.compensates
    spectra = criteria_registry.traits(criterion).filter_spectra
    prep = _prepare(mod, model, names, params, spectra)
    analysis = prep.analysis
    frozen = [
        FrozenGroup(producer_name(sp.producers[0], prep.names), sp.size, sp.frozen[0])
        for sp in analysis.spaces
        if sp.frozen and sp.producers
    ]
    matched = {p: False for p in protect}
    active = []
    for g in prep.groups:
        hits = [p for p in protect if any(n == p or fnmatch.fnmatchcase(n, p) for n in g.producers)]
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
            allocation="uniform" if allocation == "sensitivity" else allocation,
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
    if calibrated and active:
        plans = _calibrate(
            prep,
            active,
            plans,
            opts,
            allocation,
            calibration,
            onnx_model,
            model,
        )
    before = module_cost(prep.mod)
    plan = PruningPlan(
        model=model,
        criterion=criterion,
        options={**opts.to_dict(), "allocation": allocation, "calibrated": calibrated},
        groups=plans,
        frozen=frozen,
        flops_before=before.flops,
        params_before=before.params,
        op_flops=float(sum(op.flops for op in analysis.ops)),
        prunable_flops=_coverage(analysis, active),
    )
    pruned = _rewrite(prep, plan, model)
    after = module_cost(pruned)
    plan.flops_after, plan.params_after = after.flops, after.params
    if flops_reduction is not None and abs(plan.flops_reduction - flops_reduction) > 0.02:
        log.warning("%s", _shortfall(plan, flops_reduction, round_to, min_channels))
    return plan, pruned


def _shortfall(plan: PruningPlan, wanted: float, round_to: int, min_channels: int) -> str:
    """Why the reached FLOPs reduction is not the requested one, in one line."""
    why = []
    if plan.coverage < 1.0:
        why.append(f"only {plan.coverage:.0%} of the FLOPs are in prunable groups")
    if round_to > 1:
        why.append(f"kept channels are rounded to multiples of {round_to}")
    if min_channels > 1:
        why.append(f"every group keeps at least {min_channels} channels")
    reason = "; ".join(why) or "the groups' unit sizes do not allow a closer cut"
    return (
        f"{plan.model}: FLOPs reduced by {plan.flops_reduction:.1%}, not the requested "
        f"{wanted:.0%}: {reason}"
    )


def _options(options: PruneOptions | None, values: dict) -> PruneOptions:
    """The one validated options object, from a PruneOptions or its fields as keywords."""
    if options is not None and values:
        raise OptionError(
            f"give a PruneOptions or keyword options, not both ({', '.join(sorted(values))})"
        )
    if options is not None:
        if not isinstance(options, PruneOptions):
            raise OptionError(f"options must be a PruneOptions, got {type(options).__name__}")
        return options
    known = set(PruneOptions.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown pruning option(s): {', '.join(unknown)}")
    return PruneOptions(**values)


def _calibrate(
    prep: _Prepared,
    active,
    plans,
    opts,
    allocation,
    calibration,
    onnx_model,
    model,
) -> list[GroupPlan]:
    """Calibrated mode (:mod:`.calibrated`): the data-free plans give the budget per group
    (or ``sensitivity`` measures it); units are chosen and refit on activations."""
    allocate = None
    if allocation == "sensitivity":
        flops = _flops_model(prep.analysis, active)
        units = [g.space.units for g in active]
        widths = [g.space.unit for g in active]
        mins = [max(1, math.ceil(opts.min_channels / w)) for w in widths]
        steps = [max(1, opts.round_to // math.gcd(opts.round_to, w)) for w in widths]

        def allocate(curves, fixed):
            return reconstruction.allocate(
                curves, units, flops, opts.flops_reduction, mins, steps, fixed=fixed
            )

    settings = calibrated.CalibrationSettings(
        opts.selection,
        opts.sequential,
        allocation,
        opts.reconstruct,
        opts.ridge,
        opts.residual,
        opts.correction,
    )
    return calibrated.calibrate_plans(
        prep.mod,
        prep.analysis,
        prep.values,
        [(g.space.id, gp) for g, gp in zip(active, plans)],
        calibration,
        onnx_model,
        settings,
        allocate=allocate,
        model=model,
    )


def plan_pruning(mod: tvm.IRModule, **options) -> PruningPlan:
    """Only the plan of :func:`prune_module` (same keyword arguments). Its FLOPs and
    parameters after pruning are counted on the rewritten module (facts about the graph, not
    a model's estimate), so the rewrite runs here too."""
    return prune_module(mod, **options)[0]


def _offsets(g: _Group, sel, merges) -> dict[int, float]:
    """Per pruned feature ``E[a_f] - c E[a_partner]`` (:func:`pruned_offsets`)."""
    target = {j: (i, c) for j, i, c in merges}
    return pruned_offsets(g.feature_means, g.space.unit, sel.order, target)


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


def _rewrite(prep: _Prepared, plan: PruningPlan, model: str) -> tvm.IRModule:
    decided = _match_plan(prep.groups, plan, model)
    edits = plan_edits(prep.analysis, decided)
    new_mod = Rewriter(prep.mod, edits, prep.analysis, decided).transform()
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
    params: dict | None = None,
) -> tvm.IRModule:
    """Rewrite ``mod`` by ``plan`` (from :func:`plan_pruning` or a saved JSON)."""
    model = model or plan.model
    return _rewrite(_prepare(mod, model, names, params), plan, model)


@checks_its_input
@tvm.transform.module_pass(opt_level=0, name="QMFRGPrune")
class QMFRGPrune:
    """Structured pruning as a module pass. Every call decides anew for the module it is
    given; the decision is kept in ``self.last_plan`` (also ``self.plan``).

    Parameters
    ----------
    options
        A :class:`~tvm_qmfrg.options.PruneOptions`, or its fields as keyword arguments
        (validated here, before TVM's pass machinery runs).
    calibration, onnx_model, names, model, params
        As in :func:`prune_module`.
    plan
        Apply this saved plan instead of deciding (the pass :class:`ApplyPruningPlan`).
    """

    def __init__(
        self,
        options: PruneOptions | None = None,
        *,
        calibration=None,
        onnx_model=None,
        names: Sequence[str] | None = None,
        model: str = "model",
        plan: PruningPlan | None = None,
        params: dict | None = None,
        **option_values,
    ):
        if plan is not None:
            if not isinstance(plan, PruningPlan):
                raise OptionError(f"plan must be a PruningPlan, got {type(plan).__name__}")
            self.options = None
        else:
            self.options = _options(options, option_values)
        self.calibration = calibration
        self.onnx_model = onnx_model
        self.names = names
        self.model = model
        self.params = params
        self._replay = plan
        self.last_plan: PruningPlan | None = plan

    @property
    def plan(self) -> PruningPlan | None:
        """The plan of the last call (or the plan being replayed)."""
        return self.last_plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self._replay is not None:
            return apply_plan(mod, self._replay, names=self.names, params=self.params)
        self.last_plan, pruned = prune_module(
            mod,
            self.options,
            calibration=self.calibration,
            onnx_model=self.onnx_model,
            model=self.model,
            names=self.names,
            params=self.params,
        )
        return pruned


@checks_its_input
@tvm.transform.module_pass(opt_level=0, name="ApplyPruningPlan")
class ApplyPruningPlan:
    """The pass that rewrites a module by a saved :class:`~tvm_qmfrg.plan.PruningPlan`."""

    def __init__(self, plan: PruningPlan, *, names=None, params=None):
        if not isinstance(plan, PruningPlan):
            raise OptionError(f"plan must be a PruningPlan, got {type(plan).__name__}")
        self.plan = plan
        self.names = names
        self.params = params

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return apply_plan(mod, self.plan, names=self.names, params=self.params)
