"""QMFRGPrune on real imported models: shapes shrink, modules stay well-formed and correct."""

import logging

import numpy as np
import onnx
import pytest
import tvm
from helpers import load, random_input, run
from onnx import numpy_helper
from tvm import relax
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.normalize import normalize
from tvm_qmfrg.passes.prune import QMFRGPrune, apply_plan, plan_pruning

from tvm_qmfrg import GraphError, OptionError
from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.onnxio.builder import GraphBuilder
from tvm_qmfrg.plan import PruningPlan

FAMILIES = ["resnet_cifar", "mobilenet_v2", "vgg", "mlp", "bert_encoder"]


@pytest.fixture(scope="module")
def models():
    return {name: getattr(synthetic, name)(seed=3) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_families_prune_compile_and_shrink(models, family, sparsity):
    model = models[family]
    mod = load(model)
    prune = QMFRGPrune(sparsity=sparsity)
    pruned = prune(mod)
    relax.analysis.well_formed(pruned)
    out = run(pruned, random_input(model))
    assert np.all(np.isfinite(out))
    before, after = module_cost(mod), module_cost(pruned)
    assert after.params < before.params
    assert after.flops < before.flops
    shrunk = [a for a, b in zip(after.weights, before.weights) if np.prod(a) < np.prod(b)]
    assert shrunk, "some weight constant must really be smaller"
    plan = prune.plan
    assert plan.groups and all(g.kept_channels < g.channels for g in plan.groups)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_is_the_identity(models, family):
    model = models[family]
    mod = load(model)
    x = random_input(model)
    np.testing.assert_allclose(run(QMFRGPrune(sparsity=0.0)(mod), x), run(mod, x), atol=1e-5)


@pytest.mark.parametrize("family", ["resnet_cifar", "mobilenet_v2", "bert_encoder"])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_flops_reduction_is_reached(models, family, target):
    mod = load(models[family])
    prune = QMFRGPrune(flops_reduction=target)
    pruned = prune(mod)
    achieved = 1 - module_cost(pruned).flops / module_cost(mod).flops
    assert abs(achieved - target) <= 0.03
    assert prune.plan.flops_reduction == pytest.approx(achieved, abs=1e-9)


def _set(model, name, array):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
            return
    raise KeyError(name)


def _init(model, name):
    return next(numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.name == name)


def plant_duplicate_channels(model: onnx.ModelProto, pairs, scale: float = 2.0):
    """Conv -> BN: channel j := scale * channel i through the BatchNorm (exactly)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv_index, (i, j) in pairs:
        conv = convs[conv_index]
        bn = next(n for n in model.graph.node if n.input and n.input[0] == conv.output[0])
        w = _init(model, conv.input[1])
        w[j] = scale * w[i]
        _set(model, conv.input[1], w)
        gamma, beta, mean, var = (_init(model, name) for name in bn.input[1:5])
        gamma[j], beta[j], mean[j] = scale * gamma[i], scale * beta[i], scale * mean[i]
        var[j] = scale**2 * (var[i] + 1e-5) - 1e-5
        for name, arr in zip(bn.input[1:5], (gamma, beta, mean, var)):
            _set(model, name, arr)
    return model


def plant_duplicate_head(model: onnx.ModelProto, layer: int, i: int, j: int, heads: int):
    """Head j := head i in the Q, K and V projections (weights and biases)."""
    matmuls = [
        n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].startswith("fc_w")
    ]
    per_layer = 6  # q, k, v, out, ffn1, ffn2
    for proj in matmuls[layer * per_layer : layer * per_layer + 3]:
        w = _init(model, proj.input[1])
        dh = w.shape[1] // heads
        w[:, j * dh : (j + 1) * dh] = w[:, i * dh : (i + 1) * dh]
        _set(model, proj.input[1], w)
        add = next(
            n for n in model.graph.node if n.op_type == "Add" and n.input[0] == proj.output[0]
        )
        b = _init(model, add.input[1])
        b[j * dh : (j + 1) * dh] = b[i * dh : (i + 1) * dh]
        _set(model, add.input[1], b)
    return model


def _linear_node_names(model) -> list[str]:
    """ONNX names of the conv/matmul nodes, in graph order (plan groups are named by them)."""
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def test_lossless_merge_removes_planted_duplicate_channels():
    model = plant_duplicate_channels(
        synthetic.vgg(seed=1), [(0, (1, 5)), (2, (3, 9)), (2, (4, 12))]
    )
    mod = load(model)
    x = random_input(model)
    prune = QMFRGPrune(epsilon=1e-6)
    pruned = prune(mod)
    np.testing.assert_allclose(run(pruned, x), run(mod, x), atol=1e-5)
    removed = {g.name: g.channels - g.kept_channels for g in prune.plan.groups}
    convs = _linear_node_names(model)
    assert removed[convs[0]] == 1 and removed[convs[2]] == 2
    assert sum(removed.values()) == 3
    shapes = module_cost(pruned).weights
    assert shapes[0] == (7, 3, 3, 3) and shapes[1] == (8, 7, 3, 3) and shapes[2][0] == 14


def test_lossless_merge_removes_a_duplicate_head():
    model = plant_duplicate_head(synthetic.bert_encoder(seed=2), layer=1, i=0, j=2, heads=4)
    mod = load(model)
    x = random_input(model)
    prune = QMFRGPrune(epsilon=1e-6)
    pruned = prune(mod)
    np.testing.assert_allclose(run(pruned, x), run(mod, x), atol=1e-5)
    heads = [g for g in prune.plan.groups if g.unit == 8]
    assert [len(g.kept) for g in heads] == [4, 3]
    assert len(heads[1].merges) == 1 and set(heads[1].merges[0][:2]) == {0, 2}
    q_weights = [s for s in module_cost(pruned).weights if s == (32, 24)]
    assert len(q_weights) == 3  # Q, K, V of the second layer lost one head each


def test_epsilon_zero_on_a_net_without_duplicates_changes_nothing(models):
    mod = load(models["resnet_cifar"])
    prune = QMFRGPrune(epsilon=0.0)
    pruned = prune(mod)
    assert all(g.kept_channels == g.channels for g in prune.plan.groups)
    x = random_input(models["resnet_cifar"])
    np.testing.assert_allclose(run(pruned, x), run(mod, x), atol=1e-5)


def test_plan_round_trip_reproduces_the_module(models, tmp_path):
    mod = load(models["resnet_cifar"])
    plan = plan_pruning(mod, flops_reduction=0.4)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = apply_plan(mod, PruningPlan.load(path))
    tvm.ir.assert_structural_equal(again, apply_plan(mod, plan))
    assert PruningPlan.load(path).to_dict() == plan.to_dict()


def test_plan_for_another_model_is_rejected(models):
    plan = plan_pruning(load(models["vgg"]), sparsity=0.3)
    with pytest.raises(GraphError, match="does not match this model"):
        apply_plan(load(models["mlp"]), plan)


def test_pass_composes_in_sequential(models):
    mod = load(models["mlp"])
    seq = tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            QMFRGPrune(criterion="magnitude", sparsity=0.5),
            relax.transform.DeadCodeElimination(),
        ]
    )
    out = seq(mod)
    assert module_cost(out).params < module_cost(mod).params


@pytest.mark.parametrize("criterion", ["qmfrg", "spectral", "magnitude", "random", "fpgm"])
def test_every_criterion_reaches_the_flops_target(models, criterion):
    mod = load(models["resnet_cifar"])
    plan = plan_pruning(mod, criterion=criterion, flops_reduction=0.5, seed=1)
    assert abs(plan.flops_reduction - 0.5) <= 0.03
    run(apply_plan(mod, plan), random_input(models["resnet_cifar"]))


def test_round_to_keeps_multiples(models):
    plan = plan_pruning(load(models["resnet_cifar"]), flops_reduction=0.5, round_to=4)
    assert all(g.kept_channels % 4 == 0 for g in plan.groups)
    assert abs(plan.flops_reduction - 0.5) <= 0.03


def test_min_channels_is_respected(models):
    plan = plan_pruning(load(models["vgg"]), sparsity=0.9, min_channels=4)
    assert all(g.kept_channels >= 4 for g in plan.groups)


def test_protect_freezes_matching_groups_and_warns_on_no_match(models, caplog):
    mod = load(models["vgg"])
    first = _linear_node_names(models["vgg"])[0]
    with caplog.at_level(logging.WARNING):
        plan = plan_pruning(mod, sparsity=0.5, protect=(first, "no_such_layer*"))
    assert first not in [g.name for g in plan.groups]
    assert any(f.name == first and "protected" in f.reason for f in plan.frozen)
    assert "no_such_layer*" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "outside"),
        ({"sparsity": -0.1}, "outside"),
        ({"flops_reduction": 1.5}, "outside"),
        ({"sparsity": 0.2, "flops_reduction": 0.2}, "exactly one"),
        ({}, "exactly one"),
        ({"criterion": "l2norm", "sparsity": 0.2}, "unknown criterion 'l2norm'"),
    ],
)
def test_bad_options(models, kwargs, match):
    with pytest.raises(OptionError, match=match):
        QMFRGPrune(**kwargs)(load(models["mlp"]))


def test_nothing_prunable_leaves_module_unchanged(caplog):
    g = synthetic.GraphBuilder("single", 0)
    y = g.dense("input", 8, 4)
    g.rename_output(y, "output")
    mod = load(g.model({"input": [1, 8]}, {"output": [1, 4]}))
    with caplog.at_level(logging.WARNING):
        prune = QMFRGPrune(sparsity=0.5)
        out = prune(mod)
    assert "nothing to prune" in caplog.text
    assert prune.plan.groups == [] and prune.plan.frozen
    assert module_cost(out).params == module_cost(mod).params


def test_dynamic_non_batch_dims_are_rejected():
    model = synthetic.mlp(seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(GraphError, match="dynamic"):
        QMFRGPrune(sparsity=0.3)(load(model))


def test_modules_with_weights_as_parameters(models):
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    model = models["vgg"]
    mod, params = detach_params(from_onnx(model, keep_params_in_input=True))
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    named = {p.name: a for p, a in zip(func.params[n_in:], params["main"])}
    with pytest.raises(GraphError, match="weights as parameters"):
        QMFRGPrune(sparsity=0.3)(mod)
    pruned = QMFRGPrune(sparsity=0.3, params=named)(mod)
    dense = QMFRGPrune(sparsity=0.3)(load(model))
    x = random_input(model)
    np.testing.assert_allclose(run(pruned, x), run(dense, x), atol=1e-5)


def _gelu_model(form: str) -> onnx.ModelProto:
    """A linear layer then exact GELU in one exporter's form."""
    g = GraphBuilder("gelu")
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    h = g.node("MatMul", ["x", g.const(w)])
    if form.endswith("mul_inv_sqrt2"):
        scaled = g.node("Mul", [g.constant(np.float32(np.sqrt(0.5))), h])
    else:
        scaled = g.node("Div", [h, g.constant(np.float32(np.sqrt(2.0)))])
    erf1 = g.node("Add", [g.constant(np.float32(1)), g.node("Erf", [scaled])])
    half = g.constant(np.float32(0.5))
    if form.startswith("x_half_first"):  # x * 0.5 * (1 + erf(...)): PyTorch's BERT
        y = g.node("Mul", [g.node("Mul", [h, half]), erf1])
    else:  # 0.5 * (x * (1 + erf(...)))
        y = g.node("Mul", [half, g.node("Mul", [erf1, h])])
    g.rename_output(y, "y")
    return g.model({"x": [2, 8]}, {"y": [2, 8]})


@pytest.mark.parametrize(
    "form", ["x_half_first", "x_half_first_mul_inv_sqrt2", "half_last", "half_last_mul_inv_sqrt2"]
)
def test_normalize_fuses_exact_gelu_in_each_exporters_order(form):
    model = _gelu_model(form)
    mod = load(model)
    fused = normalize(mod)
    assert "R.erf(" not in fused.script() and fused.script().count("R.nn.gelu(") == 1
    x = random_input(model)
    np.testing.assert_allclose(run(fused, x), run(mod, x), rtol=1e-5, atol=1e-5)


def test_normalize_leaves_a_near_gelu_alone():
    model = _gelu_model("half_last")
    for node in model.graph.node:  # 0.5 -> 0.6: not GELU any more
        for attr in node.attribute:
            if node.op_type == "Constant" and numpy_helper.to_array(attr.t).tolist() == 0.5:
                attr.t.CopyFrom(numpy_helper.from_array(np.float32(0.6), attr.t.name))
    fused = normalize(load(model))
    assert "R.erf(" in fused.script() and "R.nn.gelu(" not in fused.script()


def test_normalize_fuses_the_onnx_erf_gelu_into_one_op():
    model = synthetic.bert_encoder(seed=4)
    mod = load(model)
    assert "R.erf(" in mod.script()
    fused = normalize(mod)
    assert "R.erf(" not in fused.script() and fused.script().count("R.nn.gelu(") == 2
    x = random_input(model)
    np.testing.assert_allclose(run(fused, x), run(mod, x), rtol=1e-5, atol=1e-5)
