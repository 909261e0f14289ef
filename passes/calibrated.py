"""Calibrated pruning: choose and refit each group on the activations its consumers read.

The bookkeeping of :mod:`tvm_qmfrg.reconstruction` (the mathematics) on a Relax module:

1. every prunable group's *mixing consumers* (the convs / matmuls that read its features,
   through depthwise convs, BatchNorm, activations and pooling: the channel analysis already
   follows those) and the tensor each one reads;
2. an activation engine that runs the model with some groups already decided — on the dense
   graph, with the decided consumers folded and reading zeros from the pruned positions
   (:func:`.rewrite.plan_edits` ``mask=True``: the same function as the pruned model, every
   tensor where it was) — in onnxruntime when the module came from an ONNX model (the
   graph patched by :mod:`.onnx_patch`), else in an untuned TVM build for the host;
3. ``sensitivity`` allocation: each group pruned alone by a few fractions, the network's
   output error measured, the FLOPs budget spread by :func:`reconstruction.allocate`;
4. sequential selection and refit, group by group in the order their consumers run, each on
   the activations of the network already pruned upstream, then one more refit pass over
   every consumer with the whole network pruned (a residual stream is read before and after
   the groups inside its blocks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from tvm_qmfrg import reconstruction as rec
from tvm_qmfrg.errors import GraphError, OptionError
from tvm_qmfrg.metrics import unexplained_variance
from tvm_qmfrg.plan import GroupPlan, Refit

from .channels import ChannelAnalysis, Segment, Site
from .frontier import Frontier, can_cut
from .importer import OUT, SUB, node_of
from .onnx_patch import patch_onnx
from .probe import probe_module
from .rewrite import FoldCache, Rewriter, plan_edits

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 5  # every 5th calibration sample scores the ridge candidates
ROW_BUDGET = 65536  # activation rows per consumer, at most (positions / tokens subsampled)
ROWS_PER_FEATURE = 16  # ... and no more than this many per feature read, above MIN_ROWS
MIN_ROWS = 16384
SENSITIVITY_FRACTIONS = (0.25, 0.5, 0.75, 0.9)  # the points of a group's loss curve
SENSITIVITY_TRIALS = (0.5, 0.9)  # ... measured on the network's output (the rest scaled)
SENSITIVITY_SAMPLES = 32
CORRECTIONS = (0.0, 1.0)  # upstream drift a sequential refit corrects: the candidates
MOMENT_BYTES = 1 << 30  # moments collected in one engine pass, at most
DENSE_CACHE_BYTES = 1 << 30  # dense activations kept between passes, at most


@dataclass
class Read:
    """One consumer site reading a group: its binding, its input, and its weight Gram."""

    consumer: relax.Var
    data: relax.Var
    site: Site
    seg: Segment
    gram: np.ndarray
    order: int  # position of the consumer's binding in ``main``
    residual: relax.Var | None = None  # the stream the consumer's output is added to
    lift: np.ndarray | None = None  # (out, F): a drift of that stream, in this read's features
    out_axis: int = -1  # channel axis of the consumer's output (and of the stream)
    factor: np.ndarray | None = None  # W^T (F x out), gram = factor factor^T, when narrow


@dataclass
class Stage:
    """A group being decided: its plan so far and the consumers that read it."""

    space: int
    plan: GroupPlan
    reads: list[Read]
    keep: int  # units to keep
    first_producer: int  # position of the group's first producer in ``main``
    curve: list[tuple[float, float]] = field(default_factory=list)
    stale: set = field(default_factory=set)  # reads whose input a later stage changes


def consumer_reads(analysis: ChannelAnalysis, values: dict, space_id: int, order: dict):
    """The reads of ``space_id`` a refit can fold into: whole-group segments of constant
    consumer weights over a data tensor."""
    out = []
    for var, sites in analysis.sites.items():
        for site in sites:
            if site.role != "consumer":
                continue
            for seg in site.layout.segments:
                sp = analysis.spaces_by_id[analysis.root[seg.space]]
                if sp.id != space_id or seg.ppf < 1 or seg.first or seg.features != sp.size:
                    continue
                call = values[var]
                data = call.args[1 - site.arg] if len(call.args) == 2 else call.args[0]
                weight = call.args[site.arg]
                if not isinstance(data, relax.Var) or not isinstance(weight, tvm.ir.GenericConst):
                    continue
                w = np.moveaxis(weight.value.numpy().astype(np.float64), site.axis, 0)
                if w.shape[0] != site.layout.size:
                    continue
                w = w[seg.positions(np.arange(sp.size))].reshape(sp.size, -1)
                narrow = w if w.shape[1] <= w.shape[0] else None
                out.append(Read(var, data, site, seg, w @ w.T, order[var], factor=narrow))
    return out


_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def _per_channel(const: np.ndarray, rank: int, axis: int) -> bool:
    """A constant that broadcasts along one channel axis only (or a scalar)."""
    shape = (1,) * (rank - const.ndim) + tuple(const.shape)
    return len(shape) == rank and all(d == 1 for i, d in enumerate(shape) if i != axis)


def _row_wise(call: relax.Call) -> bool:
    """A consumer whose output rows are its input rows (the same positions): a matmul,
    or a 1x1 conv with unit stride, no padding and one group."""
    if call.op.name == "relax.matmul":
        return True
    if call.op.name != "relax.nn.conv2d":
        return False
    a = call.attrs
    w = call.args[1].value.shape
    return (
        tuple(w[2:]) == (1, 1)
        and all(int(v) == 1 for v in a.strides)
        and all(int(v) == 0 for v in a.padding)
        and int(a.groups) == 1
        and a.data_layout == "NCHW"
    )


def attach_residuals(reads: Sequence[Read], analysis: ChannelAnalysis, values: dict) -> None:
    """Mark the reads whose consumer output is added to a residual stream.

    The consumer computes ``z = x W`` (rows: positions), then per-channel affine ops
    ``s z + t`` (bias, BatchNorm), then ``y = s z + t + h`` with another tensor ``h``. In the
    network pruned upstream ``h`` has drifted by ``e = h - h~``; a refit that reproduces
    ``y`` rather than ``s z`` aims at the feature target ``x + (e / s) W^+`` (the part of the
    drift the consumer can express). ``lift = diag(1/s) W^+`` turns a drift row into it.
    """
    users: dict = {}
    for var, value in values.items():
        for v in relax.analysis.free_vars(value):
            users.setdefault(v, []).append(var)
    scale_of = {p.var: p.scale for sp in analysis.spaces for p in sp.producers if p.rows is None}
    for r in reads:
        call = values[r.consumer]
        scale = scale_of.get(r.consumer)
        out_site = next(
            (s for s in analysis.sites.get(r.consumer, []) if s.role == "producer"), None
        )
        if scale is None or out_site is None or int(r.seg.ppf) != 1 or not _row_wise(call):
            continue
        axis, rank = out_site.layout.axis, len(call.ty.shape.values)
        v, other = r.consumer, None
        while other is None:
            nxt = users.get(v, [])
            if len(nxt) != 1:
                break
            u, val = nxt[0], values[nxt[0]]
            if isinstance(val, relax.TupleGetItem) and val.index == 0:  # a BatchNorm's output
                v = u
                continue
            if not isinstance(val, relax.Call) or not isinstance(val.op, tvm.ir.Op):
                break
            args = list(val.args)
            if val.op.name == "relax.nn.batch_norm" and all(
                isinstance(a, tvm.ir.GenericConst) for a in args[1:]
            ):
                v = u
                continue
            consts = [a for a in args if isinstance(a, tvm.ir.GenericConst)]
            if val.op.name in _AFFINE_OPS and len(args) == 2 and len(consts) == 1:
                if not _per_channel(consts[0].value.numpy(), rank, axis):
                    break
                v = u
                continue
            if val.op.name == "relax.add" and not consts and len(args) == 2:
                other = args[1] if args[0].same_as(v) else args[0]
                if list(other.ty.shape.values) != list(call.ty.shape.values):
                    other = None
            break
        if other is None or not isinstance(other, relax.Var) or np.any(np.abs(scale) < 1e-12):
            continue
        w = np.moveaxis(call.args[r.site.arg].value.numpy().astype(np.float64), r.site.axis, 0)
        w = w[r.seg.positions(np.arange(r.seg.features))].reshape(r.seg.features, -1)
        r.residual, r.lift, r.out_axis = other, np.linalg.pinv(w) / scale[:, None], axis


def features(act: np.ndarray, read: Read) -> np.ndarray:
    """``(rows, F)`` of one read: the channel axis last, a flattened block's offsets as rows."""
    lay, seg = read.site.layout, read.seg
    a = np.moveaxis(act, lay.axis, -1).reshape(-1, lay.size)[:, seg.start : seg.stop]
    ppf = int(seg.ppf)
    a = a.reshape(a.shape[0], seg.features, ppf)
    return np.moveaxis(a, 2, 1).reshape(-1, seg.features)


