"""Seeded synthetic ONNX models of the families the toolkit targets.

Used by the tests, benchmarks and tutorials wherever a model's *shape* matters and trained
weights do not (the trained model that ships with the package is ``data/digits_resnet.onnx``).
Every builder is deterministic for a given seed and returns a checked ``onnx.ModelProto``
with static shapes and weights as initializers.
"""

from __future__ import annotations

import numpy as np
import onnx

from tvm_qmfrg.onnxio import builder


class GraphBuilder(builder.GraphBuilder):
    """:class:`~tvm_qmfrg.onnxio.builder.GraphBuilder` with seeded weights and the layers
    the model families here are made of (conv-BN-act, residual, dense, classifier)."""

    def __init__(self, name: str, seed: int = 0):
        super().__init__(name)
        self.rng = np.random.default_rng(seed)

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

    def conv_bn(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "Relu",
    ) -> str:
        y = self.batchnorm(self.conv(x, cin, cout, k, stride, groups), cout)
        if act == "Relu":
            y = self.node("Relu", [y])
        elif act == "Relu6":
            y = self.node("Clip", [y, self.constant(np.float32(0)), self.constant(np.float32(6))])
        return y

    def residual(self, x: str, y: str, cin: int, cout: int, stride: int) -> str:
        """``relu(y + shortcut(x))``; the shortcut is a strided 1x1 conv-BN when shapes differ."""
        short = (
            x if stride == 1 and cin == cout else self.conv_bn(x, cin, cout, 1, stride, act=None)
        )
        return self.node("Relu", [self.node("Add", [y, short])])

    def classifier(self, x: str, cin: int, classes: int, image: int) -> onnx.ModelProto:
        """Global average pool, flatten, Gemm to ``logits``; the finished model."""
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        w = self.const(self.randn(classes, cin), "fc_w")
        b = self.const(self.randn(classes, scale=0.1), "fc_b")
        self.rename_output(self.node("Gemm", [x, w, b], "gemm", transB=1), "logits")
        return self.model({"input": [1, 3, image, image]}, {"logits": [1, classes]})

    def dense(self, x: str, cin: int, cout: int, bias: bool = True) -> str:
        y = self.node(
            "MatMul",
            [x, self.const(self.randn(cin, cout, scale=np.sqrt(2 / cin)), "fc_w")],
            "matmul",
        )
        if bias:
            y = self.node("Add", [y, self.const(self.randn(cout, scale=0.1), "fc_b")], "add")
        return y


def small_cnn(
    seed: int = 0, channels: tuple[int, ...] = (8, 16), classes: int = 10, image: int = 8
) -> onnx.ModelProto:
    """Conv-BN-ReLU stack, global average pool, Gemm classifier. Input ``(1, 3, image, image)``."""
    g = GraphBuilder("small_cnn", seed)
    x, cin = "input", 3
    for cout in channels:
        x = g.node("Relu", [g.batchnorm(g.conv(x, cin, cout), cout)])
        cin = cout
    return g.classifier(x, cin, classes, image)


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


def resnet_cifar(
    seed: int = 0,
    widths: tuple[int, ...] = (8, 16, 32, 64),
    blocks: int = 2,
    image: int = 16,
    classes: int = 10,
) -> onnx.ModelProto:
    """ResNet-18-style: basic blocks with residual adds, strided 1x1 shortcuts, GAP, Gemm."""
    g = GraphBuilder("resnet_cifar", seed)
    x = g.conv_bn("input", 3, widths[0])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            y = g.conv_bn(x, cin, cout, stride=stride)
            y = g.conv_bn(y, cout, cout, act=None)
            x = g.residual(x, y, cin, cout, stride)
            cin = cout
    return g.classifier(x, cin, classes, image)


def mobilenet_v2(seed: int = 0, image: int = 16, classes: int = 10) -> onnx.ModelProto:
    """MobileNetV2-style: inverted residuals (1x1 expand, depthwise 3x3, 1x1 project), ReLU6."""
    g = GraphBuilder("mobilenet_v2", seed)
    x = g.conv_bn("input", 3, 8, stride=2, act="Relu6")
    cin = 8
    for cout, expand, stride in ((8, 3, 1), (12, 4, 2), (12, 4, 1), (16, 4, 1)):
        hidden = cin * expand
        y = g.conv_bn(x, cin, hidden, k=1, act="Relu6")
        y = g.conv_bn(y, hidden, hidden, stride=stride, groups=hidden, act="Relu6")
        y = g.conv_bn(y, hidden, cout, k=1, act=None)
        x = g.node("Add", [x, y]) if stride == 1 and cin == cout else y
        cin = cout
    x = g.conv_bn(x, cin, 32, k=1, act="Relu6")
    return g.classifier(x, 32, classes, image)


