"""SpectralSubstitution: certified low-rank factorization and verified deduplication."""

import numpy as np
import pytest
import tvm
from helpers import compiled, load, random_input, run
from scipy.stats import ortho_group
from test_prune import plant_duplicate_head
from tvm import relax
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.prune import QMFRGPrune
from tvm_qmfrg.passes.substitute import SpectralSubstitution, substitute_module

from tvm_qmfrg import OptionError
from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.onnxio.synthetic import GraphBuilder


def single_dense(weight: np.ndarray, bias: bool = True):
    g = GraphBuilder("dense", 0)
    y = g.node("MatMul", ["input", g.const(weight.astype(np.float32), "fc_w")], "matmul")
    if bias:
        y = g.node("Add", [y, g.const(np.linspace(-1, 1, weight.shape[1]).astype(np.float32))])
    g.rename_output(y, "output")
    return g.model({"input": [1, weight.shape[0]]}, {"output": [1, weight.shape[1]]})


def planted(rank, n=64, m=48, noise=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m))
    return w + noise * rng.standard_normal((n, m))


def test_lowrank_recovers_planted_rank_and_honours_its_certificate():
    w = planted(6)
    mod = load(single_dense(w))
    sub = SpectralSubstitution(epsilon=0.01, kinds=("lowrank",))
    new = sub(mod)
    [s] = sub.report.substitutions
    assert s.kind == "lowrank" and s.detail == "rank 6 of 48"
    assert module_cost(new).weights == ((64, 6), (6, 48))
    f_new, f_old = compiled(new), compiled(mod)
    spec = np.linalg.svd(w, compute_uv=False)
    bias = np.linspace(-1, 1, 48)
    worst = 0.0
    for x in np.random.default_rng(1).standard_normal((100, 1, 64)).astype(np.float32):
        err = np.linalg.norm(f_new(x) - f_old(x))  # the bias is exact, so this is ||(W - W_r) x||
        worst = max(worst, err / (spec[0] * np.linalg.norm(x)))
        assert np.allclose(f_old(x) - bias, x @ w, atol=1e-3)
    assert worst <= s.spectral_bound * (1 + 1e-3) + 1e-6
    assert s.frobenius_bound <= np.sin(0.01)


def test_full_rank_weight_is_left_alone():
    w = np.random.default_rng(2).standard_normal((32, 32))
    sub = SpectralSubstitution(epsilon=0.05)
    new = sub(load(single_dense(w)))
    assert sub.report.substitutions == []
    assert module_cost(new).weights == ((32, 32),)


def test_lowrank_conv_becomes_conv_then_pointwise():
    model = synthetic.vgg(seed=0)
    for t in model.graph.initializer:
        if t.name.startswith("conv_w") and t.dims[0] == 16 and t.dims[1] == 16:
            w = planted(3, n=16, m=16 * 9, seed=4).reshape(16, 16, 3, 3)
            t.CopyFrom(__import__("onnx").numpy_helper.from_array(w.astype(np.float32), t.name))
    mod = load(model)
    sub = SpectralSubstitution(epsilon=0.01, kinds=("lowrank",))
    new = sub(mod)
    assert any(s.detail == "rank 3 of 16" for s in sub.report.substitutions)
    shapes = module_cost(new).weights
    assert (3, 16, 3, 3) in shapes and (16, 3, 1, 1) in shapes
    x = random_input(model)
    np.testing.assert_allclose(run(new, x), run(mod, x), rtol=1e-2, atol=1e-2)


def two_heads(w1, w2):
    """Two dense ops reading the same input, outputs concatenated."""
    g = GraphBuilder("twins", 0)
    a = g.node("MatMul", ["input", g.const(w1.astype(np.float32), "fc_w")], "matmul")
    b = g.node("MatMul", ["input", g.const(w2.astype(np.float32), "fc_w")], "matmul")
    y = g.node("Concat", [a, b], axis=1)
    g.rename_output(y, "output")
    return g.model({"input": [1, w1.shape[0]]}, {"output": [1, 2 * w1.shape[1]]})


def test_dedup_computes_a_scaled_duplicate_once():
    w = np.random.default_rng(3).standard_normal((16, 8))
    mod = load(two_heads(w, -2.5 * w))
    sub = SpectralSubstitution(epsilon=0.05, kinds=("dedup",))
    new = sub(mod)
    [s] = sub.report.substitutions
    assert s.kind == "dedup" and s.detail.startswith("= -2.5 * ")
    assert len(module_cost(new).weights) == 1
    x = np.random.default_rng(4).standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(run(new, x), run(mod, x), atol=1e-5)