# ---- the activation engine -------------------------------------------------------------
@dataclass
class Batch:
    """One batch of calibration inputs: sample ids (``-1`` pads) and the arrays by input."""

    ids: np.ndarray
    inputs: list[np.ndarray]


def batches(calibration, func: relax.Function, model: str) -> tuple[list[Batch], int]:
    """Calibration data cut into the batches ``func`` takes (the last one padded)."""
    params = func.params
    if isinstance(calibration, Mapping):
        missing = [p.name for p in params if p.name not in calibration]
        if missing:
            raise OptionError(f"{model}: calibration data has no input '{missing[0]}'")
        arrays = [np.asarray(calibration[p.name]) for p in params]
    elif isinstance(calibration, np.ndarray):
        arrays = [calibration]
    else:
        arrays = [np.asarray(a) for a in calibration]
    if len(arrays) != len(params):
        raise OptionError(
            f"{model}: calibration gives {len(arrays)} inputs, the model takes {len(params)}"
        )
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        raise OptionError(f"{model}: calibration inputs must share a non-zero leading size")
    first = params[0].ty.shape.values[0]
    batch = int(first) if isinstance(first, tvm.tirx.IntImm) else n
    for p, a in zip(params, arrays):
        want = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in p.ty.shape.values]
        if len(want) != a.ndim or any(
            w is not None and w != s for w, s in zip(want[1:], a.shape[1:])
        ):
            raise OptionError(
                f"{model}: calibration input '{p.name}' has shape {list(a.shape)}, "
                f"the model takes {['N', *want[1:]]}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise OptionError(f"{model}: calibration input '{p.name}' holds NaN or Inf")
    out = []
    for i in range(0, n, batch):
        ids = np.arange(i, i + batch)
        take = np.minimum(ids, n - 1)
        ids[ids >= n] = -1
        out.append(Batch(ids, [a[take].astype(str(p.ty.dtype)) for a, p in zip(arrays, params)]))
    return out, n


class _Engine:
    """Runs the model with some groups decided; see the module docstring (item 2)."""

    def __init__(self, norm_mod, analysis, onnx_model, model: str):
        self.mod = norm_mod
        self.analysis = analysis
        self.model = model
        self.func = norm_mod["main"]
        self.input_names = [p.name for p in self.func.params]
        self.onnx = onnx_model
        self.kind = "onnxruntime" if onnx_model is not None else "tvm"
        self.cache: dict[tuple[int, str], np.ndarray] = {}  # (batch id, tensor) -> dense
        self.cached_bytes = 0
        self._trials: tuple[Sequence[Batch], Frontier] | None = None  # see _trial_inputs
        self._fronts: tuple[Frontier, Frontier] | None = None  # (dense, current) over _data
        self._data: Sequence[Batch] | None = None
        self._state: dict = {}  # space -> the kept units the current frontier holds
        self._refits: dict = {}  # consumer -> id of the refit the current frontier holds
        self._held: list = []  # the refits _refits names by id, kept alive
        self._consumers: dict[int, set[str]] | None = None  # space -> consumer ONNX nodes
        self._folds = FoldCache()  # the masked consumers' constants, by their decisions

    # -- incremental values (the sequential stages): see .frontier -----------------------
    def outputs_of(self, decided: dict, data: Sequence[Batch], subset: Sequence[Batch]):
        """The outputs (a list, every graph output) of each batch of ``subset`` (batches of
        ``data``), ``decided`` applied: from the frontiers when they hold ``data``."""
        if not self.incremental(data):
            return [out for _, _, out in self.run(decided, [], subset)]
        names = [o.name for o in self.onnx.graph.output]
        values = self.current_values(decided, names) if decided else self.dense_values(names)
        mine = {id(b) for b in subset}
        return [v for b, v in zip(data, values) if id(b) in mine]

    def incremental(self, data: Sequence[Batch]) -> bool:
        """Whether values over ``data`` come from the two frontiers (dense and current),
        which are set up over the batches of the first call."""
        if self.kind != "onnxruntime" or not can_cut(self.onnx):
            return False
        if self._fronts is None:
            feeds = [dict(zip(self.input_names, b.inputs)) for b in data]
            self._fronts = (
                Frontier(self.onnx, feeds, _session),
                Frontier(self.onnx, feeds, _session),
            )
            self._data = data
        return data is self._data

    def _consumer_nodes(self) -> dict[int, set[str]]:
        """Per space, the ONNX nodes of the consumers reading it (built once)."""
        if self._consumers is None:
            self._consumers = {}
            for var, sites in self.analysis.sites.items():
                for site in sites:
                    if site.role != "consumer":
                        continue
                    for seg in site.layout.segments:
                        space = self.analysis.root[seg.space]
                        self._consumers.setdefault(space, set()).add(node_of(var.name))
        return self._consumers

    def dense_values(self, names: Sequence[str]) -> list[list[np.ndarray]]:
        """Per batch of the frontiers, the dense values of the ONNX tensors ``names``."""
        return self._fronts[0].values(names)

    def current_values(self, decided: dict, names: Sequence[str]) -> list[list[np.ndarray]]:
        """Per batch of the frontiers, the values of ``names`` with ``decided`` applied;
        only what the consumers changed since the last call is recomputed."""
        # a group whose kept set changed changes every consumer; a new refit only its own
        state = {s: (tuple(gp.kept), tuple(gp.offsets.items())) for s, gp in decided.items()}
        refits = {rf.consumer: id(rf) for gp in decided.values() for rf in gp.refits}
        whole = {s for s in state.keys() | self._state.keys() if state.get(s) != self._state.get(s)}
        nodes = {n for s in whole for n in self._consumer_nodes().get(s, ())}
        old = self._refits
        nodes |= {node_of(c) for c in refits.keys() | old.keys() if refits.get(c) != old.get(c)}
        if nodes:
            graph = (
                patch_onnx(self.onnx, self.mod, self.masked(decided), model=self.model)
                if decided
                else self.onnx
            )
            self._fronts[1].update(graph, nodes | {f"{n}/compensation" for n in nodes})
            self._state, self._refits = state, refits
            self._held = [rf for gp in decided.values() for rf in gp.refits]
        return self._fronts[1].values(names)

    def dense(self, wanted: Sequence[relax.Var], data: Sequence[Batch]):
        """:meth:`run` of the dense model (no output), from the cache when every value is
        in it."""
        names = [v.name for v in wanted]
        if all((id(b), n) in self.cache for b in data for n in names):
            for b in data:
                yield b, [self.cache[id(b), n] for n in names], None
            return
        for b, acts, out in self.run({}, wanted, data, output=False):
            for n, a in zip(names, acts):
                if (
                    id(b),
                    n,
                ) not in self.cache and self.cached_bytes + a.nbytes <= DENSE_CACHE_BYTES:
                    self.cache[id(b), n] = a
                    self.cached_bytes += a.nbytes
            yield b, acts, out

    def masked(self, decided: dict) -> tvm.IRModule:
        if not decided:
            return self.mod
        edits = plan_edits(self.analysis, decided, mask=True)
        return Rewriter(self.mod, edits, self.analysis, decided, self._folds).transform()

    def run(
        self,
        decided: dict,
        wanted: Sequence[relax.Var],
        data: Sequence[Batch],
        *,
        output: bool = True,
    ) -> Iterator[tuple[Batch, list[np.ndarray], list[np.ndarray] | None]]:
        """Per batch: the values of ``wanted`` and the outputs (a list, every graph output;
        ``None`` unless ``output``: onnxruntime then runs only the nodes ``wanted`` depends
        on), ``decided`` applied."""
        names = [v.name for v in wanted]
        mod = self.masked(decided)
        if self.kind == "onnxruntime":
            yield from self._run_ort(mod, names, data, output)
        else:
            yield from self._run_tvm(mod, names, data)

    def _run_tvm(self, mod, names, data):
        by_name = {b.var.name: b.var for block in mod["main"].body.blocks for b in block.bindings}
        probe = probe_module(mod, [by_name[n] for n in names])
        ex = tvm.compile(probe, target=tvm.target.Target({"kind": "llvm"}))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        for b in data:
            out = vm["main"](*[tvm.runtime.tensor(a) for a in b.inputs])
            yield b, [out[k + 1].numpy() for k in range(len(names))], _leaves(out[0])

    def _run_ort(self, mod, names, data, output):
        import onnx

        if mod is self.mod:  # the user's graph itself: add outputs to a copy
            graph = onnx.ModelProto()
            graph.CopyFrom(self.onnx)
        else:  # patch_onnx already returned a fresh copy
            graph = patch_onnx(self.onnx, self.mod, mod, model=self.model)
        tensors = [onnx_tensor(n, graph) for n in names]
        outs = [o.name for o in graph.graph.output] if output else []
        fetch = [*outs, *tensors]
        if not output:
            _keep_only(graph, tensors)
        known = {o.name for o in graph.graph.output}
        for t in fetch:
            if t not in known:
                graph.graph.output.append(onnx.ValueInfoProto(name=t))
                known.add(t)
        sess = _session(graph)
        for b in data:
            out = sess.run(fetch, self._feed(sess, b))
            yield b, out[len(outs) :], (out[: len(outs)] if output else None)

    def _feed(self, sess, b: Batch, extra: Mapping[str, np.ndarray] | None = None) -> dict:
        given = dict(zip(self.input_names, b.inputs), **(extra or {}))
        return {i.name: given[i.name] for i in sess.get_inputs()}

    def outputs(self, decided: dict, data: Sequence[Batch], changed: Sequence[relax.Var]):
        """The outputs (a list, every graph output) per batch with ``decided`` applied, where
        only the bindings ``changed`` differ from the dense model (a masked trial changes only
        the consumers): onnxruntime runs just the nodes downstream of them, fed the dense
        values of what they read from upstream (one dense pass, cut to those values); an
        output they do not reach is its dense value."""
        import onnx

        if self.kind != "onnxruntime":
            return [out for _, _, out in self.run(decided, [], data)]
        graph = patch_onnx(self.onnx, self.mod, self.masked(decided), model=self.model)
        names = [o.name for o in graph.graph.output]
        cross = _cut_after(graph, {node_of(v.name) for v in changed}, self.onnx)
        if cross is None:  # left whole: run it as it is
            sess = _session(graph)
            return [sess.run(names, self._feed(sess, b)) for b in data]
        reached = [o.name for o in graph.graph.output]
        unreached = [t for t in names if t not in reached]
        upstream = [dict(zip(cross, v)) for v in self._trial_inputs(data).values(cross)]
        dense = [dict(zip(unreached, v)) for v in self._trial_inputs(data).values(unreached)]
        for t, a in upstream[0].items():
            elem = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
            graph.graph.input.append(onnx.helper.make_tensor_value_info(t, elem, a.shape))
        sess = _session(graph)
        out = []
        for b, up, same in zip(data, upstream, dense):
            got = dict(zip(reached, sess.run(reached, self._feed(sess, b, up))), **same)
            out.append([got[t] for t in names])
        return out

    def _trial_inputs(self, data: Sequence[Batch]) -> Frontier:
        """The dense values over ``data`` that trials read from upstream: one frontier over
        the trials' batches (the groups go through the network in order, so each upstream
        node runs about once for all of them)."""
        if self._trials is None or self._trials[0] is not data:
            feeds = [dict(zip(self.input_names, b.inputs)) for b in data]
            self._trials = (data, Frontier(self.onnx, feeds, _session))
        return self._trials[1]

    def end_trials(self) -> None:
        """Free the trials' upstream values."""
        self._trials = None


def _session(graph):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(graph.SerializeToString(), opts, ["CPUExecutionProvider"])


def _has_subgraphs(g) -> bool:
    import onnx

    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in subgraph for n in g.node for a in n.attribute)


