"""ONNX -> Relax with every binding named after the ONNX node it came from.

TVM's ONNX frontend names its bindings ``lv``, ``lv1``, ...; nothing ties a Relax value back
to the node that made it. This importer drives the same frontend (its
``ONNXGraphImporter``, TVM 0.27) and emits what each node converts to as named bindings:

- the node's (first) output is bound to a variable named exactly like the node
  (``/backbone/conv1/Conv``); further outputs of a multi-output node to ``NODE:k``;
- sub-expressions the converter nested inside (a Conv's ``conv2d`` under its bias ``add``, a
  Gemm's ``matmul``) to ``NODE#1``, ``NODE#2``, ... in evaluation order.

Relax passes keep name hints, so after normalization and pruning a binding still says which
node it belongs to: producer names in plans are ONNX node names, errors name the node, and the
ONNX exporter (:mod:`.onnx_patch`) finds the node of every edited constant and shape.

A failure inside a converter becomes one :class:`~tvm_qmfrg.errors.GraphError` naming the
model, the node and its op type. Node names must be unique and non-empty:
:func:`tvm_qmfrg.onnxio.prepare.prepare` makes them so.
"""

from __future__ import annotations

import contextlib
import io
import re

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from tvm_qmfrg.errors import GraphError, one_line

SUB = "#"  # separates a node name from the index of a nested sub-expression
OUT = ":"  # separates a node name from an output index > 0
_GENERIC = re.compile(r"^(lv|gv)\d*$")


def node_of(var_name: str) -> str:
    """The ONNX node name a binding named by this importer belongs to (``''`` if none)."""
    if _GENERIC.match(var_name):
        return ""
    base = var_name.split(SUB, 1)[0]
    head, sep, tail = base.rpartition(OUT)
    return head if sep and tail.isdigit() else base


def bind_named(
    bb: relax.BlockBuilder, expr: relax.Expr, name: str, *, output: bool = False
) -> relax.Var:
    """Emit ``expr`` bound to a variable named exactly ``name`` (``emit`` would sanitize it).

    ``output`` binds a dataflow block's output (a plain ``Var``).
    """
    expr = bb.normalize(expr)
    dataflow = bb.current_block_is_dataflow() and not output
    cls = relax.DataflowVar if dataflow else relax.Var
    var = cls(name, expr.ty)
    bb.emit_normalized(relax.VarBinding(var, expr))
    return var


