"""The one ONNX graph builder: names, initializers, Constant nodes, a checked model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tvm_qmfrg.onnxio.builder import GraphBuilder
from tvm_qmfrg.onnxio.runtime import run_onnx


def test_fresh_names_share_one_counter_and_given_names_stay_unique():
    g = GraphBuilder("names")
    assert g.const(np.ones(2, np.float32)) == "w_1"
    assert g.node("Relu", ["x"]) == "relu_2"
    assert g.node("Add", ["x", "w_1"], "sum") == "sum_3"
    assert g.named("Relu", ["x"], "l0.act") == "l0.act"
    assert g.named("Relu", ["x"], "l0.act") == "l0.act_1"
    assert [n.name for n in g.nodes] == [o for n in g.nodes for o in n.output]


def test_a_built_model_is_checked_and_computes_its_graph():
    g = GraphBuilder("affine")
    w = g.const(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), name="weight")
    shift = g.constant(np.array([0.5, -0.5], np.float32))
    y = g.node("Add", [g.node("MatMul", ["input", w]), shift])
    g.rename_output(y, "output")
    model = g.model({"input": [1, 2]}, {"output": [1, 2]})
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert [i.name for i in model.graph.initializer] == ["weight"]
    x = np.array([[1.0, 1.0]], np.float32)
    (got,) = run_onnx(model, {"input": x})
    np.testing.assert_allclose(got, [[4.5, 5.5]])


def test_typed_inputs_are_taken_as_value_infos():
    g = GraphBuilder("cast")
    g.rename_output(g.node("Cast", ["ids"], to=TensorProto.FLOAT), "out")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])
    model = g.model([ids], [out])
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64


def test_an_invalid_graph_is_refused_when_the_model_is_made():
    g = GraphBuilder("broken")
    g.rename_output(g.node("NoSuchOp", ["input"]), "output")
    with pytest.raises(onnx.checker.ValidationError):
        g.model({"input": [1]}, {"output": [1]})