def _cut_after(model, start: set, original) -> list[str] | None:
    """Cut ``model`` (``original`` with some nodes changed or added) down to the nodes
    downstream of the ``start`` nodes and of the added ones, with the outputs among them;
    return the tensors they read from the nodes cut away (to be fed), or ``None`` when it
    cannot be cut (subgraphs, or no output is downstream)."""
    g = model.graph
    if _has_subgraphs(g):
        return None
    old = {n.name for n in original.graph.node}
    made, keep = set(), []
    for node in g.node:  # topological order
        if node.name in start or node.name not in old or any(i in made for i in node.input):
            keep.append(node)
            made.update(node.output)
    if not any(o.name in made for o in g.output):
        return None
    outer = {t.name for t in g.initializer} | {i.name for i in g.input}
    cross = sorted({i for n in keep for i in n.input if i and i not in made and i not in outer})
    del g.node[:]
    g.node.extend(keep)
    outputs = [o for o in g.output if o.name in made]
    del g.output[:]
    g.output.extend(outputs)
    _drop_unused(g)
    return cross


def _drop_unused(g, keep: Sequence[str] = ()) -> None:
    """Drop the initializers and inputs that no node of ``g`` reads, no output is and
    ``keep`` does not name (a cut graph would otherwise serialize, and onnxruntime load,
    every weight of the whole model)."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | set(keep)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(inputs)


def _keep_only(model, tensors: Sequence[str]) -> None:
    """Cut ``model`` down to the nodes ``tensors`` depend on, with them as the outputs
    (onnxruntime runs every node of a graph, whatever is fetched). A graph with subgraph
    attributes (If, Loop) is left whole: their bodies read outer tensors implicitly."""
    g = model.graph
    if _has_subgraphs(g):
        return
    need, keep = set(tensors), []
    for node in reversed(g.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    nodes = list(reversed(keep))
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    _drop_unused(g, tensors)


def onnx_tensor(var_name: str, model) -> str:
    """The ONNX tensor a binding named by :mod:`.importer` holds (a node's output or an
    input); a :class:`GraphError` when the binding is not a whole node's result."""
    if var_name in {i.name for i in model.graph.input}:
        return var_name
    node = node_of(var_name)
    if not node or SUB in var_name:
        raise GraphError(f"binding '{var_name}' is not an ONNX tensor")
    base = var_name
    head, sep, tail = base.rpartition(OUT)
    k = int(tail) if sep and tail.isdigit() and head == node else 0
    for n in model.graph.node:
        if n.name == node:
            return n.output[k]
    raise GraphError(f"binding '{var_name}' names node '{node}', not in the graph")