class _NamingImporter(onnx_frontend.ONNXGraphImporter):
    """The frontend's importer, emitting each node's result as named bindings."""

    def __init__(self, model_name: str, nodes: dict[str, onnx.NodeProto], **kwargs):
        super().__init__(**kwargs)
        self.model_name = model_name
        self.onnx_nodes = nodes
        self.renames: dict = {}  # vars the converters emitted themselves -> names

    def _emit_named(self, expr, name: str, counter: list[int]):
        """Emit nested calls first (``name#k``), then ``expr`` itself as ``name``."""
        if isinstance(expr, relax.Var):
            self._rename_chain(expr, name, counter)
            return expr
        if isinstance(expr, relax.Call):
            args = [self._emit_inner(a, name, counter) for a in expr.args]
            expr = relax.Call(expr.op, args, expr.attrs, expr.ty_args)
        elif isinstance(expr, relax.TupleGetItem):
            expr = relax.TupleGetItem(self._emit_inner(expr.tuple_value, name, counter), expr.index)
        else:
            return expr
        return bind_named(self.bb, expr, name)

    def _emit_inner(self, expr, name: str, counter: list[int]):
        if isinstance(expr, (relax.Call, relax.TupleGetItem)):
            counter[0] += 1
            return self._emit_named(expr, f"{name}{SUB}{counter[0]}", counter)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._emit_inner(f, name, counter) for f in expr.fields])
        if isinstance(expr, relax.Var) and _GENERIC.match(expr.name):
            counter[0] += 1
            self._rename_chain(expr, f"{name}{SUB}{counter[0]}", counter)
        return expr

    def _rename_chain(self, var: relax.Var, name: str, counter: list[int]) -> None:
        """Name a var the converter emitted itself, and the generic vars it was built from."""
        if not _GENERIC.match(var.name) or var in self.renames:
            return
        self.renames[var] = name
        value = self.bb.lookup_binding(var)
        if value is None:
            return
        for inner in _vars_in(value):
            if inner is not var and _GENERIC.match(inner.name) and inner not in self.renames:
                counter[0] += 1
                self._rename_chain(inner, f"{name}{SUB}{counter[0]}", counter)

    def _convert_operator(self, op_name, inputs, attrs, opset):
        node_name = attrs["tvm_custom"]["name"]
        node = self.onnx_nodes.get(node_name)
        try:
            out = self._constant_pad(op_name, inputs, attrs, opset)
            if out is None:
                out = super()._convert_operator(op_name, inputs, attrs, opset)
            if node is None or op_name in ("If", "Loop", "Scan"):
                return out
            counter = [0]
            if isinstance(out, relax.Tuple):
                return relax.Tuple(
                    [
                        self._emit_named(f, _output_name(node_name, i), counter)
                        for i, f in enumerate(out.fields)
                    ]
                )
            if isinstance(out, relax.Expr) and isinstance(out.ty, relax.TupleType):
                var = self._emit_named(out, f"{node_name}{SUB}0", counter)
                return relax.Tuple(
                    [
                        bind_named(self.bb, relax.TupleGetItem(var, i), _output_name(node_name, i))
                        for i in range(len(out.ty.fields))
                    ]
                )
            return self._emit_named(out, node_name, counter)
        except GraphError:
            raise
        except Exception as exc:  # the frontend raises many types; name the node and stop
            raise GraphError(
                f"{self.model_name}: node '{node_name}' ({op_name}): TVM's ONNX frontend "
                f"failed: {one_line(exc)}"
            ) from exc

    def _constant_pad(self, op_name, inputs, attrs, opset):
        """``Pad`` (constant mode) as ``relax.nn.pad``, not the frontend's fixed-shape
        ``call_tir``: a kernel keeps its output shape, so channels could not shrink through it."""
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if op_name != "Pad" or mode != "constant" or opset < 11:
            return None
        pad = onnx_frontend.Pad
        before, after, value = pad._parse_pads_and_axes(inputs, [self._nodes, self._params])
        width = [int(v) for pair in zip(before, after) for v in pair]
        return relax.op.nn.pad(inputs[0], width, "constant", float(value))


def _output_name(node_name: str, index: int) -> str:
    return node_name if index == 0 else f"{node_name}{OUT}{index}"


def _vars_in(expr) -> list:
    found: list = []
    relax.analysis.post_order_visit(
        expr, lambda e: found.append(e) if isinstance(e, relax.Var) else None
    )
    return found


@relax.expr_functor.mutator
class _Renamer(relax.PyExprMutator):
    """Re-bind the given vars under new names (exactly, not sanitized)."""

    def __init__(self, mod: tvm.IRModule, renames: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.renames = renames

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        name = self.renames.get(binding.var)
        value = binding.value
        if name is None and isinstance(value, relax.Var) and not _GENERIC.match(value.name):
            name = value.name  # the function's output: named like the node it returns
        if name is None:
            super().visit_var_binding_(binding)
            return
        value = self.visit_expr(binding.value)
        value = self.builder_.normalize(value)
        cls = type(binding.var)
        var = cls(name, value.ty)
        self.builder_.emit_normalized(relax.VarBinding(var, value))
        self.set_var_remap(binding.var, var)

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def import_onnx(
    model: onnx.ModelProto, shape_dict: dict[str, list[int]] | None = None
) -> tvm.IRModule:
    """ONNX ``ModelProto`` -> Relax module, weights as constants, bindings named by node.

    ``shape_dict`` overrides input shapes. Node names should be unique (see module doc);
    a node with an empty or repeated name keeps the frontend's generic binding names.
    """
    name = model.graph.name or "model"
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    nodes = {n.name: n for n in model.graph.node if n.name and counts[n.name] == 1}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _NamingImporter(
        name, nodes, shape_dict=shape_dict, dtype_dict="float32", keep_params_in_input=False
    )
    noise = io.StringIO()  # the frontend prints "Error converting operator ..." before raising
    try:
        with contextlib.redirect_stdout(noise):
            mod = importer.from_onnx(model.graph, opset)
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"{name}: TVM's ONNX frontend failed: {one_line(exc)}") from exc
    try:
        return _Renamer(mod, importer.renames).transform()
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"{name}: TVM's ONNX frontend failed: {one_line(exc)}") from exc
