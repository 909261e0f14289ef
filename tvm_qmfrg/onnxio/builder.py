"""One way to emit an ONNX graph: nodes and initializers under unique names, then the model.

Every graph the project writes node by node goes through :class:`GraphBuilder`: the seeded
test and benchmark models (:mod:`.synthetic`), all-MiniLM-L6-v2 (:mod:`.minilm`) and the
ONNX re-emitted from a Relax module (:mod:`tvm_qmfrg.passes.onnx_export`). Names come in
two kinds: *fresh* ones, ``prefix_N`` with one counter for the whole graph (``conv_3``), and
*given* ones, kept as they are the first time and suffixed ``_1``, ``_2`` after
(``l0.q``, the node names a plan refers to).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # opset 17's IR version; keeps older onnxruntime builds happy

Shapes = Mapping[str, Sequence[int | str]] | Sequence[onnx.ValueInfoProto]


class GraphBuilder:
    """Accumulates the nodes and initializers of one ONNX graph.

    ``const`` adds an initializer, ``constant`` a ``Constant`` node (how exporters emit
    shapes and axes), ``node`` an operator with a fresh output name and ``named`` one with a
    given name; the node's name is its (single) output's. :meth:`model` checks and returns
    the finished model.
    """

    const_prefix = "w"  # the prefix of an initializer's fresh name

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._given: dict[str, int] = {}

    def fresh(self, prefix: str) -> str:
        """``prefix_N`` with the graph's next number."""
        self._count += 1
        return f"{prefix}_{self._count}"

    def unique(self, name: str) -> str:
        """``name`` the first time, then ``name_1``, ``name_2``, ..."""
        k = self._given.get(name, 0)
        self._given[name] = k + 1
        return name if k == 0 else f"{name}_{k}"

    def const(self, array, prefix: str | None = None, *, name: str | None = None) -> str:
        """An initializer holding ``array`` (named ``name`` exactly, or fresh)."""
        out = name if name is not None else self.fresh(prefix or self.const_prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), out))
        return out

    def constant(self, array, prefix: str = "c", *, name: str | None = None) -> str:
        """A ``Constant`` node holding ``array`` (named ``name`` exactly, or fresh)."""
        out = name if name is not None else self.fresh(prefix)
        value = numpy_helper.from_array(np.asarray(array))
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=value))
        return out

    def node(self, op: str, inputs: Sequence[str], prefix: str | None = None, **attrs) -> str:
        """An ``op`` node writing a fresh ``prefix_N`` (``prefix`` defaults to ``op``)."""
        return self._add(op, inputs, self.fresh(prefix or op.lower()), attrs)

    def named(self, op: str, inputs: Sequence[str], name: str, **attrs) -> str:
        """An ``op`` node named (and writing) ``name``, made unique."""
        return self._add(op, inputs, self.unique(name), attrs)

    def _add(self, op: str, inputs: Sequence[str], out: str, attrs: dict) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def rename_output(self, tensor: str, name: str) -> None:
        """Make the node producing ``tensor`` write to ``name`` instead (for graph outputs)."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = name

    def model(
        self,
        inputs: Shapes,
        outputs: Shapes,
        *,
        opset: int = OPSET,
        full_check: bool = False,
        **model_fields,
    ) -> onnx.ModelProto:
        """The model: ``inputs``/``outputs`` as value infos, or ``{name: shape}`` (float32).

        Raises ``onnx.checker.ValidationError`` when the graph is not valid ONNX (a bug of
        the caller); ``model_fields`` go to ``helper.make_model`` (``producer_name``, ...).
        """
        graph = helper.make_graph(
            self.nodes, self.name, _infos(inputs), _infos(outputs), initializer=self.inits
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], **model_fields
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=full_check)
        return model


def _infos(shapes: Shapes) -> list[onnx.ValueInfoProto]:
    if isinstance(shapes, Mapping):
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    return list(shapes)
