"""Read ONNX models and the linear operators in them, without TVM.

A *linear operator* here is a Conv, Gemm or MatMul node whose weight is a constant
(initializer or ``Constant`` node). Its per-output-channel affine epilogue is folded in when
the node's only consumer is a ``BatchNormalization`` (Conv) or an ``Add`` of a constant vector
(MatMul), so the operator is ``y = scale * (W x + b) + shift`` as DESIGN.md's channel states
require.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from tvm_qmfrg.errors import ModelError, check_weight, one_line
from tvm_qmfrg.operators import LinearOperator
from tvm_qmfrg.spectral import batchnorm_affine


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model; any failure is a :class:`ModelError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from exc
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: invalid ONNX model ({one_line(exc)})") from exc
    return model


def model_name(model: onnx.ModelProto, fallback: str = "model") -> str:
    return model.graph.name or fallback


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: initializers and ``Constant`` outputs."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def linear_operators(model: onnx.ModelProto, name: str | None = None) -> list[LinearOperator]:
    """The model's constant-weight linear operators in graph order, epilogues folded."""
    mname = name or model_name(model)
    consts = constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for inp in node.input:
            consumers[inp].append(node)
    ops = []
    for i, node in enumerate(model.graph.node):
        node_name = node.name or f"{node.op_type}_{i}"
        where = f"{mname}: node '{node_name}'"
        parsed = _parse_linear(node, consts, where)
        if parsed is None:
            continue
        kind, weight, bias, groups = parsed
        scale = np.ones(weight.shape[0])
        shift = np.zeros(weight.shape[0])
        folded = []
        only = consumers.get(node.output[0], [])
        if len(only) == 1:
            nxt = only[0]
            affine = _epilogue(nxt, node.output[0], consts, weight.shape[0], kind)
            if affine is not None:
                scale, shift = affine
                folded.append(nxt.name or nxt.op_type)
        bias = scale * bias + shift
        weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        ops.append(
            LinearOperator(node_name, node.op_type, kind, weight, bias, groups, tuple(folded))
        )
    return ops


def _parse_linear(node: onnx.NodeProto, consts: dict, where: str):
    """``(kind, weight, bias, groups)`` for a constant-weight linear node, else None."""
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in consts:
        w = check_weight(consts[node.input[1]], f"{where} weight")
        bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        b = (
            np.zeros(w.shape[0])
            if bias is None
            else check_weight(bias, f"{where} bias", allow_zero=True)
        )
        return "conv", w, b.reshape(-1), int(_attrs(node).get("group", 1))
    if node.op_type == "MatMul" and node.input[1] in consts:
        w = consts[node.input[1]]
        if w.ndim != 2:
            return None
        return "dense", check_weight(w, f"{where} weight").T, np.zeros(w.shape[1]), 1
    if node.op_type == "Gemm" and node.input[1] in consts:
        a = _attrs(node)
        if a.get("transA", 0):
            return None
        w = check_weight(consts[node.input[1]], f"{where} weight") * a.get("alpha", 1.0)
        w = w if a.get("transB", 0) else w.T
        b = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2] in consts:
            c = check_weight(consts[node.input[2]], f"{where} bias", allow_zero=True) * a.get(
                "beta", 1.0
            )
            b = np.broadcast_to(c.reshape(-1), (w.shape[0],)).astype(np.float64)
        return "dense", w, b, 1
    return None


def _epilogue(node: onnx.NodeProto, src: str, consts: dict, channels: int, kind: str):
    """Per-channel ``(scale, shift)`` of a BatchNormalization / bias Add consuming ``src``."""
    if node.op_type == "BatchNormalization" and kind == "conv" and node.input[0] == src:
        if not all(name in consts for name in node.input[1:5]):
            return None
        gamma, beta, mean, var = (consts[name] for name in node.input[1:5])
        return batchnorm_affine(gamma, beta, mean, var, float(_attrs(node).get("epsilon", 1e-5)))
    if node.op_type == "Add" and kind == "dense":
        other = node.input[1] if node.input[0] == src else node.input[0]
        if (
            other in consts
            and consts[other].size == channels
            and consts[other].shape[-1] == channels
        ):
            return np.ones(channels), consts[other].astype(np.float64).reshape(-1)
    return None


def default_model_path() -> str:
    """Path of the model that ships with the package (a ResNet trained on sklearn digits)."""
    from importlib.resources import files

    return str(files("tvm_qmfrg") / "data" / "digits_resnet.onnx")


def operator_names(model: onnx.ModelProto) -> list[str]:
    """Names of Conv/Gemm/MatMul nodes with a constant weight, in graph order.

    TVM's ONNX frontend keeps node order, so these name the Relax conv2d/matmul ops with
    constant weights one to one (unnamed nodes get ``OpType_index``).
    """
    consts = constants(model)
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            if node.input[1] in consts:
                names.append(node.name or f"{node.op_type}_{i}")
    return names
