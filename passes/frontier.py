"""Tensor values of an ONNX graph that changes a few nodes at a time, recomputed only where
they changed.

Sequential calibrated pruning reads the activations at one group's consumers, decides the
group (its consumers change), then reads the next group's consumers, and so on through the
network. Running the whole prefix of the network for every group costs ``groups / 2`` full
passes; a :class:`Frontier` keeps the values it computed and, for the next request, runs
only the nodes whose value is not kept or was made stale by a changed node upstream: about
one full pass over the whole sequence.

A value is *valid* while no node in its upstream cone has changed since it was computed.
:meth:`Frontier.update` takes the new graph and the names of the nodes that differ from the
previous one (the caller knows them: the consumers whose weights it changed) and drops
every value downstream of them. :meth:`Frontier.values` then cuts the graph to the nodes the
wanted tensors need that no valid value covers, runs that window in onnxruntime, and keeps
the wanted tensors and the window's *frontier* (its values read by nodes outside it), within
a byte budget (the oldest values go first; a dropped value is recomputed when needed).

Graphs with subgraph attributes (``If``, ``Loop``) read outer tensors implicitly and cannot
be cut: :func:`can_cut` says so and the caller runs them whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

log = logging.getLogger(__name__)

FRONTIER_BYTES = 3 << 30  # values a frontier keeps between requests, at most


def can_cut(model: onnx.ModelProto) -> bool:
    """Whether a graph can be cut into windows (no node carries a subgraph)."""
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return not any(a.type in subgraph for n in model.graph.node for a in n.attribute)


class Frontier:
    """Values of the tensors of one graph over fixed feeds (one dict per batch).

    ``session`` makes an onnxruntime session from a ``ModelProto``; ``feeds`` are the graph
    inputs of every batch. The graph must pass :func:`can_cut`.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: Sequence[Mapping[str, np.ndarray]],
        session: Callable[[onnx.ModelProto], object],
        budget: int = FRONTIER_BYTES,
    ):
        self.feeds = feeds
        self.session = session
        self.budget = budget
        self.kept: dict[str, list[np.ndarray]] = {}  # tensor -> value per batch, oldest first
        self.kept_bytes = 0
        self.windows = 0  # sessions run (for the log and the tests)
        self._index(model)

    def _index(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.readers: dict[str, list[int]] = {}  # tensor -> indices of the nodes reading it
        for k, n in enumerate(self.nodes):
            for i in n.input:
                self.readers.setdefault(i, []).append(k)
        self.constants = {t.name for t in g.initializer}
        self.inputs = {i.name for i in g.input} - self.constants

    def update(self, model: onnx.ModelProto, changed: set[str]) -> None:
        """Move to ``model``, whose nodes named in ``changed`` (or absent before) compute
        something else than before: every kept value downstream of them is dropped."""
        old = {n.name for n in self.model.graph.node}
        self._index(model)
        stale = [k for k, n in enumerate(self.nodes) if n.name in changed or n.name not in old]
        seen: set[str] = set()
        while stale:
            node = self.nodes[stale.pop()]
            for o in node.output:
                if o in seen:
                    continue
                seen.add(o)
                self._drop(o)
                stale.extend(self.readers.get(o, []))

    def _drop(self, tensor: str) -> None:
        values = self.kept.pop(tensor, None)
        if values is not None:
            self.kept_bytes -= sum(v.nbytes for v in values)

    def values(self, tensors: Sequence[str]) -> list[list[np.ndarray]]:
        """Per batch, the values of ``tensors`` (graph inputs, node outputs)."""
        missing = [t for t in dict.fromkeys(tensors) if t not in self.kept and t not in self.inputs]
        if missing:
            self._compute(missing)
        out = []
        for b, feed in enumerate(self.feeds):
            out.append([feed[t] if t in self.inputs else self.kept[t][b] for t in tensors])
        return out

    def _compute(self, wanted: list[str]) -> None:
        need, run = set(wanted), set()
        for k in range(len(self.nodes) - 1, -1, -1):  # topological order, walked back
            node = self.nodes[k]
            if any(o in need for o in node.output):
                run.add(k)
                need.update(
                    i for i in node.input if i and i not in self.kept and i not in self.constants
                )
        nodes = [n for k, n in enumerate(self.nodes) if k in run]
        made = {o for n in nodes for o in n.output if o}
        fed = sorted({i for n in nodes for i in n.input if i and i not in made} - self.constants)
        frontier = [
            o
            for k in sorted(run)
            for o in self.nodes[k].output
            if o and any(r not in run for r in self.readers.get(o, []))
        ]
        fetch = list(dict.fromkeys([*wanted, *frontier]))
        sess = self.session(self._window(nodes, fed, fetch))
        self.windows += 1
        names = [i.name for i in sess.get_inputs()]
        results: dict[str, list[np.ndarray]] = {t: [] for t in fetch}
        for b, feed in enumerate(self.feeds):
            given = {t: (feed[t] if t in self.inputs else self.kept[t][b]) for t in names}
            for t, v in zip(fetch, sess.run(fetch, given)):
                results[t].append(v)
        for t in fetch:
            self._keep(t, results[t], pinned=set(wanted))
        log.debug("window of %d nodes, %d values fed, %d kept", len(nodes), len(fed), len(fetch))

    def _window(self, nodes, fed: list[str], fetch: list[str]) -> onnx.ModelProto:
        """The graph cut to ``nodes``, reading ``fed`` as inputs and returning ``fetch``."""
        g = self.model.graph
        used = {i for n in nodes for i in n.input}
        window = onnx.helper.make_graph(
            nodes,
            g.name,
            [self._input_info(t) for t in fed],
            [onnx.ValueInfoProto(name=t) for t in fetch],
            [t for t in g.initializer if t.name in used],
        )
        return onnx.helper.make_model(
            window, opset_imports=self.model.opset_import, ir_version=self.model.ir_version
        )

    def _input_info(self, tensor: str) -> onnx.ValueInfoProto:
        if tensor in self.inputs:
            return next(i for i in self.model.graph.input if i.name == tensor)
        a = self.kept[tensor][0]
        elem = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        return onnx.helper.make_tensor_value_info(tensor, elem, a.shape)

    def _keep(self, tensor: str, values: list[np.ndarray], pinned: set[str]) -> None:
        self._drop(tensor)
        size = sum(v.nbytes for v in values)
        for old in list(self.kept):  # the oldest values make room first
            if self.kept_bytes + size <= self.budget:
                break
            if old not in pinned:
                self._drop(old)
        if tensor not in pinned and self.kept_bytes + size > self.budget:
            return  # recomputed if it is needed
        self.kept[tensor] = values
        self.kept_bytes += size
