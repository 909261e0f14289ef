"""Property: on random conv/dense graphs with residuals and concats, the pass either prunes
into a well-formed module that compiles and runs, or leaves groups frozen with a reason."""

import numpy as np
from helpers import load, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax
from tvm_qmfrg.passes.prune import QMFRGPrune

from tvm_qmfrg.onnxio.synthetic import GraphBuilder


@st.composite
def random_graphs(draw):
    g = GraphBuilder("random_graph", draw(st.integers(0, 2**16)))
    tensors = [("input", 3)]  # (name, channels); spatial size stays 8x8
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "concat", "pool_relu"]))
        src, cin = draw(st.sampled_from(tensors))
        if kind == "conv":
            cout = draw(st.integers(2, 9))
            k = draw(st.sampled_from([1, 3]))
            y = g.conv(src, cin, cout, k=k, bias=draw(st.booleans()))
            if draw(st.booleans()):
                y = g.batchnorm(y, cout)
            if draw(st.booleans()):
                y = g.node("Relu", [y])
            tensors.append((y, cout))
        elif kind == "residual":
            y = g.node("Relu", [g.node("Add", [g.conv(src, cin, cin), src])])
            tensors.append((y, cin))
        elif kind == "concat":
            other, c2 = draw(st.sampled_from(tensors))
            tensors.append((g.node("Concat", [src, other], axis=1), cin + c2))
        else:
            y = g.node("MaxPool", [src], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
            tensors.append((g.node("Relu", [y]), cin))
    last, c = tensors[-1]
    if draw(st.booleans()):
        flat = g.node("Flatten", [g.node("GlobalAveragePool", [last])], axis=1)
        width = c
    else:
        flat = g.node("Flatten", [last], axis=1)
        width = c * 64
    y = g.node("Gemm", [flat, g.const(g.randn(5, width), "fc_w")], "gemm", transB=1)
    g.rename_output(y, "logits")
    return g.model({"input": [1, 3, 8, 8]}, {"logits": [1, 5]})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    random_graphs(),
    st.sampled_from([0.0, 0.3, 0.6]),
    st.sampled_from(["qmfrg", "magnitude", "fpgm"]),
)
def test_random_graphs_prune_or_freeze(model, sparsity, criterion):
    mod = load(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    prune = QMFRGPrune(criterion=criterion, sparsity=sparsity)
    pruned = prune(mod)
    relax.analysis.well_formed(pruned)
    out = run(pruned, x)
    assert out.shape == (1, 5) and np.all(np.isfinite(out))
    assert all(f.reason for f in prune.plan.frozen)
    if sparsity == 0.0:
        np.testing.assert_allclose(out, run(mod, x), rtol=1e-5, atol=1e-5)
