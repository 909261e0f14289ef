"""Write a pruned model as the user's own ONNX graph, patched where pruning changed it.

Re-emitting ONNX from Relax can never cover every op an exporter writes; patching can. The
source is the *prepared* model (:func:`tvm_qmfrg.onnxio.prepare.prepare`: the user's graph
with constant subgraphs folded) that was imported by :mod:`.importer`, so every Relax binding
is named after its ONNX node. The dense and the pruned normalized modules are compared
binding by binding (same names); what differs is written back to the node it names:

- a constant argument that changed (sliced, merged into, refit) replaces the initializer it
  was made from. Among the node's constant inputs, the initializer whose values the original
  constant equals, as the same numbers in another shape (a conv bias ``(C,)`` seen as
  ``(1, C, 1, 1)``) or transposed (a Gemm's ``transB`` weight), is the one replaced, in the
  same view;
- a bias compensation the rewrite added after a conv/matmul (``add(NODE_pruned, b)``) is
  added to the node's bias input, a new bias input, or (MatMul) an ``Add`` node after it;
- shape-carrying inputs and attributes follow the pruned output shapes: ``Reshape`` targets,
  ``Split`` sizes, ``Slice`` ends, ``Resize`` / ``Expand`` sizes, ``Conv`` / ``ConvTranspose``
  ``group``.

Node names, op types, opset and metadata stay; stale ``value_info`` is dropped. Anything that
cannot be traced to one node and one tensor is a :class:`~tvm_qmfrg.errors.GraphError` naming
the binding, never a silently different graph. Callers check the result numerically against
the pruned module (:func:`tvm_qmfrg.passes.onnx_patch.check_against`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from tvm_qmfrg.errors import GraphError
from tvm_qmfrg.onnxio.runtime import output_error, run_onnx

from .importer import node_of
from .rewrite import PRUNED_SUFFIX


@dataclass
class _NodeChange:
    """What changes in one ONNX node."""

    consts: list[tuple[np.ndarray, np.ndarray, int]] = field(default_factory=list)
    bias: np.ndarray | None = None  # compensation added to the node's output channels
    groups: int | None = None


def _bindings(func: relax.Function) -> dict[str, relax.Expr]:
    return {
        b.var.name: b.value
        for block in func.body.blocks
        for b in block.bindings
        if isinstance(b, relax.VarBinding)
    }


def _out_shapes(func: relax.Function) -> dict[str, list[int]]:
    shapes = {}
    for block in func.body.blocks:
        for b in block.bindings:
            ty = b.var.ty
            if isinstance(ty, relax.TensorType) and ty.shape is not None:
                dims = ty.shape.values
                if all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                    shapes[b.var.name] = [int(d) for d in dims]
    return shapes


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _collect_changes(dense: relax.Function, pruned: relax.Function, model: str) -> dict:
    """Per ONNX node name, the :class:`_NodeChange` between the two functions."""
    before, after = _bindings(dense), _bindings(pruned)
    changes: dict[str, _NodeChange] = defaultdict(_NodeChange)
    for name, new in after.items():
        old = before.get(name)
        if name.endswith(PRUNED_SUFFIX) or not isinstance(new, relax.Call):
            continue
        if old is None:
            continue
        if not isinstance(old, relax.Call) or new.same_as(old):  # untouched by the rewrite
            continue
        base_new = new
        if (
            isinstance(old.op, tvm.ir.Op)
            and isinstance(new.op, tvm.ir.Op)
            and old.op.name != new.op.name
            and new.op.name == "relax.add"
            and isinstance(new.args[0], relax.Var)
            and new.args[0].name == name + PRUNED_SUFFIX
        ):
            comp = _const(new.args[1])
            node = node_of(name)
            if not node:
                raise GraphError(f"{model}: compensated binding '{name}' names no ONNX node")
            changes[node].bias = comp.reshape(-1).astype(np.float64)
            base_new = after[name + PRUNED_SUFFIX]
        if not isinstance(base_new, relax.Call):
            continue
        node = node_of(name)
        for i, (a, b) in enumerate(zip(old.args, base_new.args)):
            if a.same_as(b):
                continue
            ca, cb = _const(a), _const(b)
            if ca is None or cb is None:
                continue
            if ca.shape == cb.shape and np.array_equal(ca, cb):
                continue
            if not node:
                raise GraphError(
                    f"{model}: pruned constant of binding '{name}' cannot be traced to an "
                    "ONNX node (was the module imported by tvm_qmfrg.passes.importer?)"
                )
            changes[node].consts.append((ca, cb, i))
        if (
            isinstance(base_new.op, tvm.ir.Op)
            and base_new.op.name in ("relax.nn.conv2d", "relax.nn.conv2d_transpose")
            and int(base_new.attrs.groups) != int(old.attrs.groups)
        ):
            changes[node].groups = int(base_new.attrs.groups)
    return changes


def _view(old: np.ndarray, tensor: np.ndarray) -> str | None:
    """How a Relax constant shows an ONNX tensor: ``"same"`` numbers or ``"T"``; else None."""
    if old.size == tensor.size and np.array_equal(old.reshape(-1), tensor.reshape(-1)):
        return "same"
    if old.ndim == 2 and tensor.ndim == 2 and old.shape == tensor.shape[::-1]:
        if np.array_equal(old, tensor.T):
            return "T"
    return None


def _unview(view: str, new: np.ndarray, tensor: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The new ONNX tensor for the new Relax constant ``new``, in ``tensor``'s layout."""
    if view == "T":
        return np.ascontiguousarray(new.T)
    if tensor.ndim == new.ndim:
        return new
    # same numbers in another shape: the non-unit axes of ``old`` and ``tensor`` correspond
    old_axes = [i for i, d in enumerate(old.shape) if d != 1]
    ten_axes = [i for i, d in enumerate(tensor.shape) if d != 1]
    if len(old_axes) != len(ten_axes):
        raise ValueError("axes do not correspond")
    shape = list(tensor.shape)
    for oa, ta in zip(old_axes, ten_axes):
        shape[ta] = new.shape[oa]
    return new.reshape(shape)


