"""Calibrated pruning on Relax modules: where refits go, what the engines see, what it buys."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import tvm
from helpers import compiled, input_shape, load
from tvm import relax
from tvm_qmfrg.passes import calibrated
from tvm_qmfrg.passes.channels import analyze_channels, producer_names
from tvm_qmfrg.passes.normalize import normalize
from tvm_qmfrg.passes.onnx_io import export_model, import_model
from tvm_qmfrg.passes.prune import (
    QMFRGPrune,
    _binding_values,
    apply_plan,
    producer_name,
    prune_module,
)
from tvm_qmfrg.passes.rewrite import FoldCache, Rewriter, plan_edits

from tests.corpus.idioms import CORPUS
from tvm_qmfrg import GraphError, OptionError, reconstruction
from tvm_qmfrg.metrics import unexplained_variance
from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.onnxio.runtime import run_onnx
from tvm_qmfrg.onnxio.synthetic import GraphBuilder
from tvm_qmfrg.options import PruneOptions
from tvm_qmfrg.plan import PruningPlan


def low_rank_linear_net(rank: int = 5, width: int = 16, seed: int = 0):
    """dense(8 -> width) of rank `rank` -> (linear path) -> dense(width -> 4)."""
    g = GraphBuilder("low_rank", seed)
    basis = g.rng.standard_normal((8, rank))
    w1 = (basis @ g.rng.standard_normal((rank, width))).astype(np.float32)
    h = g.node("MatMul", ["input", g.const(w1, "fc_w")], "matmul")
    y = g.dense(h, width, 4)
    g.rename_output(y, "output")
    return g.model({"input": [1, 8]}, {"output": [1, 4]})


def samples(n, shape, seed):
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


def output_error(mod, dense_mod, test):
    f, dense = compiled(mod), compiled(dense_mod)
    return float(np.mean([np.sum((f(x[None]) - dense(x[None])) ** 2) for x in test]))


def test_calibrated_pruning_is_exact_when_pruned_channels_are_linear_combinations():
    model = low_rank_linear_net()
    mod = load(model)
    calib = samples(64, (1, 8), seed=1)
    prune = QMFRGPrune(sparsity=0.6, calibration=calib, onnx_model=model, ridge=1e-9)
    pruned = prune(mod)
    group = prune.plan.groups[0]
    assert group.kept_channels == 7 and [r.consumer for r in group.refits]
    f_pruned, f_dense = compiled(pruned), compiled(mod)
    for x in samples(5, (1, 8), seed=2):
        np.testing.assert_allclose(f_pruned(x[None]), f_dense(x[None]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["vgg", "resnet_cifar", "mobilenet_v2"])
def test_calibration_lowers_the_output_error_at_a_flops_cut(family):
    model = getattr(synthetic, family)(seed=6)
    mod = load(model)
    shape = input_shape(model)
    calib, test = samples(64, shape, 3), samples(8, shape, 4)
    plain = QMFRGPrune(flops_reduction=0.4)(mod)
    fitted = QMFRGPrune(flops_reduction=0.4, calibration=calib, onnx_model=model)(mod)
    assert output_error(fitted, mod, test) < 0.5 * output_error(plain, mod, test)


def test_refits_go_to_the_first_consumer_that_mixes_channels_past_depthwise_and_relu6():
    model = synthetic.mobilenet_v2(seed=1)
    mod = load(model)
    plan, _ = prune_module(
        mod, flops_reduction=0.3, calibration=samples(16, input_shape(model), 0), onnx_model=model
    )
    func = mod["main"]
    calls = {name: value for name, value in _names_and_calls(func)}
    consumers = [rf.consumer for g in plan.groups for rf in g.refits]
    assert consumers
    for name in consumers:
        call = calls[name]
        assert call.op.name in ("relax.nn.conv2d", "relax.matmul")
        if call.op.name == "relax.nn.conv2d":
            assert int(call.attrs.groups) == 1, f"{name} is a depthwise conv"


def _names_and_calls(func):
    for block in func.body.blocks:
        for b in block.bindings:
            yield b.var.name, b.value


def _decided_resnet_cifar():
    """A calibrated plan of a CIFAR ResNet: the model, its normalized module, the pruned
    module, its channel analysis and the plan by space id."""
    model = synthetic.resnet_cifar(seed=2)
    mod = normalize(load(model))
    plan, pruned = prune_module(
        mod, flops_reduction=0.4, calibration=samples(16, input_shape(model), 0), onnx_model=model
    )
    func = mod["main"]
    analysis = analyze_channels(func, "resnet_cifar")
    by_name = {g.name: g for g in plan.groups}
    names = producer_names(func, None)
    decided = {}
    for sp in analysis.prunable():
        gp = by_name.get(producer_name(sp.producers[0], names))
        if gp is not None:
            decided[sp.id] = gp
    return model, mod, pruned, analysis, decided


def test_the_masked_graph_computes_what_the_pruned_graph_computes():
    model, mod, pruned, analysis, decided = _decided_resnet_cifar()
    assert decided
    masked = Rewriter(mod, plan_edits(analysis, decided, mask=True), analysis, decided).transform()
    x = samples(3, input_shape(model), 9)
    f_masked, f_pruned = compiled(masked), compiled(pruned)
    for xi in x:
        np.testing.assert_allclose(f_masked(xi[None]), f_pruned(xi[None]), rtol=1e-4, atol=1e-4)


def _consts(mod):
    return {
        b.var.name: [a for a in b.value.args if isinstance(a, tvm.ir.GenericConst)]
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call)
    }


def test_a_fold_cache_rewrites_as_a_fresh_rewrite_and_refolds_only_what_changed():
    _, mod, _, analysis, decided = _decided_resnet_cifar()
    spaces = sorted(decided)
    first, last = spaces[0], spaces[-1]
    assert len(spaces) > 2 and decided[last].refits
    old = decided[last].refits[0]
    refit = replace(old, r=old.r * 1.5)  # a new fit of one consumer
    gp = decided[first]
    swap = min(set(range(gp.units)) - set(gp.kept))  # as many kept units, another set
    other = replace(gp, kept=sorted([swap, *gp.kept[1:]]))
    steps = [
        {s: decided[s] for s in spaces[:2]},
        decided,
        {**decided, last: replace(decided[last], refits=[refit, *decided[last].refits[1:]])},
        {**decided, first: other},
        decided,
    ]
    cache = FoldCache()
    previous = None
    for k, step in enumerate(steps):
        edits = plan_edits(analysis, step, mask=True)
        fresh = Rewriter(mod, edits, analysis, step).transform()
        cached = Rewriter(mod, edits, analysis, step, cache).transform()
        tvm.ir.assert_structural_equal(cached, fresh)
        consts = _consts(cached)
        if k == len(steps) - 1:  # back from 'other': the bindings away from 'first' are kept
            edited = [v.name for v in edits]
            reused = [
                n
                for n in edited
                if consts[n] and all(a.same_as(b) for a, b in zip(consts[n], previous[n]))
            ]
            assert reused
        previous = consts


def test_onnxruntime_and_tvm_collect_the_same_activation_moments():
    model = synthetic.vgg(seed=3)
    mod = load(model)
    func = mod["main"]
    analysis = analyze_channels(func, "vgg")
    values = _binding_values(func)
    order = {b.var: i for i, b in enumerate(b for blk in func.body.blocks for b in blk.bindings)}
    reads = [
        r
        for sp in analysis.prunable()
        for r in calibrated.consumer_reads(analysis, values, sp.id, order)
    ]
    data, _ = calibrated.batches(samples(6, input_shape(model), 1), func, "vgg")
    rows = calibrated._Rows(per_sample=10**6)
    ort = calibrated.pick_engine(mod, analysis, model, reads, "vgg")
    tvm_engine = calibrated.pick_engine(mod, analysis, None, reads, "vgg")
    assert (ort.kind, tvm_engine.kind) == ("onnxruntime", "tvm")
    a = calibrated.collect(ort, {}, reads, data, rows)
    b = calibrated.collect(tvm_engine, {}, reads, data, rows)
    for x, y in zip(a, b):
        assert x.rows == y.rows > 0
        for s, t in zip(x.all.stats(), y.all.stats()):
            np.testing.assert_allclose(s, t, rtol=1e-3, atol=1e-4)


def test_a_calibrated_plan_saved_and_loaded_rewrites_the_same_model(tmp_path):
    model = synthetic.resnet_cifar(seed=4)
    mod = load(model)
    plan, pruned = prune_module(
        mod, flops_reduction=0.3, calibration=samples(16, input_shape(model), 0), onnx_model=model
    )
    assert any(g.refits for g in plan.groups)
    plan.save(tmp_path / "plan.json")
    again = apply_plan(mod, PruningPlan.load(tmp_path / "plan.json"))
    x = samples(2, input_shape(model), 5)
    f1, f2 = compiled(pruned), compiled(again)
    for xi in x:
        np.testing.assert_allclose(f1(xi[None]), f2(xi[None]), rtol=1e-4, atol=1e-4)


def test_padded_token_rows_are_left_out_of_the_moments():
    read = calibrated.Read(None, None, _site(axis=2, size=4), _seg(4), np.eye(4), 0)
    act = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    batch = calibrated.Batch(np.array([0, 1]), [np.zeros((2, 3)), mask])
    idx = calibrated._row_filter(read, act, batch, calibrated._Rows(100, 0, mask_input=1))
    assert idx.tolist() == [0, 1, 3]


def _site(axis, size):
    from fractions import Fraction

    from tvm_qmfrg.passes.channels import Layout, Segment, Site

    return Site("consumer", 1, 0, Layout(axis, size, (Segment(0, 0, size, Fraction(1)),)), 1)


def _seg(size):
    from fractions import Fraction

    from tvm_qmfrg.passes.channels import Segment

    return Segment(0, 0, size, Fraction(1))


def test_samples_that_do_not_fill_the_last_batch_are_padded_and_not_counted():
    from tvm_qmfrg.passes.importer import import_onnx

    mod = import_onnx(synthetic.mlp(seed=0), {"input": [4, 32]})
    data, n = calibrated.batches(samples(5, [4, 32], 0), mod["main"], "mlp")
    assert n == 5
    assert [b.ids.tolist() for b in data] == [[0, 1, 2, 3], [4, -1, -1, -1]]
    assert all(b.inputs[0].shape == (4, 32) for b in data)


def test_too_few_samples_for_the_kept_features_is_a_warning(caplog):
    model = synthetic.mlp(seed=0)
    mod = load(model)
    with caplog.at_level(logging.WARNING, logger="tvm_qmfrg"):
        prune_module(mod, sparsity=0.25, calibration=samples(4, input_shape(model), 0))
    assert "give more calibration samples" in caplog.text


def test_sensitivity_allocation_without_calibration_is_a_clear_error():
    mod = load(synthetic.mlp(seed=0))
    with pytest.raises(OptionError, match="sensitivity.*calibration"):
        prune_module(mod, flops_reduction=0.3, allocation="sensitivity")


def test_calibration_shape_mismatch_is_a_clear_error():
    mod = load(synthetic.mlp(seed=0))
    with pytest.raises(OptionError, match="calibration input 'input' has shape"):
        QMFRGPrune(sparsity=0.3, calibration=np.zeros((4, 7), np.float32))(mod)


def test_calibration_with_nan_is_a_clear_error():
    mod = load(synthetic.mlp(seed=0))
    bad = np.full((4, 32), np.nan, np.float32)
    with pytest.raises(OptionError, match="NaN or Inf"):
        prune_module(mod, sparsity=0.3, calibration=bad)


def _reads_of(mod, name):
    func = mod["main"]
    analysis = analyze_channels(func, name)
    values = _binding_values(func)
    order = {b.var: i for i, b in enumerate(b for blk in func.body.blocks for b in blk.bindings)}
    reads = [
        r
        for sp in analysis.prunable()
        for r in calibrated.consumer_reads(analysis, values, sp.id, order)
    ]
    return func, analysis, values, reads


def _bottleneck():
    """conv-BN-ReLU -> [1x1 -> 3x3 -> 1x1-BN] + skip -> ReLU."""
    g = GraphBuilder("bottleneck", 0)
    x = g.conv_bn("input", 8, 8, k=1)
    y = g.conv_bn(x, 8, 4, k=1)
    y = g.conv_bn(y, 4, 4, k=3)
    y = g.conv_bn(y, 4, 8, k=1, act=None)
    out = g.node("Relu", [g.node("Add", [y, x], "add")], "relu")
    g.rename_output(out, "output")
    return g.model({"input": [1, 8, 6, 6]}, {"output": [1, 8, 6, 6]})


@pytest.mark.parametrize(
    "family, kernels",
    [
        # both layers' output projections (attention, FFN) are added to the stream
        ("bert_encoder", [(32, 32), (64, 32), (32, 32), (64, 32)]),
        # only the last 1x1 conv (then BatchNorm, then the add); not the 3x3 one
        ("bottleneck", [(8, 4, 1, 1)]),
    ],
)
def test_consumers_ahead_of_a_residual_add_are_found_through_bias_and_batchnorm(family, kernels):
    model = _bottleneck() if family == "bottleneck" else synthetic.bert_encoder(seed=0)
    mod = normalize(load(model))
    func, analysis, values, reads = _reads_of(mod, family)
    calibrated.attach_residuals(reads, analysis, values)
    found = [r for r in reads if r.residual is not None]
    assert [tuple(values[r.consumer].args[1].value.shape) for r in found] == kernels
    assert len(reads) > len(found) or family == "bert_encoder"
    for r in found:
        w = np.moveaxis(values[r.consumer].args[1].value.numpy(), r.site.axis, 0)
        w = w.reshape(w.shape[0], -1).astype(np.float64)
        scale = next(
            p.scale for sp in analysis.spaces for p in sp.producers if p.var.same_as(r.consumer)
        )
        # a drift the consumer can produce (through its weight and the BN / bias scale)
        # is cancelled exactly by the feature change the lift gives
        drift = (np.random.default_rng(0).standard_normal((5, w.shape[0])) @ w) * scale
        np.testing.assert_allclose((drift @ r.lift) @ w * scale, drift, atol=1e-8)


def _resnet_engine(n: int):
    """resnet_cifar normalized, its reads, ``n`` sample batches and the onnxruntime engine."""
    model = synthetic.resnet_cifar(seed=2)
    mod = normalize(load(model))
    func, analysis, values, reads = _reads_of(mod, "resnet_cifar")
    data, _ = calibrated.batches(samples(n, input_shape(model), 1), func, "resnet_cifar")
    engine = calibrated.pick_engine(mod, analysis, model, reads, "resnet_cifar")
    return func, analysis, reads, data, engine


def test_a_trial_cut_to_the_nodes_after_its_consumers_gives_the_full_graph_output():
    func, analysis, reads, data, engine = _resnet_engine(3)
    assert engine.kind == "onnxruntime"
    dense = [out for _, _, out in engine.run({}, [], data)]
    for sp in analysis.prunable()[:3]:
        mine = [r for r in reads if analysis.root[r.seg.space] == sp.id]
        gp = plan_of_half(sp, producer_names(func, None))
        full = [out for _, _, out in engine.run({sp.id: gp}, [], data)]
        cut = engine.outputs({sp.id: gp}, data, [r.consumer for r in mine])
        for (a,), (b,), (d,) in zip(full, cut, dense):  # one output per batch
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
            assert np.abs(a - d).max() > 1e-3  # the trial does change the output


def test_activations_collected_without_the_output_are_the_same():
    func, analysis, reads, data, engine = _resnet_engine(2)
    wanted = [reads[0].data, reads[-1].data]
    with_out = [a for _, a, _ in engine.run({}, wanted, data)]
    cut = [a for _, a, _ in engine.run({}, wanted, data, output=False)]
    for x, y in zip(with_out, cut):
        for a, b in zip(x, y):
            np.testing.assert_array_equal(a, b)


def plan_of_half(space, names):
    """Keep every other unit of ``space``, no refit."""
    from tvm_qmfrg.plan import GroupPlan

    name = producer_name(space.producers[0], names)
    kept = list(range(0, space.units, 2))
    return GroupPlan(name, [name], space.size, space.unit, kept, [], {}, [])


def test_the_refit_target_moves_from_the_own_output_to_the_dense_one_with_the_correction():
    func, analysis, reads, data, engine = _resnet_engine(4)
    first = analysis.prunable()[0]
    decided = {first.id: plan_of_half(first, producer_names(func, None))}
    later = [r for r in reads if analysis.root[r.seg.space] != first.id][-1:]
    rows = calibrated._Rows(per_sample=10**6)
    own, half, full = (
        calibrated.collect(engine, decided, later, data, rows, c)[0] for c in (0.0, 0.5, 1.0)
    )
    dense = calibrated.collect(engine, {}, later, data, rows)[0].all
    # the classifier reads 64 features into 10 outputs: its targets are taken through W^T
    assert full.projected and half.projected and not own.projected
    w_t = full.factor
    own, half, full = own.all, half.all, full.all
    np.testing.assert_allclose(own.sy, own.sx)  # the target is the current input itself
    np.testing.assert_allclose(full.sy, dense.sy @ w_t, rtol=1e-5)  # ... or the dense one
    np.testing.assert_allclose(half.sy, 0.5 * (own.sy @ w_t + full.sy), rtol=1e-5)
    assert not np.allclose(own.sx, dense.sx)  # upstream pruning did move the input


def test_the_refit_correction_kept_is_the_one_closer_to_dense_on_held_out_samples(caplog):
    model = synthetic.resnet_cifar(seed=2)
    mod = load(model)
    with caplog.at_level(logging.INFO, logger="tvm_qmfrg.passes.calibrated"):
        prune_module(
            mod,
            flops_reduction=0.4,
            calibration=samples(20, input_shape(model), 0),
            onnx_model=model,
            allocation="uniform",
            model="resnet_cifar",
        )
    errors = {
        float(m.split("correction ")[1].split(":")[0]): float(m.rsplit(" ", 1)[1])
        for m in caplog.messages
        if "held-out output error" in m
    }
    assert set(errors) == set(calibrated.CORRECTIONS)
    chosen = [m for m in caplog.messages if m.endswith("chosen")]
    assert chosen == [f"resnet_cifar: refit correction {min(errors, key=errors.get):g} chosen"]


def test_a_correction_outside_zero_to_one_is_a_clear_error():
    with pytest.raises(OptionError, match=r"correction=1.5 is outside \[0, 1\]"):
        PruneOptions(flops_reduction=0.3, correction=1.5)


def test_a_sequential_stage_collects_through_the_frontiers_what_full_runs_collect():
    func, analysis, reads, data, engine = _resnet_engine(3)
    spaces = analysis.prunable()[:3]
    names = producer_names(func, None)
    rows = calibrated._Rows(per_sample=10**6)
    decided: dict = {}
    for sp in spaces:  # decided grows stage by stage, as in the sequential pass
        later = [r for r in reads if analysis.root[r.seg.space] not in decided][-2:]
        for c in (0.0, 1.0):
            full = calibrated.collect(engine, decided, later, data, rows, c)
            step = calibrated.collect(engine, decided, later, data, rows, c, incremental=True)
            for a, b in zip(full, step):
                np.testing.assert_allclose(b.all.sxy, a.all.sxy, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(b.all.sx, a.all.sx, rtol=1e-5, atol=1e-6)
        decided[sp.id] = plan_of_half(sp, names)
    assert engine.incremental(data)


def test_reads_of_the_same_features_share_their_moments_and_equal_their_own():
    func, analysis, reads, data, engine = _resnet_engine(3)
    rows = calibrated._Rows(per_sample=10**6)
    by_input: dict = {}
    for r in reads:
        by_input.setdefault((r.data, r.seg.start, r.seg.stop), []).append(r)
    pair = next(rs for rs in by_input.values() if len(rs) > 1)[:2]
    together = calibrated.collect(engine, {}, pair, data, rows)
    assert together[0].fit is together[1].fit  # one set of moments for both consumers
    alone = calibrated.collect(engine, {}, pair[1:], data, rows)[0]
    np.testing.assert_allclose(together[1].all.sxx, alone.all.sxx)
    assert together[1].name == pair[1].consumer.name
    np.testing.assert_array_equal(together[1].gram, pair[1].gram)


def test_a_wide_read_keeps_about_sixteen_rows_per_feature_and_a_narrow_one_the_floor():
    rows = calibrated._Rows(per_sample=10**6, samples=256)
    assert rows.cap(4096) * 256 == pytest.approx(calibrated.ROW_BUDGET, rel=0.01)
    assert rows.cap(2048) * 256 == pytest.approx(16 * 2048, rel=0.01)
    assert rows.cap(8) * 256 == pytest.approx(calibrated.MIN_ROWS, rel=0.01)
    assert calibrated._Rows(per_sample=7).cap(2048) == 7  # no sample count: the given cap


def test_a_sensitivity_curve_holds_the_measured_network_error_at_its_trial_fractions():
    func, analysis, reads, data, engine = _resnet_engine(3)
    sp = analysis.prunable()[1]
    mine = [r for r in reads if analysis.root[r.seg.space] == sp.id]
    stage = calibrated.Stage(sp.id, plan_of_half(sp, producer_names(func, None)), mine, 1, 0)
    settings = calibrated.CalibrationSettings("activations", True, "sensitivity")
    rows = calibrated._Rows(per_sample=10**6)
    datas = calibrated.collect(engine, {}, mine, data, rows)
    dense = calibrated._stack([out for _, _, out in engine.run({}, [], data)])
    curve = calibrated._curve(engine, stage, datas, data, dense, "resnet_cifar", settings)
    assert [f for f, _ in curve] == pytest.approx(
        [1 - max(1, sp.units - round(f * sp.units)) / sp.units for f in (0.25, 0.5, 0.75, 0.9)]
    )
    units = sp.units
    keep = max(1, units - round(0.5 * units))
    (kept,), _ = reconstruction.select_path(datas, stage.plan.unit, [keep])
    trial = {sp.id: calibrated._plan_of(stage, kept, datas, "resnet_cifar", settings)}
    got = calibrated._stack(engine.outputs(trial, data, [r.consumer for r in mine]))
    half = dict(curve)[1 - keep / units]
    assert half == pytest.approx(calibrated._output_error(got, dense), rel=1e-6)
    assert all(np.isfinite(e) and e >= 0 for _, e in curve)
    errs = [e for _, e in curve]
    assert errs == sorted(errs)  # nested kept sets: removing more never costs less


def test_a_group_keeping_every_unit_is_left_unrefit_only_where_its_refit_is_the_identity():
    func, analysis, reads, data, engine = _resnet_engine(4)
    first, second = analysis.prunable()[:2]
    names = producer_names(func, None)
    settings = calibrated.CalibrationSettings("activations", True, "uniform")
    rows = calibrated._Rows(per_sample=10**6)

    def stages():
        return [
            calibrated.Stage(
                sp.id,
                plan_of_half(sp, names),
                [r for r in reads if analysis.root[r.seg.space] == sp.id],
                keep,
                0,
            )
            for sp, keep in ((first, first.units // 2), (second, second.units))
        ]

    for c in (0.0, 1.0):  # own output: nothing to refit; dense target: the drift is corrected
        decided = calibrated._decide(engine, stages(), data, rows, "m", settings, c, 0.0)
        assert decided[second.id].kept == list(range(second.units))
        assert len(decided[second.id].refits) == (0 if c == 0 else len(stages()[1].reads))
        assert decided[first.id].refits and len(decided[first.id].kept) == first.units // 2
    # the refit the first case leaves out is the identity
    upstream = {first.id: decided[first.id]}
    for d in calibrated.collect(engine, upstream, stages()[1].reads, data, rows, 0.0):
        fit = reconstruction.reconstruct(d, np.arange(second.size))
        np.testing.assert_allclose(fit.r, np.eye(second.size), atol=1e-6)
        np.testing.assert_allclose(fit.mu, 0, atol=1e-5)


def test_every_output_of_a_two_headed_model_keeps_its_function():
    # the decoder conv's channels reach only the second output (``recon``): measured on the
    # first output alone (``logits``) they looked free, and the decoder was lost (error 1.4)
    imp = import_model(CORPUS["squeeze_unsqueeze_head"](), {"input": [1, 3, 32, 32]}, name="two")
    x = samples(80, (1, 3, 32, 32), 0)
    plan, pruned = prune_module(
        imp.mod,
        flops_reduction=0.3,
        calibration=x[:64],
        onnx_model=imp.prepared.model,
        model="two",
    )
    assert plan.flops_reduction >= 0.3
    exported = export_model(imp, pruned)
    want = [run_onnx(imp.prepared.model, {"input": v[None]}) for v in x[64:]]
    got = [run_onnx(exported, {"input": v[None]}) for v in x[64:]]
    for k, name in enumerate(["logits", "recon"]):
        error = unexplained_variance(np.stack([o[k] for o in want]), np.stack([o[k] for o in got]))
        assert error < 0.1, f"{name}: held-out error {error:.3f} of its variation"


def test_the_output_error_averages_outputs_and_leaves_out_what_it_cannot_compare():
    rng = np.random.default_rng(0)
    boxes = rng.standard_normal((6, 4))
    scores = rng.standard_normal((6, 3))
    off = scores + 0.1 * rng.standard_normal((6, 3))
    box_error = 0.0
    score_error = np.sum((off - scores) ** 2) / np.sum((scores - scores.mean(axis=0)) ** 2)
    # a variable-length output (after an NMS) and integer indices: stacked as None, left out
    batches = [
        [boxes[:3], scores[:3], np.zeros((2, 4)), np.arange(3)],
        [boxes[3:], scores[3:], np.zeros((5, 4)), np.arange(3)],
    ]
    want = calibrated._stack(batches)
    assert want[2] is None and want[3] is None
    got = [boxes, off, None, None]
    error = calibrated._output_error(got, want)
    assert error == pytest.approx((box_error + score_error) / 2)
    # an output that does not vary over the samples is measured against its energy
    grid = np.ones((6, 2))
    near = calibrated._output_error([grid + 1e-4], [grid])
    assert near == pytest.approx(1e-8 * 12 / (1e-6 * 12))
    with pytest.raises(GraphError, match="m: no output of floating point and fixed shape"):
        calibrated._output_error([None], [None], "m")
