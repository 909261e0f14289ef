"""A frontier recomputes only what a changed node made stale, and gives what a full run gives."""

import numpy as np
import onnx
from helpers import input_shape
from onnx import numpy_helper
from tvm_qmfrg.passes.calibrated import _session
from tvm_qmfrg.passes.frontier import Frontier, can_cut

from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.onnxio.runtime import run_onnx


def _conv_nodes(model):
    return [n for n in model.graph.node if n.op_type == "Conv"]


def _with_weight_scaled(model, node, factor):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = {t.name: t for t in out.graph.initializer}[node.input[1]]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    return out


def _setup():
    model = synthetic.resnet_cifar(seed=2)
    x = np.random.default_rng(0).standard_normal((3, *input_shape(model)[1:])).astype(np.float32)
    name = model.graph.input[0].name
    feeds = [{name: x[i : i + 1]} for i in range(3)]
    return model, feeds


def _full(model, feeds, tensor):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return [run_onnx(probe, f)[-1] for f in feeds]


def test_values_of_a_frontier_are_those_of_the_whole_graph():
    model, feeds = _setup()
    assert can_cut(model)
    front = Frontier(model, feeds, _session)
    convs = _conv_nodes(model)
    for node in (convs[2], convs[-1]):  # the second request runs from where the first stopped
        got = front.values([node.output[0]])
        for g, want in zip(got, _full(model, feeds, node.output[0])):
            np.testing.assert_allclose(g[0], want, rtol=1e-4, atol=1e-4)
    assert front.windows == 2


def test_a_changed_node_makes_only_the_values_downstream_of_it_stale():
    model, feeds = _setup()
    front = Frontier(model, feeds, _session)
    convs = _conv_nodes(model)
    early, late = convs[1].input[0], convs[-1].output[0]
    before = front.values([early, late])
    changed = _with_weight_scaled(model, convs[3], 0.5)
    front.update(changed, {convs[3].name})
    assert early in front.kept and late not in front.kept
    after = front.values([early, late])
    for b, a, want in zip(before, after, _full(changed, feeds, late)):
        assert a[0] is b[0]  # upstream of the change: kept, not recomputed
        np.testing.assert_allclose(a[1], want, rtol=1e-4, atol=1e-4)
        assert not np.allclose(a[1], b[1])


def test_a_frontier_over_its_budget_drops_the_oldest_values_and_still_answers():
    model, feeds = _setup()
    front = Frontier(model, feeds, _session, budget=1)
    convs = _conv_nodes(model)
    front.values([convs[0].output[0]])
    got = front.values([convs[-1].output[0]])
    assert list(front.kept) == [convs[-1].output[0]]  # only what was asked last is held
    for g, want in zip(got, _full(model, feeds, convs[-1].output[0])):
        np.testing.assert_allclose(g[0], want, rtol=1e-4, atol=1e-4)
