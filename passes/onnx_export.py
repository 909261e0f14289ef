"""Write a (pruned) Relax module back to ONNX, for ONNX Runtime users.

The pruned module *is* the plan applied to the model, so emitting it op by op gives the
pruned ONNX model with every initializer, shape constant and ``group`` attribute already
consistent. Covered: the ops the pruning pass understands and the ONNX frontend produces for
CNNs, MLPs and transformer encoders; anything else is a clear :class:`GraphError` naming the
op, never a silently different graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from onnx import helper
from tvm import relax

from tvm_qmfrg.errors import GraphError
from tvm_qmfrg.onnxio.builder import GraphBuilder

OPSET = 17

_ELEMENTWISE = {
    "relax.add": "Add",
    "relax.subtract": "Sub",
    "relax.multiply": "Mul",
    "relax.divide": "Div",
    "relax.maximum": "Max",
    "relax.minimum": "Min",
    "relax.nn.relu": "Relu",
    "relax.sigmoid": "Sigmoid",
    "relax.tanh": "Tanh",
    "relax.erf": "Erf",
    "relax.exp": "Exp",
    "relax.sqrt": "Sqrt",
    "relax.negative": "Neg",
    "relax.abs": "Abs",
    "relax.matmul": "MatMul",
    "relax.less": "Less",
    "relax.greater": "Greater",
    "relax.equal": "Equal",
    "relax.where": "Where",
    "relax.power": "Pow",
}


def _dims(expr) -> list:
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else str(v) for v in expr.ty.shape.values]


def _value_info(name: str, expr) -> onnx.ValueInfoProto:
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(str(expr.ty.dtype)))
    return helper.make_tensor_value_info(name, dtype, _dims(expr))


class _Emitter(GraphBuilder):
    """Emits the ONNX nodes of one Relax function, binding by binding."""

    const_prefix = "const"

    def __init__(self, model_name: str):
        super().__init__(model_name)
        self.model_name = model_name
        self.names: dict = {}

    def ref(self, expr) -> str:
        if isinstance(expr, tvm.ir.GenericConst):
            return self.const(expr.value.numpy())
        if expr in self.names:
            return self.names[expr]
        raise GraphError(f"{self.model_name}: cannot export a {type(expr).__name__} operand")

    def binding(self, var, value) -> None:
        if isinstance(value, relax.Var):
            self.names[var] = self.names[value]
            return
        if isinstance(value, relax.TupleGetItem):
            if value.index != 0:
                raise GraphError(f"{self.model_name}: only batch_norm's first output exports")
            self.names[var] = self.names[value.tuple_value]
            return
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
            raise GraphError(
                f"{self.model_name}: cannot export {type(value).__name__} at '{var.name}'"
            )
        self.names[var] = self.call(var, value)

    def call(self, var, call: relax.Call) -> str:
        op, a = call.op.name, call.attrs
        args = call.args
        if op in _ELEMENTWISE:
            return self.node(_ELEMENTWISE[op], [self.ref(x) for x in args])
        if op == "relax.nn.conv2d":
            if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
                raise GraphError(f"{self.model_name}: conv2d layout {a.data_layout} not exported")
            w = args[1].value.numpy() if isinstance(args[1], tvm.ir.GenericConst) else None
            kernel = list(w.shape[2:]) if w is not None else _dims(args[1])[2:]
            return self.node(
                "Conv",
                [self.ref(args[0]), self.ref(args[1])],
                kernel_shape=kernel,
                strides=[int(s) for s in a.strides],
                pads=[int(p) for p in a.padding],
                dilations=[int(d) for d in a.dilation],
                group=int(a.groups),
            )
        if op == "relax.nn.batch_norm":
            return self.node(
                "BatchNormalization", [self.ref(x) for x in args[:5]], epsilon=float(a.epsilon)
            )
        if op == "relax.reshape":
            in_dims, out_dims = _dims(args[0]), _dims(var)
            target = [
                0
                if isinstance(d, str) and i < len(in_dims) and in_dims[i] == d
                else (-1 if isinstance(d, str) else d)
                for i, d in enumerate(out_dims)
            ]
            return self.node(
                "Reshape", [self.ref(args[0]), self.const(np.array(target, np.int64), "shape")]
            )
        if op == "relax.permute_dims":
            rank = len(_dims(args[0]))
            perm = list(reversed(range(rank))) if a.axes is None else [int(x) for x in a.axes]
            return self.node("Transpose", [self.ref(args[0])], perm=perm)
        if op == "relax.stack":
            axis = np.array([int(a.axis)], np.int64)
            fields = [
                self.node("Unsqueeze", [self.ref(f), self.const(axis, "axes")])
                for f in args[0].fields
            ]
            return self.node("Concat", fields, axis=int(a.axis))
        if op in ("relax.max", "relax.min"):
            rank = len(_dims(args[0]))
            axes = list(range(rank)) if a.axis is None else [int(x) for x in a.axis]
            onnx_op = "ReduceMax" if op == "relax.max" else "ReduceMin"
            return self.node(onnx_op, [self.ref(args[0])], axes=axes, keepdims=int(a.keepdims))
        if op in ("relax.mean", "relax.sum"):
            rank = len(_dims(args[0]))
            axes = list(range(rank)) if a.axis is None else [int(x) for x in a.axis]
            onnx_op = "ReduceMean" if op == "relax.mean" else "ReduceSum"
            if onnx_op == "ReduceSum":
                return self.node(
                    onnx_op,
                    [self.ref(args[0]), self.const(np.array(axes, np.int64))],
                    keepdims=int(a.keepdims),
                )
            return self.node(onnx_op, [self.ref(args[0])], axes=axes, keepdims=int(a.keepdims))
        if op in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            onnx_op = "MaxPool" if op == "relax.nn.max_pool2d" else "AveragePool"
            attrs = dict(
                kernel_shape=[int(k) for k in a.pool_size],
                strides=[int(s) for s in a.strides],
                pads=[int(p) for p in a.padding],
                ceil_mode=int(a.ceil_mode),
            )
            if onnx_op == "MaxPool":
                attrs["dilations"] = [int(d) for d in a.dilation]
            else:
                attrs["count_include_pad"] = int(a.count_include_pad)
            return self.node(onnx_op, [self.ref(args[0])], **attrs)
        if op == "relax.nn.adaptive_avg_pool2d" and _dims(var)[2:] == [1, 1]:
            return self.node("GlobalAveragePool", [self.ref(args[0])])
        if op == "relax.concat":
            fields = [self.ref(f) for f in args[0].fields]
            return self.node("Concat", fields, axis=int(a.axis))
        if op in ("relax.nn.softmax", "relax.nn.log_softmax"):
            onnx_op = "Softmax" if op == "relax.nn.softmax" else "LogSoftmax"
            return self.node(onnx_op, [self.ref(args[0])], axis=int(a.axis))
        if op == "relax.nn.layer_norm":
            axes = sorted(int(x) % len(_dims(args[0])) for x in a.axes)
            return self.node(
                "LayerNormalization",
                [self.ref(x) for x in args[:3]],
                axis=axes[0],
                epsilon=float(a.epsilon),
            )
        if op == "relax.nn.gelu":
            x = self.ref(args[0])
            erf = self.node("Erf", [self.node("Div", [x, self.const(np.float32(np.sqrt(2.0)))])])
            half = self.node("Mul", [x, self.const(np.float32(0.5))])
            return self.node("Mul", [half, self.node("Add", [erf, self.const(np.float32(1.0))])])
        if op == "relax.nn.silu":
            x = self.ref(args[0])
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if op == "relax.astype":
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(str(a.dtype)))
            return self.node("Cast", [self.ref(args[0])], to=dtype)
        if op == "relax.broadcast_to":
            shape = np.array([d if isinstance(d, int) else 1 for d in _dims(var)], np.int64)
            return self.node("Expand", [self.ref(args[0]), self.const(shape, "shape")])
        if op == "relax.take":
            axis = 0 if a.axis is None else int(a.axis)
            return self.node("Gather", [self.ref(args[0]), self.ref(args[1])], axis=axis)
        if op in ("relax.expand_dims", "relax.squeeze") and (op == "relax.expand_dims" or a.axis):
            onnx_op = "Unsqueeze" if op == "relax.expand_dims" else "Squeeze"
            axes = np.array([int(x) for x in a.axis], np.int64)
            return self.node(onnx_op, [self.ref(args[0]), self.const(axes, "axes")])
        raise GraphError(f"{self.model_name}: cannot export {op} (at '{var.name}') to ONNX")


def export_onnx(
    mod: tvm.IRModule,
    *,
    model_name: str = "model",
    output_names: list[str] | None = None,
    func_name: str = "main",
) -> onnx.ModelProto:
    """ONNX model computing ``mod[func_name]``; inputs keep their Relax parameter names."""
    func = mod[func_name]
    em = _Emitter(model_name)
    inputs = []
    for p in func.params:
        em.names[p] = p.name
        inputs.append(_value_info(p.name, p))
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise GraphError(f"{model_name}: cannot export match_cast at '{b.var.name}'")
            em.binding(b.var, b.value)
    ret = func.body.body
    results = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
    output_names = output_names or [f"output_{i}" for i in range(len(results))]
    if len(output_names) != len(results):
        raise GraphError(
            f"{model_name}: {len(output_names)} output names for {len(results)} outputs"
        )
    outputs = []
    for name, expr in zip(output_names, results):
        em.named("Identity", [em.ref(expr)], name)
        outputs.append(_value_info(name, expr))
    return em.model(inputs, outputs, opset=OPSET, producer_name="tvm-qmfrg")


__all__ = ["export_onnx"]
