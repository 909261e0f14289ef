"""Small ONNX models reproducing the graph idioms that real exporters write.

Each builder returns a complete (small) network as an ``onnx.ModelProto`` built with
``onnx.helper`` and seeded numpy weights only, so the corpus is deterministic and needs
neither a framework nor a download. The graphs are written the way the exporter named in
each builder's doc string writes them: node names (``/features/features.0/Conv``), the
shape arithmetic exporters emit around dynamic dimensions, weights as initializers or as
``Constant`` nodes, and so on. BatchNormalization layers carry realistic random running
statistics, and about one channel in eight has a near-zero scale the way a
sparsity-regularised (network slimming) training leaves it.

``CORPUS`` maps a model's name to its builder; ``FAMILY`` gives its family ("cnn",
"detector", "transformer") and ``INPUT_SHAPES`` a static shape for each graph input (batch
1 where the graph's batch dimension is the symbolic ``batch``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

_FLOAT = TensorProto.FLOAT
_INT64 = TensorProto.INT64
_INT32 = TensorProto.INT32


class _Builder:
    """Accumulates nodes and weights; names every node the way an exporter does."""

    def __init__(self, seed: int, *, weights_as_constants: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights_as_constants = weights_as_constants
        self._used: dict[str, int] = {}

    # -- naming -------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        """``/a/Conv``, ``/a/Conv_1``, ... as the PyTorch exporter disambiguates names."""
        count = self._used.get(name, 0)
        self._used[name] = count + 1
        return name if count == 0 else f"{name}_{count}"

    # -- nodes --------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        *,
        outputs: list[str] | None = None,
        n_out: int = 1,
        **attrs,
    ):
        """Append a node named ``name`` (made unique); return its output name(s)."""
        name = self._unique(name)
        if outputs is None:
            outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def const(self, scope: str, value, dtype=np.int64, *, name: str | None = None) -> str:
        """A ``Constant`` node (exporters write shape/scalar operands this way)."""
        array = np.asarray(value, dtype=dtype)
        node_name = name if name is not None else f"{scope}/Constant"
        return self.op("Constant", [], node_name, value=numpy_helper.from_array(array))

    def param(self, name: str, array: np.ndarray) -> str:
        """A learned tensor: an initializer, or a Constant node for Paddle-style graphs."""
        array = np.asarray(array, dtype=np.float32)
        if self.weights_as_constants:
            self.op(
                "Constant",
                [],
                f"p2o.Constant.{name}",
                outputs=[name],
                value=numpy_helper.from_array(array),
            )
        else:
            self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    # -- random weights -----------------------------------------------------------------
    def conv_weight(self, cout: int, cin_per_group: int, kh: int, kw: int) -> np.ndarray:
        fan_in = cin_per_group * kh * kw
        shape = (cout, cin_per_group, kh, kw)
        return self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)

    def bias(self, n: int, scale: float = 0.05) -> np.ndarray:
        return self.rng.standard_normal(n) * scale

    def bn_stats(self, c: int) -> tuple[np.ndarray, ...]:
        """gamma, beta, running mean, running var as a trained, slimmed network has them."""
        gamma = self.rng.uniform(0.5, 1.5, c)
        n_small = max(1, c // 8)
        small = self.rng.choice(c, n_small, replace=False)
        gamma[small] = self.rng.uniform(0.0, 0.05, n_small)
        beta = self.rng.standard_normal(c) * 0.1
        mean = self.rng.standard_normal(c) * 0.2
        var = self.rng.uniform(0.5, 2.0, c)
        return gamma, beta, mean, var

    # -- layers (PyTorch naming: node scope "/a/b", parameters "a.b.weight") -------------
    def conv(
        self,
        scope: str,
        x: str,
        cin: int,
        cout: int,
        k: int,
        *,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
        params: str | None = None,
        name: str | None = None,
        out: str | None = None,
    ) -> str:
        params = params if params is not None else _param_prefix(scope)
        pad = k // 2 if pad is None else pad
        inputs = [x, self.param(f"{params}.weight", self.conv_weight(cout, cin // group, k, k))]
        if bias:
            inputs.append(self.param(f"{params}.bias", self.bias(cout)))
        return self.op(
            "Conv",
            inputs,
            name if name is not None else f"{scope}/Conv",
            outputs=None if out is None else [out],
            dilations=[1, 1],
            group=group,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def conv_transpose(
        self,
        scope: str,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        *,
        pad: int = 0,
        out: str | None = None,
    ) -> str:
        params = _param_prefix(scope)
        w = self.rng.standard_normal((cin, cout, k, k)) * np.sqrt(2.0 / (cin * k * k))
        inputs = [
            x,
            self.param(f"{params}.weight", w),
            self.param(f"{params}.bias", self.bias(cout)),
        ]
        return self.op(
            "ConvTranspose",
            inputs,
            f"{scope}/ConvTranspose",
            outputs=None if out is None else [out],
            dilations=[1, 1],
            group=1,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def bn(
        self,
        scope: str,
        x: str,
        c: int,
        *,
        eps: float = 1e-5,
        params: str | None = None,
        names: tuple[str, str, str, str] | None = None,
        name: str | None = None,
        out: str | None = None,
    ) -> str:
        params = params if params is not None else _param_prefix(scope)
        if names is None:
            names = tuple(
                f"{params}.{p}" for p in ("weight", "bias", "running_mean", "running_var")
            )
        stats = self.bn_stats(c)
        inputs = [x] + [self.param(n, a) for n, a in zip(names, stats)]
        return self.op(
            "BatchNormalization",
            inputs,
            name if name is not None else f"{scope}/BatchNormalization",
            outputs=None if out is None else [out],
            epsilon=eps,
            momentum=0.9,
        )

    def gemm(self, scope: str, x: str, cin: int, cout: int, *, out: str | None = None) -> str:
        """``nn.Linear`` as torch exports it: Gemm(alpha=1, beta=1, transB=1)."""
        params = _param_prefix(scope)
        w = self.rng.standard_normal((cout, cin)) * np.sqrt(1.0 / cin)
        inputs = [
            x,
            self.param(f"{params}.weight", w),
            self.param(f"{params}.bias", self.bias(cout)),
        ]
        outputs = None if out is None else [out]
        return self.op(
            "Gemm", inputs, f"{scope}/Gemm", outputs=outputs, alpha=1.0, beta=1.0, transB=1
        )

    def matmul_add(self, scope: str, x: str, cin: int, cout: int, *, params: str) -> str:
        """``nn.Linear`` on a rank-3 input: MatMul by the (in, out) transposed weight + Add."""
        w = self.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)
        y = self.op("MatMul", [x, self.param(f"onnx::MatMul_{params}", w)], f"{scope}/MatMul")
        return self.op("Add", [self.param(f"{params}.bias", self.bias(cout)), y], f"{scope}/Add")

    def clip6(self, scope: str, x: str) -> str:
        """ReLU6 as torch exports it: Clip with min/max operands 0 and 6."""
        lo = self.const(scope, 0.0, np.float32)
        hi = self.const(scope, 6.0, np.float32)
        return self.op("Clip", [x, lo, hi], f"{scope}/Clip")

    def silu(self, scope: str, x: str) -> str:
        """``nn.SiLU`` as torch.onnx writes it (ONNX has no SiLU op): Sigmoid then Mul."""
        s = self.op("Sigmoid", [x], f"{scope}/Sigmoid")
        return self.op("Mul", [x, s], f"{scope}/Mul")

    def unsqueeze(self, scope: str, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(scope, axes)], f"{scope}/Unsqueeze")

    def model(
        self,
        graph_name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        doc: str,
        *,
        producer: str,
        producer_version: str,
        opset: int = OPSET,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, inputs, outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            ir_version=IR_VERSION,
            producer_name=producer,
            producer_version=producer_version,
            doc_string=doc,
        )
        return model


def _param_prefix(scope: str) -> str:
    """The state-dict prefix of a torch node scope.

    torch writes a child of a Sequential/ModuleList twice (``/features/features.0/...``)
    where the state dict has it once (``features.0.weight``).
    """
    parts = scope.strip("/").split("/")
    kept = [p for p, nxt in zip(parts, parts[1:] + [""]) if not nxt.startswith(p + ".")]
    return ".".join(kept)


def _tensor(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _FLOAT, dims)


def _doc(fn: Callable) -> str:
    return " ".join((fn.__doc__ or "").split())


# ----------------------------------------------------------------------------------------
# 1. TF "SAME" padding computed at runtime (timm Conv2dSame / pad_same, PyTorch export)
# ----------------------------------------------------------------------------------------


def _same_pad(b: _Builder, scope: str, x: str, k: int, s: int, *, torch_chain: bool) -> str:
    """TF "SAME" padding computed from ``x.shape`` at runtime, feeding ``Pad``.

    ``pad = max((ceil(i / s) - 1) * s + (k - 1) + 1 - i, 0)`` per spatial dim on rank-1 int64
    tensors (``Shape -> Gather(indices=[axis])``), split into ``pad // 2`` before and the rest
    after. With ``torch_chain`` the ``[w_l, w_r, h_l, h_r]`` list goes through torch's
    ``_prepare_onnx_paddings`` (Concat with ConstantOfShape zeros, Reshape(-1, 2), flip by a
    step -1 Slice, Transpose, Reshape(-1), Cast) as ``F.pad`` writes it; otherwise the pads are
    concatenated directly in ONNX order and Cast.
    """
    shape = b.op("Shape", [x], f"{scope}/Shape")
    sides = []
    for axis in (2, 3):
        i = b.op("Gather", [shape, b.const(scope, [axis])], f"{scope}/Gather", axis=0)
        t = b.op("Add", [i, b.const(scope, s - 1)], f"{scope}/Add")
        t = b.op("Div", [t, b.const(scope, s)], f"{scope}/Div")  # ceil(i / s)
        t = b.op("Sub", [t, b.const(scope, 1)], f"{scope}/Sub")
        t = b.op("Mul", [t, b.const(scope, s)], f"{scope}/Mul")
        t = b.op("Add", [t, b.const(scope, k)], f"{scope}/Add")  # + (k - 1) * d + 1
        t = b.op("Sub", [t, i], f"{scope}/Sub")
        pad = b.op("Max", [t, b.const(scope, 0)], f"{scope}/Max")
        before = b.op("Div", [pad, b.const(scope, 2)], f"{scope}/Div")
        after = b.op("Sub", [pad, before], f"{scope}/Sub")
        sides.append((before, after))
    (h_l, h_r), (w_l, w_r) = sides
    if not torch_chain:
        zeros = b.const(scope, [0, 0])
        pad = b.op("Concat", [zeros, h_l, w_l, zeros, h_r, w_r], f"{scope}/Concat", axis=0)
        pad = b.op("Cast", [pad], f"{scope}/Cast", to=_INT64)
        value = b.const(scope, 0.0, np.float32)
        return b.op("Pad", [x, pad, value], f"{scope}/Pad", mode="constant")
    pad = b.op("Concat", [w_l, w_r, h_l, h_r], f"{scope}/Concat", axis=0)
    # torch.onnx symbolic_opset11._prepare_onnx_paddings
    pad_len = b.op(
        "Gather",
        [b.op("Shape", [pad], f"{scope}/Shape"), b.const(scope, [0])],
        f"{scope}/Gather",
        axis=0,
    )
    extension = b.op(
        "Sub",
        [b.op("Mul", [b.const(scope, 4), b.const(scope, 2)], f"{scope}/Mul"), pad_len],
        f"{scope}/Sub",
    )
    pad = b.op("Cast", [pad], f"{scope}/Cast", to=_INT64)
    zeros = b.op(
        "ConstantOfShape",
        [extension],
        f"{scope}/ConstantOfShape",
        value=numpy_helper.from_array(np.zeros(1, np.int64)),
    )
    pad = b.op("Concat", [pad, zeros], f"{scope}/Concat", axis=0)
    pad = b.op("Reshape", [pad, b.const(scope, [-1, 2])], f"{scope}/Reshape")
    pad = b.op(
        "Slice",
        [
            pad,
            b.const(scope, [-1]),
            b.const(scope, [-(2**63) + 1]),
            b.const(scope, [0]),
            b.const(scope, [-1]),
        ],
        f"{scope}/Slice",
    )
    pad = b.op("Transpose", [pad], f"{scope}/Transpose", perm=[1, 0])
    pad = b.op("Reshape", [pad, b.const(scope, [-1])], f"{scope}/Reshape")
    pad = b.op("Cast", [pad], f"{scope}/Cast", to=_INT64)
    value = b.const(scope, 0.0, np.float32)
    return b.op("Pad", [x, pad, value], f"{scope}/Pad", mode="constant")


def _tf_conv_bn_act(
    b: _Builder,
    x: str,
    conv: str,
    bn: str,
    cin: int,
    cout: int,
    k: int,
    *,
    stride: int = 1,
    group: int = 1,
    act: bool = True,
    torch_chain: bool = False,
) -> str:
    if stride > 1:  # asymmetric TF SAME: dynamic Pad then an unpadded conv
        x = _same_pad(b, conv, x, k, stride, torch_chain=torch_chain)
        y = b.conv(conv, x, cin, cout, k, stride=stride, pad=0, group=group, bias=False)
    else:  # stride 1 SAME is symmetric: timm folds it into the conv's static pads
        y = b.conv(conv, x, cin, cout, k, stride=1, group=group, bias=False)
    y = b.bn(bn, y, cout, eps=1e-3)
    return b.clip6(f"{bn}/act", y) if act else y


def tf_same_padding_mobilenet() -> onnx.ModelProto:
    """PyTorch (torch.onnx, TorchScript exporter) export of a TF-trained MobileNetV2-style net
    ported with timm ``Conv2dSame``/``pad_same``: every stride-2 conv is preceded by a ``Pad``
    whose pads are computed at runtime, ``Shape -> Gather(indices=[axis]) -> Add/Div/Sub/Mul/Max
    (Constant operands) -> Concat -> Cast -> Pad`` (the stem directly, the block through torch's
    ``_prepare_onnx_paddings`` Reshape/Slice/Transpose chain), Conv/BN(eps 1e-3)/ReLU6 as
    ``Clip(x, 0, 6)``, depthwise convs (group = C), inverted residual blocks with ``Add``, and a
    GlobalAveragePool -> Flatten -> Gemm(transB=1) classifier.
    """
    b = _Builder(seed=101)
    x = "input"
    y = _tf_conv_bn_act(b, x, "/conv_stem", "/bn1", 3, 16, 3, stride=2)  # 16x16
    # blocks.0.0: depthwise-separable, residual
    s = "/blocks/blocks.0/blocks.0.0"
    t = _tf_conv_bn_act(b, y, f"{s}/conv_dw", f"{s}/bn1", 16, 16, 3, group=16)
    t = _tf_conv_bn_act(b, t, f"{s}/conv_pw", f"{s}/bn2", 16, 16, 1, act=False)
    y = b.op("Add", [t, y], f"{s}/Add")
    # blocks.1.0: inverted residual 16 -> 24, stride 2 (dynamic SAME pad)
    s = "/blocks/blocks.1/blocks.1.0"
    t = _tf_conv_bn_act(b, y, f"{s}/conv_pw", f"{s}/bn1", 16, 48, 1)
    t = _tf_conv_bn_act(
        b, t, f"{s}/conv_dw", f"{s}/bn2", 48, 48, 3, stride=2, group=48, torch_chain=True
    )
    y = _tf_conv_bn_act(b, t, f"{s}/conv_pwl", f"{s}/bn3", 48, 24, 1, act=False)  # 8x8
    # blocks.1.1: inverted residual 24 -> 24, residual
    s = "/blocks/blocks.1/blocks.1.1"
    t = _tf_conv_bn_act(b, y, f"{s}/conv_pw", f"{s}/bn1", 24, 64, 1)
    t = _tf_conv_bn_act(b, t, f"{s}/conv_dw", f"{s}/bn2", 64, 64, 3, group=64)
    t = _tf_conv_bn_act(b, t, f"{s}/conv_pwl", f"{s}/bn3", 64, 24, 1, act=False)
    y = b.op("Add", [t, y], f"{s}/Add")
    y = _tf_conv_bn_act(b, y, "/conv_head", "/bn2", 24, 64, 1)
    y = b.op("GlobalAveragePool", [y], "/global_pool/pool/GlobalAveragePool")
    y = b.op("Flatten", [y], "/global_pool/flatten/Flatten", axis=1)
    b.gemm("/classifier", y, 64, 10, out="output")
    return b.model(
        "main_graph",
        [_tensor("input", ["batch", 3, 32, 32])],
        [_tensor("output", ["batch", 10])],
        _doc(tf_same_padding_mobilenet),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# 2. PaddlePaddle: weights in Constant nodes, runtime-shape flatten, MatMul + Add fc
# ----------------------------------------------------------------------------------------


class _Paddle:
    """paddle2onnx naming: nodes ``p2o.Conv.3``, tensors ``conv2d_3.tmp_0``, ``conv2d_3.w_0``."""

    def __init__(self, b: _Builder):
        self.b = b
        self.count: dict[str, int] = {}

    def layer(self, kind: str) -> int:
        n = self.count.get(kind, 0)
        self.count[kind] = n + 1
        return n

    def node(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        n = self.layer(f"p2o.{op_type}")
        return self.b.op(op_type, inputs, f"p2o.{op_type}.{n}", outputs=[out], **attrs)

    def const(self, value, dtype=np.int64) -> str:
        n = self.layer("p2o.Constant")
        name = f"p2o.Constant.{n}"
        return self.b.const("", value, dtype, name=name)

    def conv(self, x, cin, cout, k, *, stride=1, group=1, bias=False) -> str:
        b = self.b
        n = self.layer("conv2d")
        inputs = [x, b.param(f"conv2d_{n}.w_0", b.conv_weight(cout, cin // group, k, k))]
        if bias:
            inputs.append(b.param(f"conv2d_{n}.b_0", b.bias(cout)))
        out = f"conv2d_{n}.tmp_{1 if bias else 0}"
        return self.node(
            "Conv",
            inputs,
            out,
            dilations=[1, 1],
            group=group,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            strides=[stride, stride],
        )

    def bn(self, x, c) -> str:
        n = self.layer("batch_norm")
        names = (
            f"batch_norm_{n}.w_0",
            f"batch_norm_{n}.b_0",
            f"batch_norm_{n}.w_1",
            f"batch_norm_{n}.w_2",
        )
        stats = self.b.bn_stats(c)
        inputs = [x] + [self.b.param(nm, a) for nm, a in zip(names, stats)]
        return self.node(
            "BatchNormalization", inputs, f"batch_norm_{n}.tmp_2", epsilon=1e-5, momentum=0.9
        )

    def act(self, op_type: str, x: str, kind: str, **attrs) -> str:
        n = self.layer(kind)
        return self.node(op_type, [x], f"{kind}_{n}.tmp_0", **attrs)

    def hard_swish_mul(self, x: str) -> str:
        """paddle ``hardswish`` at opset < 14: ``x * HardSigmoid(x, 1/6, 0.5)``."""
        n = self.layer("hardswish")
        g = self.node("HardSigmoid", [x], f"hardswish_{n}.tmp_0.hs", alpha=1 / 6, beta=0.5)
        return self.node("Mul", [x, g], f"hardswish_{n}.tmp_0")


def paddle_constant_weights() -> onnx.ModelProto:
    """paddle2onnx export of a PaddleClas/PaddleOCR MobileNetV3/PP-LCNet-style classifier:
    every weight and BatchNormalization parameter is a ``Constant`` node (the graph has no
    initializers at all), conv (no bias) + BN + ReLU/hard-swish stacks, hard-swish written both
    as ``x * HardSigmoid(x)`` and as ``HardSwish``, a squeeze-excitation block
    (GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> HardSigmoid(slope 0.2) -> Mul),
    ``flatten_contiguous_range`` written as ``Reshape(x, Concat(Cast(Slice(Cast(Shape(x)))),
    [-1]))``, and the fc layer as ``MatMul`` + ``Add`` followed by Softmax.
    """
    b = _Builder(seed=202, weights_as_constants=True)
    p = _Paddle(b)
    y = p.conv("x", 3, 16, 3, stride=2)  # 16x16
    y = p.bn(y, 16)
    y = p.hard_swish_mul(y)
    # depthwise
    y = p.conv(y, 16, 16, 3, group=16)
    y = p.bn(y, 16)
    y = p.act("Relu", y, "relu")
    # squeeze-excitation
    g = p.act("GlobalAveragePool", y, "pool2d")
    g = p.conv(g, 16, 4, 1, bias=True)
    g = p.act("Relu", g, "relu")
    g = p.conv(g, 4, 16, 1, bias=True)
    g = p.act("HardSigmoid", g, "hardsigmoid", alpha=0.2, beta=0.5)
    y = p.node("Mul", [y, g], f"elementwise_mul_{p.layer('elementwise_mul')}")
    # pointwise + HardSwish op
    y = p.conv(y, 16, 32, 1)
    y = p.bn(y, 32)
    y = p.act("HardSwish", y, "hardswish")
    y = p.conv(y, 32, 32, 3, stride=2)  # 8x8
    y = p.bn(y, 32)
    y = p.act("Relu", y, "relu")
    y = p.act("GlobalAveragePool", y, "pool2d")
    # flatten_contiguous_range(start_axis=1, stop_axis=-1)
    n = p.layer("flatten")
    shape = p.node("Shape", [y], f"flatten_{n}.tmp_0.shape")
    shape = p.node("Cast", [shape], f"flatten_{n}.tmp_0.shape32", to=_INT32)
    front = p.node(
        "Slice",
        [shape, p.const([0]), p.const([1]), p.const([0])],
        f"flatten_{n}.tmp_0.front",
    )
    front = p.node("Cast", [front], f"flatten_{n}.tmp_0.front64", to=_INT64)
    target = p.node("Concat", [front, p.const([-1])], f"flatten_{n}.tmp_0.target", axis=0)
    y = p.node("Reshape", [y, target], f"flatten_{n}.tmp_0")
    # fc: MatMul + Add (weight stored (in, out))
    w = b.param("linear_0.w_0", b.rng.standard_normal((32, 10)) * np.sqrt(1 / 32))
    y = p.node("MatMul", [y, w], "linear_0.tmp_0")
    y = p.node("Add", [y, b.param("linear_0.b_0", b.bias(10))], "linear_0.tmp_1")
    p.node("Softmax", [y], "softmax_0.tmp_0", axis=-1)
    return b.model(
        "paddle-onnx",
        [_tensor("x", ["batch", 3, 32, 32])],
        [_tensor("softmax_0.tmp_0", ["batch", 10])],
        _doc(paddle_constant_weights),
        producer="PaddlePaddle",
        producer_version="2.5.2",
    )


# ----------------------------------------------------------------------------------------
# 3. Ultralytics YOLOv8 (dynamic=True export): C2f, SPPF, PAN, DFL, runtime anchor grid
# ----------------------------------------------------------------------------------------


def _y_conv(b: _Builder, scope: str, x: str, cin: int, cout: int, k: int, s: int = 1) -> str:
    """ultralytics ``Conv`` after ``fuse()``: Conv with bias (BN folded) + SiLU."""
    y = b.conv(f"{scope}/conv", x, cin, cout, k, stride=s)
    return b.silu(f"{scope}/act", y)


def _c2f(b: _Builder, scope: str, x: str, cin: int, cout: int, shortcut: bool) -> str:
    c = cout // 2
    y = _y_conv(b, f"{scope}/cv1", x, cin, 2 * c, 1)
    y0, y1 = b.op("Split", [y, b.const(scope, [c, c])], f"{scope}/Split", n_out=2, axis=1)
    m = f"{scope}/m/m.0"
    t = _y_conv(b, f"{m}/cv1", y1, c, c, 3)
    t = _y_conv(b, f"{m}/cv2", t, c, c, 3)
    if shortcut:
        t = b.op("Add", [y1, t], f"{m}/Add")
    cat = b.op("Concat", [y0, y1, t], f"{scope}/Concat", axis=1)
    return _y_conv(b, f"{scope}/cv2", cat, 3 * c, cout, 1)


def _sppf(b: _Builder, scope: str, x: str, cin: int, cout: int) -> str:
    c = cin // 2
    y = _y_conv(b, f"{scope}/cv1", x, cin, c, 1)
    pools = [y]
    for i in range(3):
        sub = "m" if i == 0 else f"m_{i}"
        pools.append(
            b.op(
                "MaxPool",
                [pools[-1]],
                f"{scope}/{sub}/MaxPool",
                ceil_mode=0,
                dilations=[1, 1],
                kernel_shape=[5, 5],
                pads=[2, 2, 2, 2],
                strides=[1, 1],
            )
        )
    cat = b.op("Concat", pools, f"{scope}/Concat", axis=1)
    return _y_conv(b, f"{scope}/cv2", cat, 4 * c, cout, 1)


def _upsample(b: _Builder, scope: str, x: str) -> str:
    """``nn.Upsample(scale_factor=2, mode="nearest")`` as torch 2.x writes it."""
    scales = b.const(scope, [1.0, 1.0, 2.0, 2.0], np.float32)
    return b.op(
        "Resize",
        [x, "", scales],
        f"{scope}/Resize",
        coordinate_transformation_mode="asymmetric",
        cubic_coeff_a=-0.75,
        mode="nearest",
        nearest_mode="floor",
    )


def _anchors(b: _Builder, scope: str, feat: str, stride: float) -> tuple[str, str]:
    """ultralytics ``make_anchors`` for one level, traced with dynamic shapes."""
    shape = b.op("Shape", [feat], f"{scope}/Shape")
    h = b.op("Gather", [shape, b.const(scope, 2)], f"{scope}/Gather", axis=0)
    w = b.op("Gather", [shape, b.const(scope, 3)], f"{scope}/Gather", axis=0)

    def arange(dim: str) -> str:
        end = b.op("Cast", [dim], f"{scope}/Cast", to=_FLOAT)
        r = b.op(
            "Range",
            [b.const(scope, 0.0, np.float32), end, b.const(scope, 1.0, np.float32)],
            f"{scope}/Range",
        )
        return b.op("Add", [r, b.const(scope, 0.5, np.float32)], f"{scope}/Add")

    sx, sy = arange(w), arange(h)
    grid = b.op(
        "Concat",
        [b.unsqueeze(scope, h, [0]), b.unsqueeze(scope, w, [0])],
        f"{scope}/Concat",
        axis=0,
    )
    # torch.meshgrid(sy, sx, indexing="ij")
    gy = b.op("Reshape", [sy, b.const(scope, [-1, 1])], f"{scope}/Reshape")
    gy = b.op("Expand", [gy, grid], f"{scope}/Expand")
    gx = b.op("Reshape", [sx, b.const(scope, [1, -1])], f"{scope}/Reshape")
    gx = b.op("Expand", [gx, grid], f"{scope}/Expand")
    # torch.stack((sx, sy), -1).view(-1, 2)
    pts = b.op(
        "Concat",
        [b.unsqueeze(scope, gx, [-1]), b.unsqueeze(scope, gy, [-1])],
        f"{scope}/Concat",
        axis=-1,
    )
    pts = b.op("Reshape", [pts, b.const(scope, [-1, 2])], f"{scope}/Reshape")
    # torch.full((h * w, 1), stride)
    hw = b.op("Mul", [h, w], f"{scope}/Mul")
    full = b.op(
        "Concat", [b.unsqueeze(scope, hw, [0]), b.const(scope, [1])], f"{scope}/Concat", axis=0
    )
    st = b.op(
        "ConstantOfShape",
        [full],
        f"{scope}/ConstantOfShape",
        value=numpy_helper.from_array(np.array([stride], np.float32)),
    )
    return pts, st


def yolo_c2f_detector() -> onnx.ModelProto:
    """Ultralytics YOLOv8 ``export(format="onnx", dynamic=True)`` (PyTorch 2.x TorchScript
    exporter) of a tiny detector: BN already fused into Conv (Conv with bias) and SiLU written
    as ``Sigmoid`` + ``Mul``; C2f blocks (Conv -> Split in two along channels -> bottlenecks
    with residual Add -> Concat -> Conv), SPPF (three 5x5 MaxPools + Concat), a PAN neck with
    ``Resize`` (nearest, scale 2) + Concat with the earlier level, a two-level Detect head
    (stride 8 and 16) with DFL (Reshape to (b, 4, 16, a) -> Transpose -> Softmax -> 1x1 Conv
    with fixed arange weights), and the anchor grid computed at runtime from the feature map
    shapes (Shape/Gather/Cast/Range/Reshape/Expand/Unsqueeze/Concat/ConstantOfShape), decoded
    with Split/Sub/Add/Div/Mul by stride and concatenated with the class sigmoids.
    """
    b = _Builder(seed=303)
    nc, reg_max = 4, 16
    x = _y_conv(b, "/model.0", "images", 3, 8, 3, 2)  # 32x32
    x = _y_conv(b, "/model.1", x, 8, 16, 3, 2)  # 16x16
    x = _c2f(b, "/model.2", x, 16, 16, True)
    x = _y_conv(b, "/model.3", x, 16, 32, 3, 2)  # 8x8, stride 8
    p3 = _c2f(b, "/model.4", x, 32, 32, True)
    x = _y_conv(b, "/model.5", p3, 32, 64, 3, 2)  # 4x4, stride 16
    x = _c2f(b, "/model.6", x, 64, 64, True)
    p4 = _sppf(b, "/model.7", x, 64, 64)
    # PAN neck
    x = _upsample(b, "/model.8", p4)
    x = b.op("Concat", [x, p3], "/model.9/Concat", axis=1)
    n3 = _c2f(b, "/model.10", x, 96, 32, False)  # P3 out
    x = _y_conv(b, "/model.11", n3, 32, 32, 3, 2)
    x = b.op("Concat", [x, p4], "/model.12/Concat", axis=1)
    n4 = _c2f(b, "/model.13", x, 96, 64, False)  # P4 out
    # Detect head
    d = "/model.14"
    c2, c3, no = 64, 32, nc + 4 * reg_max
    levels = []
    for i, (feat, ch) in enumerate(((n3, 32), (n4, 64))):
        box = _y_conv(b, f"{d}/cv2.{i}/cv2.{i}.0", feat, ch, c2, 3)
        box = _y_conv(b, f"{d}/cv2.{i}/cv2.{i}.1", box, c2, c2, 3)
        box = b.conv(f"{d}/cv2.{i}/cv2.{i}.2", box, c2, 4 * reg_max, 1)
        cls = _y_conv(b, f"{d}/cv3.{i}/cv3.{i}.0", feat, ch, c3, 3)
        cls = _y_conv(b, f"{d}/cv3.{i}/cv3.{i}.1", cls, c3, c3, 3)
        cls = b.conv(f"{d}/cv3.{i}/cv3.{i}.2", cls, c3, nc, 1)
        levels.append(b.op("Concat", [box, cls], f"{d}/Concat", axis=1))
    # x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
    shape = b.op("Shape", [levels[0]], f"{d}/Shape")
    batch = b.op("Gather", [shape, b.const(d, 0)], f"{d}/Gather", axis=0)
    flat = []
    for lv in levels:
        target = b.op(
            "Concat",
            [b.unsqueeze(d, batch, [0]), b.const(d, [no]), b.const(d, [-1])],
            f"{d}/Concat",
            axis=0,
        )
        flat.append(b.op("Reshape", [lv, target], f"{d}/Reshape"))
    x_cat = b.op("Concat", flat, f"{d}/Concat", axis=2)
    box, cls = b.op("Split", [x_cat, b.const(d, [4 * reg_max, nc])], f"{d}/Split", n_out=2, axis=1)
    # anchors, strides = (x.transpose(0, 1) for x in make_anchors(x, self.stride, 0.5))
    pts, sts = zip(*(_anchors(b, d, lv, s) for lv, s in zip(levels, (8.0, 16.0))))
    anchors = b.op("Concat", list(pts), f"{d}/Concat", axis=0)
    anchors = b.op("Transpose", [anchors], f"{d}/Transpose", perm=[1, 0])
    strides = b.op("Concat", list(sts), f"{d}/Concat", axis=0)
    strides = b.op("Transpose", [strides], f"{d}/Transpose", perm=[1, 0])
    # DFL: x.view(b, 4, c1, a).transpose(2, 1).softmax(1) -> conv -> view(b, 4, a)
    f = f"{d}/dfl"
    bshape = b.op("Shape", [box], f"{f}/Shape")
    bb = b.unsqueeze(f, b.op("Gather", [bshape, b.const(f, 0)], f"{f}/Gather", axis=0), [0])
    aa = b.unsqueeze(f, b.op("Gather", [bshape, b.const(f, 2)], f"{f}/Gather", axis=0), [0])
    target = b.op("Concat", [bb, b.const(f, [4]), b.const(f, [reg_max]), aa], f"{f}/Concat", axis=0)
    t = b.op("Reshape", [box, target], f"{f}/Reshape")
    t = b.op("Transpose", [t], f"{f}/Transpose", perm=[0, 2, 1, 3])
    t = b.op("Softmax", [t], f"{f}/Softmax", axis=1)
    arange = np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1)
    t = b.op(
        "Conv",
        [t, b.param("model.14.dfl.conv.weight", arange)],
        f"{f}/conv/Conv",
        dilations=[1, 1],
        group=1,
        kernel_shape=[1, 1],
        pads=[0, 0, 0, 0],
        strides=[1, 1],
    )
    target = b.op("Concat", [bb, b.const(f, [4]), aa], f"{f}/Concat", axis=0)
    dist = b.op("Reshape", [t, target], f"{f}/Reshape")
    # dist2bbox(dist, anchors.unsqueeze(0), xywh=True, dim=1) * strides
    lt, rb = b.op("Split", [dist, b.const(d, [2, 2])], f"{d}/Split", n_out=2, axis=1)
    anc = b.unsqueeze(d, anchors, [0])
    x1y1 = b.op("Sub", [anc, lt], f"{d}/Sub")
    x2y2 = b.op("Add", [anc, rb], f"{d}/Add")
    c_xy = b.op("Add", [x1y1, x2y2], f"{d}/Add")
    c_xy = b.op("Div", [c_xy, b.const(d, 2.0, np.float32)], f"{d}/Div")
    wh = b.op("Sub", [x2y2, x1y1], f"{d}/Sub")
    dbox = b.op("Concat", [c_xy, wh], f"{d}/Concat", axis=1)
    dbox = b.op("Mul", [dbox, strides], f"{d}/Mul")
    scores = b.op("Sigmoid", [cls], f"{d}/Sigmoid")
    b.op("Concat", [dbox, scores], f"{d}/Concat", outputs=["output0"], axis=1)
    return b.model(
        "main_graph",
        [_tensor("images", ["batch", 3, 64, 64])],
        [_tensor("output0", ["batch", 4 + nc, "anchors"])],
        _doc(yolo_c2f_detector),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# 4. DBNet text detector: FPN with Resize (scales and sizes), ConvTranspose head
# ----------------------------------------------------------------------------------------


def _resize(b: _Builder, scope: str, x: str, *, scale: float | None = None, sizes=None) -> str:
    """``F.interpolate(x, scale_factor=s)`` (scales input) or ``size=`` (sizes input)."""
    if sizes is None:
        scales = b.const(scope, [1.0, 1.0, scale, scale], np.float32)
        inputs = [x, "", scales]
    else:
        inputs = [x, "", "", sizes]
    return b.op(
        "Resize",
        inputs,
        f"{scope}/Resize",
        coordinate_transformation_mode="asymmetric",
        cubic_coeff_a=-0.75,
        mode="nearest",
        nearest_mode="floor",
    )


def _cbr(b: _Builder, scope: str, x: str, cin: int, cout: int, k: int, s: int) -> str:
    y = b.conv(f"{scope}/conv", x, cin, cout, k, stride=s, bias=False)
    y = b.bn(f"{scope}/bn", y, cout)
    return b.op("Relu", [y], f"{scope}/relu/Relu")


def dbnet_fpn() -> onnx.ModelProto:
    """DBNet text detector (PaddleOCR DBFPN/DBHead design, PyTorch-style export): a small
    Conv/BN/Relu backbone with stride-2 stages (c2..c5 at strides 4..32), an FPN with 1x1
    lateral convs, top-down ``Resize`` (nearest, scales input) + ``Add`` across levels, 3x3
    smoothing convs whose outputs are upsampled to the stride-4 level (the coarsest one through
    a ``sizes`` input computed ``Shape -> Slice -> Concat`` from the c2 map, as
    ``F.interpolate(p5, size=c2.shape[2:])`` writes it) and concatenated, and the probability
    head Conv/BN/Relu -> ConvTranspose(stride 2) -> BN -> Relu -> ConvTranspose(stride 2) ->
    Sigmoid.
    """
    b = _Builder(seed=404)
    x = _cbr(b, "/backbone/stem", "x", 3, 8, 3, 2)  # 32x32
    c2 = _cbr(b, "/backbone/stage1", x, 8, 16, 3, 2)  # 16x16
    c3 = _cbr(b, "/backbone/stage2", c2, 16, 32, 3, 2)  # 8x8
    c4 = _cbr(b, "/backbone/stage3", c3, 32, 48, 3, 2)  # 4x4
    c5 = _cbr(b, "/backbone/stage4", c4, 48, 64, 3, 2)  # 2x2
    inner, out = 32, 8
    lat = {}
    for name, c, ch in (("in2", c2, 16), ("in3", c3, 32), ("in4", c4, 48), ("in5", c5, 64)):
        lat[name] = b.conv(f"/neck/{name}_conv", c, ch, inner, 1, bias=False)
    out4 = b.op("Add", [lat["in4"], _resize(b, "/neck", lat["in5"], scale=2.0)], "/neck/Add")
    out3 = b.op("Add", [lat["in3"], _resize(b, "/neck", out4, scale=2.0)], "/neck/Add")
    out2 = b.op("Add", [lat["in2"], _resize(b, "/neck", out3, scale=2.0)], "/neck/Add")
    p5 = b.conv("/neck/p5_conv", lat["in5"], inner, out, 3, bias=False)
    p4 = b.conv("/neck/p4_conv", out4, inner, out, 3, bias=False)
    p3 = b.conv("/neck/p3_conv", out3, inner, out, 3, bias=False)
    p2 = b.conv("/neck/p2_conv", out2, inner, out, 3, bias=False)
    # F.interpolate(p5, size=c2.shape[2:])
    s = "/neck"
    head = b.op(
        "Slice",
        [b.op("Shape", [p5], f"{s}/Shape"), b.const(s, [0]), b.const(s, [2]), b.const(s, [0])],
        f"{s}/Slice",
    )
    hw = b.op(
        "Slice",
        [b.op("Shape", [c2], f"{s}/Shape"), b.const(s, [2]), b.const(s, [4]), b.const(s, [0])],
        f"{s}/Slice",
    )
    sizes = b.op("Concat", [head, hw], f"{s}/Concat", axis=0)
    p5 = _resize(b, s, p5, sizes=sizes)
    p4 = _resize(b, s, p4, scale=4.0)
    p3 = _resize(b, s, p3, scale=2.0)
    fuse = b.op("Concat", [p5, p4, p3, p2], f"{s}/Concat", axis=1)  # 32 ch at 16x16
    h = "/head/binarize"
    y = b.conv(f"{h}/conv1", fuse, 4 * out, 8, 3, bias=False)
    y = b.bn(f"{h}/conv_bn1", y, 8)
    y = b.op("Relu", [y], f"{h}/relu1/Relu")
    y = b.conv_transpose(f"{h}/conv2", y, 8, 8, 2, 2)  # 32x32
    y = b.bn(f"{h}/conv_bn2", y, 8)
    y = b.op("Relu", [y], f"{h}/relu2/Relu")
    y = b.conv_transpose(f"{h}/conv3", y, 8, 1, 2, 2)  # 64x64
    b.op("Sigmoid", [y], f"{h}/Sigmoid", outputs=["maps"])
    return b.model(
        "main_graph",
        [_tensor("x", ["batch", 3, 64, 64])],
        [_tensor("maps", ["batch", 1, 64, 64])],
        _doc(dbnet_fpn),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# 5. MobileNetV3 (torchvision): HardSwish, SE with HardSigmoid, grouped conv
# ----------------------------------------------------------------------------------------


def _cbh(
    b: _Builder, scope: str, x: str, cin: int, cout: int, k: int, *, s=1, g=1, act="hs"
) -> str:
    """torchvision ``Conv2dNormActivation``: ``{scope}.0`` conv, ``.1`` BN, ``.2`` act."""
    y = b.conv(
        f"{scope}/{scope.rsplit('/', 1)[1]}.0", x, cin, cout, k, stride=s, group=g, bias=False
    )
    y = b.bn(f"{scope}/{scope.rsplit('/', 1)[1]}.1", y, cout, eps=1e-3)
    if act == "hs":
        y = b.op("HardSwish", [y], f"{scope}/{scope.rsplit('/', 1)[1]}.2/HardSwish")
    return y


def _se(b: _Builder, scope: str, x: str, c: int, squeeze: int) -> str:
    """torchvision ``SqueezeExcitation`` with ``scale_activation=Hardsigmoid``."""
    g = b.op("GlobalAveragePool", [x], f"{scope}/avgpool/GlobalAveragePool")
    g = b.conv(f"{scope}/fc1", g, c, squeeze, 1)
    g = b.op("Relu", [g], f"{scope}/activation/Relu")
    g = b.conv(f"{scope}/fc2", g, squeeze, c, 1)
    g = b.op("HardSigmoid", [g], f"{scope}/scale_activation/HardSigmoid", alpha=1 / 6, beta=0.5)
    return b.op("Mul", [g, x], f"{scope}/Mul")


def se_hardsigmoid_mobilenetv3() -> onnx.ModelProto:
    """torchvision MobileNetV3 exported with torch.onnx (opset 17, BN kept): a stem
    Conv/BN/HardSwish, inverted residual blocks expand 1x1 -> BN -> HardSwish -> depthwise
    (3x3 and 5x5 stride 2) -> BN -> HardSwish -> squeeze-excitation (GlobalAveragePool, 1x1
    conv, Relu, 1x1 conv, HardSigmoid, Mul) -> project 1x1 -> BN with a residual ``Add``, a
    grouped 3x3 conv with groups=4 (1 < groups < C) inside a residual block, the last 1x1
    conv, and a GlobalAveragePool -> Flatten -> Gemm -> HardSwish -> Gemm classifier.
    """
    b = _Builder(seed=505)
    y = _cbh(b, "/features/features.0", "input", 3, 16, 3, s=2)  # 16x16
    # features.1: 16 -> exp 32 -> 16, k3, SE, residual
    s = "/features/features.1/block"
    t = _cbh(b, f"{s}/block.0", y, 16, 32, 1)
    t = _cbh(b, f"{s}/block.1", t, 32, 32, 3, g=32)
    t = _se(b, f"{s}/block.2", t, 32, 8)
    t = _cbh(b, f"{s}/block.3", t, 32, 16, 1, act=None)
    y = b.op("Add", [t, y], "/features/features.1/Add")
    # features.2: 16 -> exp 48 -> 24, k5 stride 2, SE
    s = "/features/features.2/block"
    t = _cbh(b, f"{s}/block.0", y, 16, 48, 1)
    t = _cbh(b, f"{s}/block.1", t, 48, 48, 5, s=2, g=48)  # 8x8
    t = _se(b, f"{s}/block.2", t, 48, 16)
    y = _cbh(b, f"{s}/block.3", t, 48, 24, 1, act=None)
    # features.3: grouped 3x3 conv (groups=4) 24 -> 48, project 48 -> 24, residual
    s = "/features/features.3/block"
    t = _cbh(b, f"{s}/block.0", y, 24, 48, 3, g=4)
    t = _cbh(b, f"{s}/block.1", t, 48, 24, 1, act=None)
    y = b.op("Add", [t, y], "/features/features.3/Add")
    y = _cbh(b, "/features/features.4", y, 24, 64, 1)
    y = b.op("GlobalAveragePool", [y], "/avgpool/GlobalAveragePool")
    y = b.op("Flatten", [y], "/Flatten", axis=1)
    y = b.gemm("/classifier/classifier.0", y, 64, 32)
    y = b.op("HardSwish", [y], "/classifier/classifier.1/HardSwish")
    b.gemm("/classifier/classifier.3", y, 32, 10, out="logits")
    return b.model(
        "main_graph",
        [_tensor("input", ["batch", 3, 32, 32])],
        [_tensor("logits", ["batch", 10])],
        _doc(se_hardsigmoid_mobilenetv3),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# 6. Transformer encoder block: decomposed LayerNorm, fused qkv + Split, Erf GELU
# ----------------------------------------------------------------------------------------


def _layer_norm(b: _Builder, scope: str, x: str, dim: int) -> str:
    """``nn.LayerNorm`` decomposed as torch.onnx writes it for opsets below 17 (where ONNX has
    no LayerNormalization op; many shipped transformer exports keep this form): ReduceMean,
    Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add.
    """
    params = _param_prefix(scope)
    mean = b.op("ReduceMean", [x], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    d = b.op("Sub", [x, mean], f"{scope}/Sub")
    sq = b.op("Pow", [d, b.const(scope, 2.0, np.float32)], f"{scope}/Pow")
    var = b.op("ReduceMean", [sq], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    var = b.op("Add", [var, b.const(scope, 1e-6, np.float32)], f"{scope}/Add")
    std = b.op("Sqrt", [var], f"{scope}/Sqrt")
    y = b.op("Div", [d, std], f"{scope}/Div")
    gamma = b.param(f"{params}.weight", b.rng.uniform(0.8, 1.2, dim))
    beta = b.param(f"{params}.bias", b.rng.standard_normal(dim) * 0.02)
    y = b.op("Mul", [y, gamma], f"{scope}/Mul")
    return b.op("Add", [y, beta], f"{scope}/Add")


def attention_fused_qkv() -> onnx.ModelProto:
    """A ViT/timm-style pre-LN transformer encoder block as torch.onnx writes it (the LayerNorm
    decomposition is the pre-opset-17 form, kept here under opset 17): decomposed
    LayerNorm (ReduceMean, Sub, Pow(2), ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta),
    one fused qkv ``MatMul`` (64 -> 192) + Add bias, ``Split`` into q, k, v, Reshape to
    (1, 16, 4, 16) with constant shapes, Transpose, MatMul q k^T, Div by sqrt(d_head), Softmax,
    MatMul v, Transpose, Reshape back, output projection MatMul + Add, residual Add, FFN MatMul
    + Add -> GELU written with Erf (``x * 0.5 * (1 + erf(x / sqrt 2))``) -> MatMul + Add,
    residual, final LayerNorm, mean pooling over the sequence (ReduceMean) and a Gemm
    classifier. Input: token embeddings (1, 16, 64), 4 heads.
    """
    b = _Builder(seed=606)
    seq, dim, heads, ffn = 16, 64, 4, 128
    dh = dim // heads
    blk = "/blocks/blocks.0"
    h = _layer_norm(b, f"{blk}/norm1", "input", dim)
    a = f"{blk}/attn"
    qkv = b.matmul_add(f"{a}/qkv", h, dim, 3 * dim, params="blocks.0.attn.qkv")
    q, k, v = b.op("Split", [qkv, b.const(a, [dim] * 3)], f"{a}/Split", n_out=3, axis=-1)
    shape = b.const(a, [1, seq, heads, dh])
    q = b.op("Reshape", [q, shape], f"{a}/Reshape")
    k = b.op("Reshape", [k, shape], f"{a}/Reshape")
    v = b.op("Reshape", [v, shape], f"{a}/Reshape")
    q = b.op("Transpose", [q], f"{a}/Transpose", perm=[0, 2, 1, 3])
    kt = b.op("Transpose", [k], f"{a}/Transpose", perm=[0, 2, 3, 1])
    v = b.op("Transpose", [v], f"{a}/Transpose", perm=[0, 2, 1, 3])
    s = b.op("MatMul", [q, kt], f"{a}/MatMul")
    s = b.op("Div", [s, b.const(a, float(np.sqrt(dh)), np.float32)], f"{a}/Div")
    s = b.op("Softmax", [s], f"{a}/Softmax", axis=-1)
    o = b.op("MatMul", [s, v], f"{a}/MatMul")
    o = b.op("Transpose", [o], f"{a}/Transpose", perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.const(a, [1, seq, dim])], f"{a}/Reshape")
    o = b.matmul_add(f"{a}/proj", o, dim, dim, params="blocks.0.attn.proj")
    x = b.op("Add", ["input", o], f"{blk}/Add")
    h = _layer_norm(b, f"{blk}/norm2", x, dim)
    m = f"{blk}/mlp"
    h = b.matmul_add(f"{m}/fc1", h, dim, ffn, params="blocks.0.mlp.fc1")
    g = f"{m}/act"
    e = b.op("Div", [h, b.const(g, float(np.sqrt(2.0)), np.float32)], f"{g}/Div")
    e = b.op("Erf", [e], f"{g}/Erf")
    e = b.op("Add", [e, b.const(g, 1.0, np.float32)], f"{g}/Add")
    e = b.op("Mul", [h, e], f"{g}/Mul")
    h = b.op("Mul", [e, b.const(g, 0.5, np.float32)], f"{g}/Mul")
    h = b.matmul_add(f"{m}/fc2", h, ffn, dim, params="blocks.0.mlp.fc2")
    x = b.op("Add", [x, h], f"{blk}/Add")
    x = _layer_norm(b, "/norm", x, dim)
    x = b.op("ReduceMean", [x], "/ReduceMean", axes=[1], keepdims=0)
    b.gemm("/head", x, dim, 8, out="logits")
    return b.model(
        "main_graph",
        [_tensor("input", [1, seq, dim])],
        [_tensor("logits", [1, 8])],
        _doc(attention_fused_qkv),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# 7. Squeeze/Unsqueeze head, Linear SE gate, ConvTranspose decoder consumer
# ----------------------------------------------------------------------------------------


def squeeze_unsqueeze_head() -> onnx.ModelProto:
    """A two-headed PyTorch CNN (torch.onnx, opset 17) whose code squeezes and unsqueezes
    explicitly: the classifier head is ``GlobalAveragePool -> Squeeze(axes [2, 3]) -> Gemm``
    (``self.pool(x).squeeze(3).squeeze(2)`` / ``torch.squeeze`` style, with the axes as a
    Constant input), an SE gate built from Linear layers
    (GlobalAveragePool -> Squeeze -> Gemm -> Relu -> Gemm -> Sigmoid -> ``Unsqueeze(axes 2, 3)``
    -> Mul), and a decoder branch in which a ``ConvTranspose`` consumes the (prunable) channels
    of a conv: Conv -> Relu -> ConvTranspose(stride 2) -> ``recon`` output.
    """
    b = _Builder(seed=707)
    y = _cbr(b, "/stem", "input", 3, 16, 3, 1)  # 32x32
    y = _cbr(b, "/layer1", y, 16, 32, 3, 2)  # 16x16
    s = "/layer1/se"
    g = b.op("GlobalAveragePool", [y], f"{s}/GlobalAveragePool")
    g = b.op("Squeeze", [g, b.const(s, [2, 3])], f"{s}/Squeeze")
    g = b.gemm(f"{s}/fc1", g, 32, 8)
    g = b.op("Relu", [g], f"{s}/Relu")
    g = b.gemm(f"{s}/fc2", g, 8, 32)
    g = b.op("Sigmoid", [g], f"{s}/Sigmoid")
    g = b.unsqueeze(s, g, [2, 3])
    y = b.op("Mul", [y, g], f"{s}/Mul")
    y = _cbr(b, "/layer2", y, 32, 32, 3, 1)
    # classification head
    p = b.op("GlobalAveragePool", [y], "/head/GlobalAveragePool")
    p = b.op("Squeeze", [p, b.const("/head", [2, 3])], "/head/Squeeze")
    b.gemm("/head/fc", p, 32, 10, out="logits")
    # decoder: conv -> relu -> ConvTranspose consumes the conv's channels
    d = b.conv("/decoder/conv", y, 32, 16, 3)
    d = b.op("Relu", [d], "/decoder/relu/Relu")
    b.conv_transpose("/decoder/deconv", d, 16, 3, 4, 2, pad=1, out="recon")  # 32x32
    return b.model(
        "main_graph",
        [_tensor("input", ["batch", 3, 32, 32])],
        [_tensor("logits", ["batch", 10]), _tensor("recon", ["batch", 3, 32, 32])],
        _doc(squeeze_unsqueeze_head),
        producer="pytorch",
        producer_version="2.1.0",
    )


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------

CORPUS: dict[str, Callable[[], onnx.ModelProto]] = {
    "tf_same_padding_mobilenet": tf_same_padding_mobilenet,
    "paddle_constant_weights": paddle_constant_weights,
    "yolo_c2f_detector": yolo_c2f_detector,
    "dbnet_fpn": dbnet_fpn,
    "se_hardsigmoid_mobilenetv3": se_hardsigmoid_mobilenetv3,
    "attention_fused_qkv": attention_fused_qkv,
    "squeeze_unsqueeze_head": squeeze_unsqueeze_head,
}

FAMILY: dict[str, str] = {
    "tf_same_padding_mobilenet": "cnn",
    "paddle_constant_weights": "cnn",
    "yolo_c2f_detector": "detector",
    "dbnet_fpn": "detector",
    "se_hardsigmoid_mobilenetv3": "cnn",
    "attention_fused_qkv": "transformer",
    "squeeze_unsqueeze_head": "cnn",
}

# A static shape per graph input; the symbolic ``batch`` dimension is taken as 1.
INPUT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "tf_same_padding_mobilenet": {"input": (1, 3, 32, 32)},
    "paddle_constant_weights": {"x": (1, 3, 32, 32)},
    "yolo_c2f_detector": {"images": (1, 3, 64, 64)},
    "dbnet_fpn": {"x": (1, 3, 64, 64)},
    "se_hardsigmoid_mobilenetv3": {"input": (1, 3, 32, 32)},
    "attention_fused_qkv": {"input": (1, 16, 64)},
    "squeeze_unsqueeze_head": {"input": (1, 3, 32, 32)},
}


def random_inputs(name: str, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 feeds for model ``name`` (``batch`` replaces dim 0
    where the graph's batch is symbolic)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    model_inputs = {i.name: i for i in CORPUS[name]().graph.input} if batch != 1 else {}
    for input_name, shape in INPUT_SHAPES[name].items():
        shape = list(shape)
        if batch != 1 and model_inputs[input_name].type.tensor_type.shape.dim[0].dim_param:
            shape[0] = batch
        feeds[input_name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
