"""Bring an exporter's ONNX model into the form TVM's ONNX frontend takes.

Real exports carry shape-computing subgraphs (``Shape -> Gather -> Concat -> Pad``, Paddle's
``Reshape(x, Concat(Cast(Slice(Shape(x)))))``, anchor grids from ``Range``/``Expand``),
weights in ``Constant`` nodes and symbolic input dims. TVM 0.27 rejects the first kind
("Dynamic pads are not supported yet", "Reshape requires the input new shape to be Shape")
and cannot legalize ops on symbolic shapes computed at run time. :func:`prepare`:

1. binds every input dim to a static size: the sizes given in ``input_shapes``, else a
   symbolic *leading* (batch) dim becomes 1 with a notice; any other symbolic dim is an
   error asking for ``--input-shape``;
2. folds constant subgraphs and removes dead nodes with onnxruntime's basic-level optimizer
   (its own kernels evaluate the folded nodes, so folding is exact), with the rewrites that go
   beyond folding off: ``BatchNormalization`` stays (its running statistics drive data-free
   bias compensation), bias adds stay, equal weights stay un-shared (a pruned copy can
   differ); the folded model is checked against the original in onnxruntime;
3. turns remaining ``Constant`` nodes into initializers and gives every node a unique,
   non-empty name (the Relax bindings and the exported graph are keyed by node name).

Graph name, opset, producer and metadata are kept. Measured on the exporter corpus
(``tests/corpus``) and five pretrained models: onnxslim, onnxsim and onnxruntime all bring
every model into TVM, but onnxslim 0.1.98 folds PyTorch's ``F.pad`` chain (a ``Slice`` with
step -1 reversing the pads) to the wrong pads, a silent change of the function, and onnxsim
leaves Paddle's ``Constant``-node weights in place; onnxruntime is exact by construction,
already a dependency, and its rewrites can be switched off one by one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import GraphError, ModelError, OptionError, WeightError, one_line
from .runtime import output_error, random_inputs, run_onnx

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """An ONNX model ready for TVM's frontend, with what preparing it changed."""

    model: onnx.ModelProto
    name: str
    input_shapes: dict[str, list[int]]
    notices: list[str] = field(default_factory=list)
    nodes_before: int = 0

    @property
    def nodes_after(self) -> int:
        return len(self.model.graph.node)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph (not initializers listed as inputs, as old exports do)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def static_input_shapes(
    model: onnx.ModelProto,
    given: dict[str, list[int]] | None,
    name: str,
    dim_sizes: dict[str, int] | None = None,
) -> tuple[dict[str, list[int]], list[str]]:
    """Static shapes for every graph input, and the notices of dims bound by default.

    ``given`` sizes inputs by name; ``dim_sizes`` sizes symbolic dims by their name
    (``batch=8``) wherever they occur.
    """
    given = dict(given or {})
    dim_sizes = dict(dim_sizes or {})
    params = {d for i in graph_inputs(model) for d in _dims(i) if isinstance(d, str)}
    for key, size in dim_sizes.items():
        if key not in params:
            raise OptionError(
                f"{name}: --bind {key}: the model's inputs have no symbolic dim '{key}' "
                f"(they have: {', '.join(sorted(params)) or 'none'})"
            )
        if int(size) < 1:
            raise OptionError(f"{name}: --bind {key}={size}: sizes must be positive")
    inputs = graph_inputs(model)
    known = {i.name for i in inputs}
    for key, dims in given.items():
        if key not in known:
            raise OptionError(
                f"{name}: --input-shape names '{key}', but the model's inputs are "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        if not dims or any(int(d) < 1 for d in dims):
            raise OptionError(f"{name}: --input-shape {key}: sizes must be positive integers")
    shapes, notices = {}, []
    for value in inputs:
        dims = _dims(value)
        if value.name in given:
            want = [int(d) for d in given[value.name]]
            if dims and len(want) != len(dims):
                raise OptionError(
                    f"{name}: --input-shape {value.name} has {len(want)} dims, "
                    f"the input has {len(dims)}"
                )
            for d, w in zip(dims, want):
                if isinstance(d, int) and d != w:
                    raise OptionError(
                        f"{name}: --input-shape {value.name}={','.join(map(str, want))} "
                        f"contradicts its static shape {dims}"
                    )
            shapes[value.name] = want
            continue
        if not dims:
            raise GraphError(
                f"{name}: input '{value.name}' has no shape; give it with "
                f"--input-shape {value.name}=D1,D2,..."
            )
        fixed = []
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                fixed.append(d)
            elif d in dim_sizes:
                fixed.append(int(dim_sizes[d]))
            elif axis == 0:
                fixed.append(1)
                notices.append(
                    f"{name}: input '{value.name}' dim 0 ('{d or '?'}') bound to 1 "
                    f"(set it with --input-shape {value.name}=...)"
                )
            else:
                raise GraphError(
                    f"{name}: input '{value.name}' has symbolic dim {axis} ('{d or '?'}'); "
                    f"give static sizes with --input-shape {value.name}=D1,D2,..."
                )
        shapes[value.name] = fixed
    return shapes, notices


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move ``Constant`` nodes holding a tensor into initializers, in place; the count moved."""
    kept, moved = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                model.graph.initializer.append(tensor)
                moved += 1
                continue
            if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                value = onnx.helper.get_attribute_value(attr)
                dtype = np.float32 if "float" in attr.name else np.int64
                array = np.array(value, dtype=dtype)
                model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
                moved += 1
                continue
        kept.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return moved


_LINEAR = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def check_weights(model: onnx.ModelProto, name: str) -> None:
    """Every float initializer finite; every Conv/ConvTranspose/Gemm/MatMul weight non-zero.

    A :class:`WeightError` names the tensor and the node that reads it. An all-zero weight
    is refused rather than pruned as dead: such a layer computes a constant, and the
    exporter should have folded it; a pruned graph built on it would hide the problem.
    """
    readers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for inp in node.input:
            readers.setdefault(inp, node)
    weights = {
        node.input[i]: node
        for node in model.graph.node
        for op, i in _LINEAR.items()
        if node.op_type == op and len(node.input) > i
    }
    for tensor in model.graph.initializer:
        if tensor.data_type not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
        ):
            continue
        array = numpy_helper.to_array(tensor)
        node = readers.get(tensor.name)
        where = f"node '{node.name}' ({node.op_type})" if node is not None else "no node"
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise WeightError(
                f"{name}: tensor '{tensor.name}' read by {where} holds {bad} NaN/Inf value(s)"
            )
        if tensor.name in weights and array.size and not np.any(array):
            node = weights[tensor.name]
            raise WeightError(
                f"{name}: weight '{tensor.name}' of node '{node.name}' ({node.op_type}) is all "
                "zero: the layer computes a constant, nothing to prune"
            )


def unique_node_names(model: onnx.ModelProto) -> int:
    """Give unnamed and repeated nodes unique names (``OpType_index``), in place."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        candidate, k = base, 1
        while candidate in seen:
            k += 1
            candidate = f"{base}_{k}"
        if candidate != node.name:
            node.name = candidate
            renamed += 1
        seen.add(candidate)
    return renamed


# onnxruntime's rewrites that would change the user's graph beyond folding: BatchNorm, bias,
# pad and activation fusions, LayerNorm/GELU pattern fusions (node names and op types would
# change; the BN statistics drive data-free compensation), and sharing of equal initializers
# (a pruned copy must be able to differ). Unknown names are ignored by onnxruntime.
_KEEP = [
    "ConvBNFusion",
    "ConvAddFusion",
    "ConvMulFusion",
    "ConvActivationFusion",
    "MatMulAddFusion",
    "MatMulScaleFusion",
    "MatmulTransposeFusion",
    "GemmActivationFusion",
    "GemmTransposeFusion",
    "GemmSumFusion",
    "PadFusion",
    "LayerNormFusion",
    "SimplifiedLayerNormFusion",
    "DivMulFusion",
    "FuseReluClip",
    "NotWhereFusion",
    "GeluFusion",
    "ConstantSharing",
]


def _fold(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Constant folding and dead-node removal by onnxruntime's basic-level optimizer."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        try:
            ort.InferenceSession(
                model.SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=_KEEP,
            )
            return onnx.load(options.optimized_model_filepath)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise GraphError(f"{name}: onnxruntime cannot load the model: {one_line(exc)}") from exc


def _check_folded(
    original: onnx.ModelProto, folded: onnx.ModelProto, shapes: dict, name: str
) -> None:
    """Folding must not change what the model computes (one seeded input, onnxruntime)."""
    feed = random_inputs(original, shapes)
    want = run_onnx(original, feed, name=name)
    if output_error(run_onnx(folded, feed, name=name), want) > 1e-5:
        raise GraphError(f"{name}: folding constant subgraphs changed the model's outputs")


def prepare(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    *,
    name: str | None = None,
    dim_sizes: dict[str, int] | None = None,
    fold: bool = True,
) -> PreparedModel:
    """Static shapes, constants folded, names unique (see module doc); ``model`` is not changed.

    Parameters
    ----------
    model
        The exporter's model.
    input_shapes
        Static sizes by input name; inputs not named keep their static dims, a symbolic
        leading dim becomes 1.
    name
        The model's name in messages (default: the graph's name).
    dim_sizes
        Sizes of symbolic dims by name (``{"batch": 8}``), wherever they occur.
    fold
        Fold constant subgraphs; off, only shapes are bound and names made unique.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    name = name or model.graph.name or "model"
    shapes, notices = static_input_shapes(model, input_shapes, name, dim_sizes)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    before = len(work.graph.node)
    for value in graph_inputs(work):
        dims = value.type.tensor_type.shape.dim
        for d, size in zip(dims, shapes[value.name]):
            d.Clear()
            d.dim_value = size
    del work.graph.value_info[:]  # symbolic intermediate shapes; re-inferred from the inputs
    if fold:
        work = _fold(work, name)
        _check_folded(model, work, shapes, name)
    constants_to_initializers(work)
    unique_node_names(work)
    check_weights(work, name)
    for attr in ("ir_version", "producer_name", "producer_version", "domain", "doc_string"):
        setattr(work, attr, getattr(model, attr))
    work.graph.name = model.graph.name
    del work.metadata_props[:]
    work.metadata_props.extend(model.metadata_props)
    del work.opset_import[:]
    work.opset_import.extend(model.opset_import)
    for note in notices:
        log.warning("%s", note)
    log.info("%s: prepared for TVM, %d -> %d nodes", name, before, len(work.graph.node))
    return PreparedModel(work, name, shapes, notices, before)
