"""Seeded synthetic ONNX models of the families the toolkit targets.

Used by the tests, benchmarks and tutorials wherever a model's *shape* matters and trained
weights do not (the trained model that ships with the package is ``data/digits_resnet.onnx``).
Every builder is deterministic for a given seed and returns a checked ``onnx.ModelProto``
with static shapes and weights as initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Small helper to emit ONNX nodes with fresh names and seeded initializers."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self.fresh(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def randn(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        s = np.sqrt(2.0 / fan_in) if scale is None else scale
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> str:
        w = self.const(self.randn(cout, cin // groups, k, k), "conv_w")
        inputs = [x, w]
        if bias:
            inputs.append(self.const(self.randn(cout, scale=0.1), "conv_b"))
        p = k // 2
        return self.node(
            "Conv",
            inputs,
            "conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=groups,
        )

    def batchnorm(self, x: str, c: int) -> str:
        gamma = self.const((1.0 + 0.2 * self.rng.standard_normal(c)).astype(np.float32), "bn_g")
        beta = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32), "bn_b")
        mean = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32), "bn_m")
        var = self.const((0.5 + self.rng.random(c)).astype(np.float32), "bn_v")
        return self.node("BatchNormalization", [x, gamma, beta, mean, var], "bn", epsilon=1e-5)

    def dense(self, x: str, cin: int, cout: int, bias: bool = True) -> str:
        y = self.node(
            "MatMul",
            [x, self.const(self.randn(cin, cout, scale=np.sqrt(2 / cin)), "fc_w")],
            "matmul",
        )
        if bias:
            y = self.node("Add", [y, self.const(self.randn(cout, scale=0.1), "fc_b")], "add")
        return y

    def model(self, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def rename_output(self, tensor: str, name: str) -> None:
        """Make the node producing ``tensor`` write to ``name`` instead (for graph outputs)."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = name


def small_cnn(
    seed: int = 0, channels: tuple[int, ...] = (8, 16), classes: int = 10, image: int = 8
) -> onnx.ModelProto:
    """Conv-BN-ReLU stack, global average pool, Gemm classifier. Input ``(1, 3, image, image)``."""
    g = GraphBuilder("small_cnn", seed)
    x, cin = "input", 3
    for cout in channels:
        x = g.node("Relu", [g.batchnorm(g.conv(x, cin, cout), cout)])
        cin = cout
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    w = g.const(g.randn(classes, cin), "fc_w")
    b = g.const(g.randn(classes, scale=0.1), "fc_b")
    y = g.node("Gemm", [x, w, b], "gemm", transB=1)
    g.rename_output(y, "logits")
    return g.model({"input": [1, 3, image, image]}, {"logits": [1, classes]})


def mlp(seed: int = 0, sizes: tuple[int, ...] = (32, 64, 48, 10)) -> onnx.ModelProto:
    """MatMul+Add layers with ReLU between them. Input ``(1, sizes[0])``."""
    g = GraphBuilder("mlp", seed)
    x = "input"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        x = g.dense(x, a, b)
        if i < len(sizes) - 2:
            x = g.node("Relu", [x])
    g.rename_output(x, "output")
    return g.model({"input": [1, sizes[0]]}, {"output": [1, sizes[-1]]})