class _Graph:
    """Index of a ModelProto: tensors by name, consumers, producers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = {n.name: n for n in g.node}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for inp in n.input:
                self.consumers[inp].append(n)
        self.new_values: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name in self.new_values:
            return self.new_values[name]
        return numpy_helper.to_array(self.inits[name])

    def replace_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Give ``node``'s input ``index`` the value ``value``.

        An initializer other nodes also read (a tied weight, a shared shape constant) is not
        changed for them: ``node`` gets its own copy.
        """
        name = node.input[index]
        users = [n for n in self.consumers.get(name, []) if n is not node]
        if users:
            dtype = helper.tensor_dtype_to_np_dtype(self.inits[name].data_type)
            new = self.add_init(f"{name}/{node.name}", np.asarray(value).astype(dtype))
            node.input[index] = new
            self.consumers[name] = users
            self.consumers[new].append(node)
            return
        self.new_values[name] = value

    def add_init(self, name: str, value: np.ndarray) -> str:
        unique, k = name, 1
        while unique in self.inits or unique in self.new_values:
            k += 1
            unique = f"{name}_{k}"
        tensor = numpy_helper.from_array(value, unique)
        self.model.graph.initializer.append(tensor)
        self.inits[unique] = tensor
        return unique

    def commit(self) -> None:
        for name, value in self.new_values.items():
            t = self.inits[name]
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))


def _patch_consts(g: _Graph, node: onnx.NodeProto, change: _NodeChange, model: str) -> None:
    candidates = [(k, name) for k, name in enumerate(node.input) if name in g.inits]
    taken: set[str] = set()
    for old, new, arg in change.consts:
        found = None
        ordered = sorted(candidates, key=lambda c: (c[0] != arg, c[0]))
        for _, name in ordered:
            if name in taken:
                continue
            tensor = numpy_helper.to_array(g.inits[name])
            view = _view(old, tensor)
            if view is not None:
                found = (name, tensor, view)
                break
        if found is None:
            raise GraphError(
                f"{model}: node '{node.name}' ({node.op_type}): a pruned constant "
                f"{tuple(old.shape)} matches none of its initializer inputs"
            )
        name, tensor, view = found
        index = list(node.input).index(name)
        try:
            value = _unview(view, new, tensor, old)
        except ValueError as exc:
            raise GraphError(
                f"{model}: node '{node.name}' ({node.op_type}): cannot lay the pruned constant "
                f"{tuple(new.shape)} out like initializer '{name}' {tuple(tensor.shape)}"
            ) from exc
        taken.add(name)
        g.replace_input(node, index, value)