def pick_engine(norm_mod, analysis, onnx_model, reads: Sequence[Read], model: str) -> _Engine:
    """onnxruntime when every read maps to a tensor of ``onnx_model``, else TVM."""
    if onnx_model is not None:
        try:
            for r in reads:
                onnx_tensor(r.data.name, onnx_model)
            return _Engine(norm_mod, analysis, onnx_model, model)
        except GraphError as exc:
            log.info("%s: activations through TVM (%s)", model, exc)
    return _Engine(norm_mod, analysis, None, model)


# ---- collection ------------------------------------------------------------------------
@dataclass
class _Rows:
    """Which rows of a read's activation to keep (subsampled, padding dropped).

    A read of ``F`` features keeps about ``min(ROW_BUDGET, max(MIN_ROWS, ROWS_PER_FEATURE
    F))`` rows over the ``samples``: the moments cost ``rows F^2``, and a ridge fit of ``F``
    features is settled long before ``16 F`` rows (``samples = 0``: ``per_sample`` alone).
    """

    per_sample: int  # rows per sample, at most
    seed: int = 0
    mask_input: int | None = None  # index of a (batch, tokens) 0/1 input: padding dropped
    samples: int = 0

    def cap(self, features: int) -> int:
        """Rows per sample kept of a read of ``features`` features."""
        if not self.samples:
            return self.per_sample
        budget = min(ROW_BUDGET, max(MIN_ROWS, ROWS_PER_FEATURE * features))
        return min(self.per_sample, max(1, -(-budget // self.samples)))


def _row_filter(read: Read, act: np.ndarray, b: Batch, rows: _Rows) -> np.ndarray:
    """Indices of the rows of :func:`features` to keep for this batch."""
    lay = read.site.layout
    total = act.size // act.shape[lay.axis] * int(read.seg.ppf)
    batch = b.ids.size
    if total % batch:  # the sample axis is not leading: keep every row of a real batch
        return np.arange(total) if (b.ids >= 0).any() else np.arange(0)
    per = total // batch
    ok = np.repeat(b.ids >= 0, per)
    if rows.mask_input is not None and int(read.seg.ppf) == 1:
        mask = b.inputs[rows.mask_input]
        if lay.axis == act.ndim - 1 and act.ndim == 3 and act.shape[:2] == mask.shape:
            ok &= mask.reshape(-1) != 0
    idx = np.flatnonzero(ok)
    cap = rows.cap(read.seg.features)
    if per > cap:
        rng = np.random.default_rng(rows.seed + int(b.ids.max(initial=0)))
        keep = []
        for s in range(batch):
            lo = idx[(idx >= s * per) & (idx < (s + 1) * per)]
            if lo.size > cap:
                lo = np.sort(rng.choice(lo, cap, replace=False))
            keep.append(lo)
        idx = np.concatenate(keep) if keep else idx
    return idx


def _value_pairs(engine: _Engine, decided: dict, wanted, data, need_dense: bool, incremental):
    """Per batch ``(batch, dense values or None, current values)`` of ``wanted``."""
    if incremental and engine.incremental(data):
        names = [onnx_tensor(v.name, engine.onnx) for v in wanted]
        dense = engine.dense_values(names) if need_dense or not decided else None
        current = engine.current_values(decided, names) if decided else dense
        yield from zip(data, dense or [None] * len(data), current)
        return
    if not decided:
        for b, acts, _ in engine.dense(wanted, data):
            yield b, acts, acts
        return
    current_runs = engine.run(decided, wanted, data, output=False)
    dense_runs = engine.dense(wanted, data) if need_dense else None
    for b, current, _ in current_runs:
        yield b, (next(dense_runs)[1] if dense_runs is not None else None), current


def collect(
    engine: _Engine,
    decided: dict,
    reads: Sequence[Read],
    data: Sequence[Batch],
    rows: _Rows,
    correction: float = 1.0,
    *,
    incremental: bool = False,
) -> list[rec.ConsumerData]:
    """Moments of (current, target) features at every read; current = ``decided`` applied.

    The target is the dense features when nothing is decided; otherwise
    ``x~ + correction (x - x~)`` (plus ``correction`` times the lifted drift of the residual
    stream the consumer is added to): ``1`` refits a consumer to reproduce the dense
    network (upstream drift corrected), ``0`` to reproduce its own output on its pruned input
    (the dense network is not run). ``incremental``: the values come from the engine's
    frontiers (a sequential stage: only what changed since the last stage is recomputed).
    """
    wanted = list({r.data: None for r in reads})
    if decided and correction:  # a residual stream only drifts in the network pruned upstream
        wanted += [v for v in {r.residual: None for r in reads if r.residual is not None}]
    slot = {v: i for i, v in enumerate(wanted)}
    paired = bool(decided) and correction != 0  # else the target is the current features
    # reads of the same features with the same target (Q, K and V of one input) share moments
    first: dict[tuple, rec.ConsumerData] = {}
    out, own = [], []
    for r in reads:
        lay, seg = r.site.layout, r.seg
        key = (r.data, lay.axis, lay.size, seg.start, seg.stop, seg.ppf, r.residual)
        # a consumer much narrower than what it reads takes its target through its weights
        # (ConsumerData.projected): those moments are its own
        proj = paired and r.factor is not None and 2 * r.factor.shape[1] <= seg.features
        shared = first.get(key) if r.residual is None and not proj else None
        if shared is not None:
            fit, held = shared.fit, shared.held
        else:
            width = r.factor.shape[1] if proj else None
            fit, held = (rec.Moments.empty(seg.features, paired, width) for _ in range(2))
        # the name is the binding the refit folds into (rewrite matches it)
        out.append(rec.ConsumerData(r.consumer.name, r.gram, fit, held, r.factor, proj))
        if not proj:
            first.setdefault(key, out[-1])
        if shared is None:
            own.append((r, out[-1]))
    pairs = _value_pairs(engine, decided, wanted, data, correction != 0, incremental)
    maps: dict[int, tuple] = {}  # id(read) -> _target_maps
    for b, dense, current in pairs:
        held = (b.ids % HELD_OUT_EVERY) == HELD_OUT_EVERY - 1
        for r, cd in own:
            a_c = current[slot[r.data]]
            a_d = a_c if dense is None else dense[slot[r.data]]
            for part, moments in ((~held, cd.fit), (held, cd.held)):
                if not part.any():
                    continue
                sub = Batch(np.where(part, b.ids, -1), b.inputs)
                idx = _row_filter(r, a_c, sub, rows)
                f_c = features(a_c, r)[idx]
                if not moments.paired:
                    moments.add(f_c, f_c)
                    continue
                target, drift = f_c, None  # paired moments: correction != 0
                if a_d is not a_c:
                    f_d = features(a_d, r)[idx]
                    target = f_d if correction == 1 else f_c + correction * (f_d - f_c)
                    if r.residual is not None:
                        drift = dense[slot[r.residual]] - current[slot[r.residual]]
                        drift = np.moveaxis(drift, r.out_axis, -1).reshape(-1, r.lift.shape[0])
                        drift = correction * drift[idx]
                if id(r) not in maps:
                    maps[id(r)] = _target_maps(r, cd.projected, f_c.dtype)
                proj, lift = maps[id(r)]
                if proj is not None:
                    target = target.astype(f_c.dtype, copy=False) @ proj
                if drift is not None:
                    target = target + drift @ lift
                moments.add(f_c, target.astype(f_c.dtype, copy=False))
    for _, cd in own:
        cd.fit.flush()
        cd.held.flush()
    return out


def _target_maps(read: Read, projected: bool, dtype) -> tuple[np.ndarray | None, ...]:
    """``(L, lift)`` of a read: the projection of its target (in ``dtype``, the rows'
    precision) and the map of a residual drift row to the target; ``None`` where there is
    none. Projected, the drift map is ``lift L = diag(1/s) (W^T)^+ W^T`` (``diag(1/s)`` for
    a ``W`` of full rank: well conditioned, so also in ``dtype``); else ``lift`` itself, in
    float64 (``(W^T)^+`` of an ill-conditioned ``W`` is large)."""
    if not projected:
        return None, read.lift
    lift = None if read.lift is None else (read.lift @ read.factor).astype(dtype)
    return read.factor.astype(dtype), lift


def _output_error(
    got: Sequence[np.ndarray | None], want: Sequence[np.ndarray | None], model: str = "model"
) -> float:
    """The mean over the graph's outputs of ``||y - y_dense||^2 / ||y_dense - mean||^2``
    over the samples (each output's error against its own variation: a detector's boxes and
    a second head weigh alike; an output that hardly varies, against a millionth of its
    energy). Outputs :func:`_stack` could not stack (not floating point, or of a shape that
    changes with the input, as after a non-maximum suppression) are left out."""
    errors = [
        unexplained_variance(w, g, relative_floor=1e-6)
        for g, w in zip(got, want, strict=True)
        if g is not None and w is not None and g.shape == w.shape
    ]
    if not errors:
        raise GraphError(
            f"{model}: no output of floating point and fixed shape to measure pruning by"
        )
    return sum(errors) / len(errors)


def _stack(per_batch: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray | None]:
    """Per-batch output lists -> one array per output, the batches concatenated (``None``
    for an output that is not floating point or whose shape changes between batches)."""
    out = []
    for parts in zip(*per_batch, strict=True):
        same = all(p.shape == parts[0].shape for p in parts)  # batches are padded to size
        floating = all(np.issubdtype(p.dtype, np.floating) for p in parts)
        out.append(np.concatenate(parts) if same and floating else None)
    return out


def _leaves(value) -> list[np.ndarray]:
    """The tensors of a VM result (nested tuples flattened, in order)."""
    if isinstance(value, tvm.ir.Array | list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value.numpy()]


# ---- the pass --------------------------------------------------------------------------
def _few_rows(d: rec.ConsumerData, kept: int, group: str, model: str) -> None:
    if d.rows < 2 * kept:
        log.warning(
            "%s: group %s: consumer %s is refit on %d rows for %d kept features; "
            "give more calibration samples",
            model,
            group,
            d.name,
            d.rows,
            kept,
        )


def _plan_of(
    stage: Stage,
    kept_units: Sequence[int],
    datas,
    model: str,
    settings: CalibrationSettings,
    final: bool = False,
    refit_all: bool = True,
) -> GroupPlan:
    """The group's plan with every consumer refit; ``final``: the ridge is chosen on held-out
    samples and too few rows are reported (intermediate refits use the selection ridge)."""
    gp = stage.plan
    u = gp.unit
    kept_f = np.array([f for k in kept_units for f in range(k * u, (k + 1) * u)])
    refits = []
    for k, d in enumerate(datas if settings.reconstruct else []):
        last = final and k not in stage.stale  # a stale read is refit by _refine
        if last:
            _few_rows(d, kept_f.size, gp.name, model)
        ridges = settings.ridges if last else (settings.ridge or rec.SELECTION_RIDGE,)
        fit = rec.reconstruct(d, kept_f, ridges, refit_all=refit_all)
        refits.append(Refit(d.name, fit.r.astype(np.float32), fit.mu))
    return GroupPlan(gp.name, gp.producers, gp.channels, u, sorted(kept_units), [], {}, refits)


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibrated pass runs (from :class:`~tvm_qmfrg.options.PruneOptions`)."""

    selection: str  # "activations" | "criterion"
    sequential: bool
    allocation: str  # "sensitivity" | anything else: keep the given counts
    reconstruct: bool = True
    ridge: float | None = None  # None: chosen on held-out samples
    residual: bool = True  # consumers ahead of a residual add cancel the stream's drift
    correction: float | None = None  # upstream drift a refit corrects; None: chosen (auto)

    @property
    def ridges(self) -> tuple[float, ...]:
        return rec.RIDGES if self.ridge is None else (self.ridge,)


def calibrate_plans(
    norm_mod: tvm.IRModule,
    analysis: ChannelAnalysis,
    values: dict,
    plans: list[tuple[int, GroupPlan]],
    calibration,
    onnx_model,
    settings: CalibrationSettings,
    *,
    allocate: Callable[[list[list[tuple[float, float]]], dict[int, int]], list[int]] | None = None,
    model: str = "model",
) -> list[GroupPlan]:
    """The calibrated plans of ``plans`` (``(space id, data-free plan)`` pairs, whose kept
    counts are the budget unless ``allocate`` turns measured loss curves into counts: it
    takes one curve per plan and the kept counts of the plans it must not change, the groups
    without a consumer to refit)."""
    t0 = time.perf_counter()
    func = norm_mod["main"]
    order = {
        b.var: i for i, b in enumerate(b for block in func.body.blocks for b in block.bindings)
    }
    data, n = batches(calibration, func, model)
    mask_input = next(
        (
            i
            for i, p in enumerate(func.params)
            if "mask" in p.name.lower() and len(p.ty.shape.values) == 2 and p.ty.dtype != "float32"
        ),
        None,
    )
    stages = []
    for sid, gp in plans:
        reads = consumer_reads(analysis, values, sid, order)
        if reads:
            first = min(order[p.var] for p in analysis.spaces_by_id[sid].producers)
            stages.append(Stage(sid, gp, reads, len(gp.kept), first))
        else:
            log.info("%s: group %s has no consumer to refit; kept as decided", model, gp.name)
    all_reads = [r for st in stages for r in st.reads]
    engine = pick_engine(norm_mod, analysis, onnx_model, all_reads, model)
    if settings.sequential and settings.residual and settings.reconstruct:
        attach_residuals(all_reads, analysis, values)
        for r in all_reads:
            if r.residual is not None and engine.kind == "onnxruntime":
                try:
                    onnx_tensor(r.residual.name, onnx_model)
                except GraphError:
                    r.residual = None
        log.info(
            "%s: %d consumers ahead of a residual add",
            model,
            sum(r.residual is not None for r in all_reads),
        )
    per = max(1, -(-ROW_BUDGET // n))
    rows = _Rows(per, 0, mask_input, n)
    log.info(
        "%s: calibrated pruning of %d groups on %d samples (activations by %s)",
        model,
        len(stages),
        n,
        engine.kind,
    )
    stages.sort(key=lambda st: min(r.order for r in st.reads))
    if allocate is not None and stages:
        _measure_curves(engine, stages, data, rows, model, settings)
        by_space = {st.space: st for st in stages}
        curves = [by_space[sid].curve if sid in by_space else [] for sid, _ in plans]
        fixed = {g: len(gp.kept) for g, (sid, gp) in enumerate(plans) if sid not in by_space}
        for (sid, _), k in zip(plans, allocate(curves, fixed)):
            if sid in by_space:
                by_space[sid].keep = k
    if settings.sequential:  # a read runs after a group decided later: refit it at the end
        for i, st in enumerate(stages):
            later = [x.first_producer for x in stages[i + 1 :]]
            st.stale = {k for k, r in enumerate(st.reads) if any(p < r.order for p in later)}
    if not settings.sequential:
        decided = _decide(engine, stages, data, rows, model, settings, 1.0, t0)
    elif settings.correction is not None or not settings.reconstruct:
        fixed = 1.0 if settings.correction is None else settings.correction
        decided = _decide(engine, stages, data, rows, model, settings, fixed, t0)
    else:
        decided = _choose_correction(engine, stages, data, rows, model, settings, t0)
    log.info("%s: calibrated pruning done in %.1f s", model, time.perf_counter() - t0)
    by_space = {st.space: decided[st.space] for st in stages}
    return [by_space.get(sid, gp) for sid, gp in plans]


def _decide(engine, stages, data, rows, model, settings, correction, t0, refit_all=True) -> dict:
    """Every stage's plan, in order (see the module docstring, item 4).

    A stage that keeps every unit is left as it is, unrefit, where its refit would be the
    identity: its consumers' target is what they read already (``correction`` 0, or no
    earlier stage has changed the network)."""
    decided: dict = {}
    changed = False  # whether a stage so far changed what the network computes
    for i, st in enumerate(stages):
        if _keeps_all(st, settings) and (correction == 0 or not changed):
            kept, datas, note = range(st.plan.units), [], ", unchanged"
        else:
            changed, note = settings.sequential, ""
            datas = collect(
                engine,
                decided if settings.sequential else {},
                st.reads,
                data,
                rows,
                correction,
                incremental=settings.sequential,
            )
            if settings.selection == "activations":
                kept, _ = rec.select_units(datas, st.plan.unit, st.keep)
            else:
                kept = list(st.plan.kept)
        decided[st.space] = _plan_of(st, kept, datas, model, settings, True, refit_all)
        log.info(
            "%s: [%d/%d] %s keeps %d of %d units%s (%.1f s)",
            model,
            i + 1,
            len(stages),
            st.plan.name,
            len(kept),
            st.plan.units,
            note,
            time.perf_counter() - t0,
        )
    if settings.sequential and settings.reconstruct:
        _refine(engine, stages, decided, data, rows, model, settings, correction, refit_all)
    return decided


def _keeps_all(st: Stage, settings: CalibrationSettings) -> bool:
    kept = st.keep if settings.selection == "activations" else len(st.plan.kept)
    return kept >= st.plan.units


def _choose_correction(engine, stages, data, rows, model, settings, t0) -> dict:
    """The sequential plans for each of :data:`CORRECTIONS`, refit on the fitting samples
    only; the one whose network output is closest to the dense one on the held-out samples.
    (Each is compared after its final refit pass, :func:`_refine`: before it, the consumers
    whose input a later group changed still hold refits of the earlier input, and the
    network's output is far off for every candidate.)

    Which target generalizes depends on the model (measured: a BatchNorm CNN keeps more
    with the dense target, a LayerNorm transformer with the consumer's own output), so it is
    chosen on samples no refit has seen.
    """
    held = [b for b in data if np.any(b.ids % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)]
    if not held:
        return _decide(engine, stages, data, rows, model, settings, 1.0, t0)

    def held_rows(b: Batch, outs: Sequence[np.ndarray]) -> list[np.ndarray]:
        mine = (b.ids >= 0) & (b.ids % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
        return [out[mine] if out.shape[:1] == b.ids.shape else out for out in outs]

    candidates = []
    for c in CORRECTIONS:
        decided = _decide(engine, stages, data, rows, model, settings, c, t0, refit_all=False)
        got = [held_rows(b, out) for b, out in zip(held, engine.outputs_of(decided, data, held))]
        candidates.append((c, decided, _stack(got)))
    # the dense outputs last: the frontier of the dense network is then near the end
    want = _stack([held_rows(b, out) for b, out in zip(held, engine.outputs_of({}, data, held))])
    best = None
    for c, decided, got in candidates:
        err = _output_error(got, want, model)
        log.info("%s: refit correction %g: held-out output error %.4g", model, c, err)
        if best is None or err < best[0]:
            best = (err, c, decided)
    log.info("%s: refit correction %g chosen", model, best[1])
    return best[2]


def _refine(engine, stages, decided, data, rows, model, settings, correction, refit_all) -> None:
    """Refit every consumer once more, in the order the consumers run, on the activations of
    the network with every group pruned (and the consumers before it refit again)."""
    identity = correction == 0  # a group that keeps every unit refits to the identity
    reads = sorted(
        (
            (r, st)
            for st in stages
            if not (identity and _keeps_all(st, settings))
            for k, r in enumerate(st.reads)
            if k in st.stale
        ),
        key=lambda rs: rs[0].order,
    )
    waves: list[list[tuple[Read, Stage]]] = []
    done_inputs: set = set()
    for r, st in reads:  # consumers reading the same tensor are refit together
        if waves and r.data in done_inputs:
            waves[-1].append((r, st))
            continue
        waves.append([(r, st)])
        done_inputs = {r.data}
    for wave in waves:
        datas = collect(
            engine, decided, [r for r, _ in wave], data, rows, correction, incremental=True
        )
        for (_, st), d in zip(wave, datas):
            gp = decided[st.space]
            u = gp.unit
            kept_f = np.array([f for k in gp.kept for f in range(k * u, (k + 1) * u)])
            _few_rows(d, kept_f.size, gp.name, model)
            fit = rec.reconstruct(d, kept_f, settings.ridges, refit_all=refit_all)
            gp.refits = [rf for rf in gp.refits if rf.consumer != d.name]
            gp.refits.append(Refit(d.name, fit.r.astype(np.float32), fit.mu))
    log.info("%s: refit %d consumers on the pruned network", model, len(reads))


def _measure_curves(engine, stages, data, rows, model, settings) -> None:
    """Each group pruned alone (activation selection + refit on dense activations) by
    :data:`SENSITIVITY_FRACTIONS`: the relative output error on the first samples.

    The error of the network's output is measured at :data:`SENSITIVITY_TRIALS`; between
    and around them it follows the group's own loss (the consumers' relative output loss
    of :func:`~tvm_qmfrg.reconstruction.select_path`, free along the elimination path),
    scaled by the measured ratio of network to own loss (interpolated in log space), and
    made non-decreasing.
    """
    subset = []
    for b in data:
        subset.append(b)
        if sum(int((x.ids >= 0).sum()) for x in subset) >= SENSITIVITY_SAMPLES:
            break
    dense_out = _stack([out for _, _, out in engine.run({}, [], subset)])
    # a few streamed passes of the dense network, each up to its reads (a walk of the dense
    # frontier a stage at a time measured no faster: it keeps a stage's reads over all samples)
    chunks, chunk, budget = [], [], MOMENT_BYTES
    for st in stages:
        size = sum(8 * 2 * r.seg.features**2 for r in st.reads)  # unpaired: fit, held
        if chunk and budget - size < 0:
            chunks.append(chunk)
            chunk, budget = [], MOMENT_BYTES
        chunk.append(st)
        budget -= size
    if chunk:
        chunks.append(chunk)
    for chunk in chunks:
        reads = [r for st in chunk for r in st.reads]
        datas = collect(engine, {}, reads, data, rows)
        k = 0
        for st in chunk:
            mine = datas[k : k + len(st.reads)]
            k += len(st.reads)
            st.curve = _curve(engine, st, mine, subset, dense_out, model, settings)
            log.info(
                "%s: sensitivity of %s: %s",
                model,
                st.plan.name,
                ", ".join(f"{f:.0%}: {e:.3g}" for f, e in st.curve),
            )
    engine.end_trials()


def _curve(engine, st: Stage, mine, subset, dense_out, model, settings):
    """``[(fraction removed, network output error)]`` of one group (see _measure_curves)."""
    units = st.plan.units

    def keep_of(f: float) -> int:
        return max(1, units - int(round(f * units)))

    keeps = sorted({keep_of(f) for f in SENSITIVITY_FRACTIONS} - {units}, reverse=True)
    if not keeps:
        return []
    paths, path_loss = rec.select_path(mine, st.plan.unit, keeps)
    own = dict(path_loss)  # units removed -> the consumers' loss
    measured = {keep_of(f) for f in SENSITIVITY_TRIALS} & set(keeps) or {keeps[0]}
    ratios = []  # (fraction removed, log(network error / own loss))
    errors = {}
    for keep, kept in zip(keeps, paths):
        if keep not in measured:
            continue
        trial = {st.space: _plan_of(st, kept, mine, model, settings)}
        got = engine.outputs(trial, subset, [r.consumer for r in st.reads])
        errors[keep] = _output_error(_stack(got), dense_out, model)
        ratios.append(
            (1 - keep / units, np.log((errors[keep] + 1e-12) / (own[units - keep] + 1e-12)))
        )
    xs, ys = np.array([r[0] for r in ratios]), np.array([r[1] for r in ratios])
    fractions, errs = [], []
    for keep in keeps:
        f = 1 - keep / units
        err = errors.get(keep)
        if err is None:
            err = (own[units - keep] + 1e-12) * float(np.exp(np.interp(f, xs, ys))) - 1e-12
        fractions.append(f)
        errs.append(max(err, 0.0))
    # nested kept sets: removing more never costs less (the interpolated ratio can dip)
    return list(zip(fractions, np.maximum.accumulate(errs).tolist()))