def test_equal_spectra_different_singular_vectors_are_rejected_by_the_direct_check():
    w = np.random.default_rng(5).standard_normal((16, 8))
    rotated = ortho_group.rvs(16, random_state=1) @ w @ ortho_group.rvs(8, random_state=2)
    np.testing.assert_allclose(
        np.linalg.svd(rotated, compute_uv=False), np.linalg.svd(w, compute_uv=False), rtol=1e-9
    )
    mod = load(two_heads(w, rotated))
    sub = SpectralSubstitution(epsilon=0.05, kinds=("dedup",))
    new = sub(mod)
    assert sub.report.substitutions == []
    tvm.ir.assert_structural_equal(
        new["main"].body.blocks[0].bindings[0].value.args[1],
        mod["main"].body.blocks[0].bindings[0].value.args[1],
    )
    assert len(module_cost(new).weights) == 2


def test_dedup_across_a_pointwise_conv_and_a_dense_layer():
    g = GraphBuilder("cross", 0)
    pooled = g.node("GlobalAveragePool", [g.node("Relu", [g.conv("input", 3, 8)])])
    w = g.randn(6, 8, 1, 1)
    conv = g.node("Conv", [pooled, g.const(w, "conv_w")], kernel_shape=[1, 1])
    flat = g.node("Flatten", [pooled], axis=1)
    dense = g.node("MatMul", [flat, g.const((0.5 * w.reshape(6, 8).T).astype(np.float32), "fc_w")])
    y = g.node("Add", [g.node("Flatten", [conv], axis=1), dense])
    g.rename_output(y, "output")
    model = g.model({"input": [1, 3, 8, 8]}, {"output": [1, 6]})
    mod = load(model)
    sub = SpectralSubstitution(epsilon=0.05, kinds=("dedup",))
    new = sub(mod)
    assert [s.kind for s in sub.report.substitutions] == ["dedup"]
    x = random_input(model)
    np.testing.assert_allclose(run(new, x), run(mod, x), atol=1e-5)


def test_dedup_merges_a_duplicate_head():
    model = plant_duplicate_head(synthetic.bert_encoder(seed=2), layer=0, i=1, j=3, heads=4)
    mod = load(model)
    sub = SpectralSubstitution(epsilon=0.05, kinds=("dedup",))
    new = sub(mod)
    assert any("head" in s.detail for s in sub.report.substitutions)
    x = random_input(model)
    np.testing.assert_allclose(run(new, x), run(mod, x), atol=1e-5)


@pytest.mark.parametrize("family", ["resnet_cifar", "bert_encoder"])
def test_epsilon_zero_keeps_outputs(family):
    model = getattr(synthetic, family)(seed=1)
    mod = load(model)
    new = SpectralSubstitution(epsilon=0.0)(mod)
    x = random_input(model)
    np.testing.assert_allclose(run(new, x), run(mod, x), atol=1e-5)


@pytest.mark.parametrize("family", ["resnet_cifar", "bert_encoder"])
def test_prune_then_substitute_in_one_sequential(family):
    model = getattr(synthetic, family)(seed=2)
    mod = load(model)
    seq = tvm.transform.Sequential(
        [
            QMFRGPrune(flops_reduction=0.3),
            SpectralSubstitution(epsilon=0.3, min_gain=0.05),
            relax.transform.FoldConstant(),
        ]
    )
    new = seq(mod)
    relax.analysis.well_formed(new)
    assert module_cost(new).flops < module_cost(mod).flops
    assert np.all(np.isfinite(run(new, random_input(model))))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 3.0}, "outside"),
        ({"epsilon": 0.1, "kinds": ("svd",)}, "unknown substitution kind"),
        ({"epsilon": 0.1, "min_gain": 1.0}, "min_gain"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        SpectralSubstitution(**kwargs)


def test_report_is_json_ready():
    report, _ = substitute_module(load(single_dense(planted(4))), epsilon=0.01)
    data = report.to_dict()
    assert (
        data["substitutions"][0]["kind"] == "lowrank" and data["flops_after"] < data["flops_before"]
    )