def _attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for a in list(node.attribute):
        if a.name == key:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(key, value))


def _patch_bias(g: _Graph, node: onnx.NodeProto, bias: np.ndarray, model: str) -> None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm"):
        beta = float(_attr(node, "beta", 1.0)) if op == "Gemm" else 1.0
        if len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            if name not in g.inits:
                raise GraphError(f"{model}: node '{node.name}' ({op}): bias is not a constant")
            current = g.array(name)
            value = (current.astype(np.float64) + bias.reshape(current.shape) / beta).astype(
                current.dtype
            )
            g.replace_input(node, 2, value)
            return
        name = g.add_init(f"{node.name}/compensation", bias.astype(np.float32) / beta)
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        return
    if op == "MatMul":
        out = node.output[0]
        inner = f"{out}{PRUNED_SUFFIX}"
        node.output[0] = inner
        name = g.add_init(f"{node.name}/compensation", bias.astype(np.float32))
        add = helper.make_node("Add", [inner, name], [out], name=f"{node.name}/compensation")
        nodes = list(g.model.graph.node)
        at = nodes.index(node) + 1
        g.model.graph.node.insert(at, add)
        return
    raise GraphError(f"{model}: node '{node.name}' ({op}): cannot take a bias compensation")


def _int_input(g: _Graph, node: onnx.NodeProto, index: int, model: str) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    if name not in g.inits:
        raise GraphError(
            f"{model}: node '{node.name}' ({node.op_type}): input '{name}' is computed at run "
            "time; its shape cannot follow the pruned channels"
        )
    return g.array(name)


def _follow_shape(g: _Graph, node, shapes_old, shapes_new, model: str) -> None:
    """Shape-carrying inputs and attributes of ``node`` follow its pruned output shapes."""
    op = node.op_type
    old = shapes_old.get(node.name)
    new = shapes_new.get(node.name)
    if old is None or new is None or old == new:
        return
    if op == "Reshape":
        target = _int_input(g, node, 1, model)
        if target is None or target.size != len(new):
            raise GraphError(f"{model}: node '{node.name}' (Reshape): target rank changed")
        fixed = target.copy()
        for i, (t, n) in enumerate(zip(target.tolist(), new)):
            if t > 0 and t != n:
                fixed[i] = n
        if not np.array_equal(fixed, target):
            g.replace_input(node, 1, fixed)
        return
    if op in ("Resize", "Expand", "ConstantOfShape", "Tile"):
        index = {"Resize": 3, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}[op]
        target = _int_input(g, node, index, model)
        if target is None:
            return  # Resize by scales: spatial only, channels follow the input
        if op == "Tile":
            raise GraphError(f"{model}: node '{node.name}' (Tile) repeats pruned channels")
        fixed = target.copy()
        for i, (t, o, n) in enumerate(zip(target.tolist(), old, new)):
            if o != n and t == o:
                fixed[i] = n
        if not np.array_equal(fixed, target):
            g.replace_input(node, index, fixed)
        return


def _follow_split(g: _Graph, node, shapes_old, shapes_new, model: str) -> None:
    outs = [node.name] + [f"{node.name}:{i}" for i in range(1, len(node.output))]
    old = [shapes_old.get(o) for o in outs]
    new = [shapes_new.get(o) for o in outs]
    if any(s is None for s in old + new) or old == new:
        return
    axis = int(_attr(node, "axis", 0)) % len(old[0])
    sizes = np.array([s[axis] for s in new], dtype=np.int64)
    if len(node.input) > 1 and node.input[1]:
        g.replace_input(node, 1, sizes)
    elif _attr(node, "split") is not None:
        _set_attr(node, "split", [int(s) for s in sizes])
    elif len(set(sizes.tolist())) != 1:  # equal parts (num_outputs) no longer equal
        name = g.add_init(f"{node.name}/split", sizes)
        if len(node.input) == 1:
            node.input.append(name)
        else:
            node.input[1] = name
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)