def vgg(seed: int = 0, image: int = 16, classes: int = 10) -> onnx.ModelProto:
    """VGG-style plain net: conv-BN-ReLU pairs, max pooling, flatten into two dense layers."""
    g = GraphBuilder("vgg", seed)
    x, cin = "input", 3
    for cout in (8, 16):
        x = g.conv_bn(g.conv_bn(x, cin, cout), cout, cout)
        x = g.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    side = image // 4
    x = g.node("Flatten", [x], axis=1)
    x = g.node("Relu", [g.dense(x, cin * side * side, 32)])
    y = g.dense(x, 32, classes)
    g.rename_output(y, "logits")
    return g.model({"input": [1, 3, image, image]}, {"logits": [1, classes]})


def bert_encoder(
    seed: int = 0, layers: int = 2, d_model: int = 32, heads: int = 4, d_ff: int = 64, seq: int = 8
) -> onnx.ModelProto:
    """BERT-style encoder on embeddings ``(1, seq, d_model)``: multi-head self-attention,
    residual + LayerNorm, erf-GELU feed-forward."""
    g = GraphBuilder("bert_encoder", seed)
    dh = d_model // heads
    x = "input"

    def layer_norm(t: str) -> str:
        gamma = g.const((1 + 0.1 * g.rng.standard_normal(d_model)).astype(np.float32), "ln_g")
        beta = g.const((0.1 * g.rng.standard_normal(d_model)).astype(np.float32), "ln_b")
        return g.node("LayerNormalization", [t, gamma, beta], "ln", axis=-1, epsilon=1e-5)

    split = g.constant(np.array([1, seq, heads, dh], dtype=np.int64), "shape")
    merge = g.constant(np.array([1, seq, d_model], dtype=np.int64), "shape")
    for _ in range(layers):
        q, k, v = (g.node("Reshape", [g.dense(x, d_model, d_model), split]) for _ in range(3))
        q = g.node("Transpose", [q], perm=[0, 2, 1, 3])
        k = g.node("Transpose", [k], perm=[0, 2, 3, 1])
        v = g.node("Transpose", [v], perm=[0, 2, 1, 3])
        scores = g.node("Div", [g.node("MatMul", [q, k]), g.constant(np.float32(np.sqrt(dh)))])
        probs = g.node("Softmax", [scores], axis=-1)
        ctx = g.node("Transpose", [g.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        attn = g.dense(g.node("Reshape", [ctx, merge]), d_model, d_model)
        x = layer_norm(g.node("Add", [x, attn]))
        h = g.dense(x, d_model, d_ff)
        erf = g.node("Erf", [g.node("Div", [h, g.constant(np.float32(np.sqrt(2.0)))])])
        gelu = g.node(
            "Mul",
            [
                g.node("Mul", [h, g.node("Add", [erf, g.constant(np.float32(1))])]),
                g.constant(np.float32(0.5)),
            ],
        )
        x = layer_norm(g.node("Add", [x, g.dense(gelu, d_ff, d_model)]))
    g.rename_output(x, "output")
    return g.model({"input": [1, seq, d_model]}, {"output": [1, seq, d_model]})


def resnet50(seed: int = 0, image: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50-shaped (bottlenecks [3, 4, 6, 3], widths 64..2048), seeded random weights."""
    g = GraphBuilder("resnet50", seed)
    x = g.conv_bn("input", 3, 64, k=7, stride=2)
    x = g.node("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            cout = width * 4
            y = g.conv_bn(x, cin, width, k=1)
            y = g.conv_bn(y, width, width, k=3, stride=stride)
            y = g.conv_bn(y, width, cout, k=1, act=None)
            x = g.residual(x, y, cin, cout, stride)
            cin = cout
    return g.classifier(x, cin, classes, image)


def bert_base(seed: int = 0, seq: int = 128) -> onnx.ModelProto:
    """BERT-base-shaped encoder: 12 layers, d_model 768, 12 heads, FFN 3072."""
    return bert_encoder(seed=seed, layers=12, d_model=768, heads=12, d_ff=3072, seq=seq)