def _follow_slice(g: _Graph, node, pruned_value, shapes_old, shapes_new, model: str) -> None:
    old, new = shapes_old.get(node.name), shapes_new.get(node.name)
    if old is None or new is None or old == new:
        return
    if not isinstance(pruned_value, relax.Call) or pruned_value.op.name != "relax.strided_slice":
        raise GraphError(f"{model}: node '{node.name}' (Slice): pruned form is not a slice")
    axes_r = [int(f.value) % len(old) for f in pruned_value.args[1].fields]
    begin_r = [int(f.value) for f in pruned_value.args[2].fields]
    end_r = [int(f.value) for f in pruned_value.args[3].fields]
    starts = _int_input(g, node, 1, model)
    ends = _int_input(g, node, 2, model)
    axes = _int_input(g, node, 3, model)
    rank = len(old)
    axes = np.arange(starts.size) if axes is None else axes
    new_starts, new_ends = starts.copy(), ends.copy()
    for k, ax in enumerate(axes.tolist()):
        ax %= rank
        if old[ax] == new[ax] or ax not in axes_r:
            continue
        j = axes_r.index(ax)
        new_starts[k], new_ends[k] = begin_r[j], end_r[j]
    if not np.array_equal(new_starts, starts):
        g.replace_input(node, 1, new_starts)
    if not np.array_equal(new_ends, ends):
        g.replace_input(node, 2, new_ends)


def patch_onnx(
    prepared: onnx.ModelProto,
    dense: tvm.IRModule,
    pruned: tvm.IRModule,
    *,
    model: str = "model",
) -> onnx.ModelProto:
    """The prepared ONNX model with ``pruned``'s changes to ``dense`` written in (module doc).

    ``dense`` and ``pruned`` are the normalized module the pass read and the module it
    returned; ``prepared`` is the ONNX model ``dense`` was imported from by the naming
    importer.
    """
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    g = _Graph(out)
    dense_f, pruned_f = dense["main"], pruned["main"]
    changes = _collect_changes(dense_f, pruned_f, model)
    for name, change in changes.items():
        node = g.nodes.get(name)
        if node is None:
            raise GraphError(f"{model}: pruned binding names node '{name}', not in the graph")
        _patch_consts(g, node, change, model)
        if change.groups is not None:
            _set_attr(node, "group", change.groups)
    for name, change in changes.items():
        if change.bias is not None:
            _patch_bias(g, g.nodes[name], change.bias, model)
    shapes_old, shapes_new = _out_shapes(dense_f), _out_shapes(pruned_f)
    pruned_values = _bindings(pruned_f)
    for node in list(out.graph.node):
        if node.op_type == "Split":
            _follow_split(g, node, shapes_old, shapes_new, model)
        elif node.op_type == "Slice":
            _follow_slice(g, node, pruned_values.get(node.name), shapes_old, shapes_new, model)
        else:
            _follow_shape(g, node, shapes_old, shapes_new, model)
    g.commit()
    del out.graph.value_info[:]
    return out


def check_against(
    onnx_model: onnx.ModelProto,
    run_tvm,
    inputs: dict[str, np.ndarray],
    *,
    model: str = "model",
    rtol: float = 1e-4,
) -> float:
    """Run ``onnx_model`` in onnxruntime and compare with ``run_tvm(inputs)``: max rel. error.

    Raises :class:`GraphError` naming the model when onnxruntime rejects the model or the
    outputs differ by more than ``rtol`` of their scale, ``max(max |out|, 1)`` (the floor keeps
    near-zero outputs, like a probability map on random input, from magnifying round-off).
    """
    got = run_onnx(onnx_model, inputs, name=f"{model}: the exported ONNX model")
    want = run_tvm(inputs)
    for a, b in zip(got, want):
        if np.shape(a) != np.shape(b):
            raise GraphError(
                f"{model}: the exported ONNX model's output shape {np.shape(a)} is not TVM's "
                f"{np.shape(b)}"
            )
    worst = output_error(got, want)
    if worst > rtol:
        raise GraphError(
            f"{model}: the exported ONNX model differs from the pruned TVM module "
            f"(max error {worst:.2e} of the output scale)"
        )
    return worst
