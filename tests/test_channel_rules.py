"""One channel rule (or graph situation) per test, on tiny ONNX graphs built by hand.

Each graph is imported the way a user's export is (:func:`import_model`: prepared, named after
its ONNX nodes, normalized); the tests assert what :func:`analyze_channels` finds (spaces,
their sizes, units and freezes, the edit sites of each node and their layouts) and, where a
rule edits something, that pruning at sparsity 0.5 really shrinks the shapes and that the
exported ONNX computes what TVM computes (``export_model`` checks that itself).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm_qmfrg.passes.channels import RULES, analyze_channels, rule
from tvm_qmfrg.passes.importer import node_of
from tvm_qmfrg.passes.onnx_io import export_model, import_model
from tvm_qmfrg.passes.prune import prune_module

OUTPUT_REASON = "channels reach the function output"


# ---- building tiny graphs -------------------------------------------------------------


class Graph:
    """A tiny ONNX graph under construction: one float32 input ``x``, seeded weights."""

    def __init__(self, shape, seed: int = 0):
        self.shape = list(shape)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, *shape, scale: float = 0.3) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def op(self, op_type: str, name: str, inputs, outputs=None, **attrs) -> str:
        """Add node ``name``; its (first) output is ``name_y`` unless ``outputs`` are given."""
        outputs = outputs or [f"{name}_y"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 1, group: int = 1, **attrs):
        w = self.const(f"{name}_w", self.weight(cout, cin // group, k, k))
        b = self.const(f"{name}_b", self.weight(cout, scale=0.1))
        attrs.setdefault("pads", [k // 2] * 4)
        return self.op("Conv", name, [x, w, b], kernel_shape=[k, k], group=group, **attrs)

    def relu(self, name: str, x: str) -> str:
        return self.op("Relu", name, [x])

    def linear(self, name: str, x: str, cin: int, cout: int) -> str:
        """``MatMul`` (node ``name``) then a bias ``Add`` (node ``name/bias``)."""
        y = self.op("MatMul", name, [x, self.const(f"{name}_w", self.weight(cin, cout))])
        return self.op("Add", f"{name}/bias", [y, self.const(f"{name}_b", self.weight(cout))])

    def gemm(self, name: str, x: str, cin: int, cout: int) -> str:
        w = self.const(f"{name}_w", self.weight(cout, cin))
        b = self.const(f"{name}_b", self.weight(cout, scale=0.1))
        return self.op("Gemm", name, [x, w, b], transB=1)

    def model(self, output: str) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)
        y = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, "tiny", [x], [y], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
        onnx.checker.check_model(model, full_check=True)
        return model


# ---- reading the analysis -------------------------------------------------------------


def analyze(model: onnx.ModelProto):
    imported = import_model(model)
    return imported, analyze_channels(imported.mod["main"], "tiny")


def label(producer) -> str:
    """A producer as plans name it: its ONNX node, ``[a:b]`` for a part cut by a split."""
    base = node_of(producer.var.name)
    return f"{base}[{producer.rows[0]}:{producer.rows[1]}]" if producer.rows else base


def spaces_by_producer(analysis) -> dict:
    """Every space with producers, by the label of each of its producers."""
    return {label(p): sp for sp in analysis.spaces for p in sp.producers}


def producers_of(space) -> set[str]:
    return {label(p) for p in space.producers}


def sites(analysis, node: str, role: str) -> list:
    """The sites of ``role`` on the bindings of ONNX node ``node`` (``NODE``, ``NODE#1``...)."""
    return [
        s
        for var, found in analysis.sites.items()
        if node_of(var.name) == node
        for s in found
        if s.role == role
    ]


def only_site(analysis, node: str, role: str):
    found = sites(analysis, node, role)
    assert len(found) == 1, f"{node}: expected one {role} site, found {found}"
    return found[0]


def segments(analysis, layout) -> list[tuple]:
    """A layout's segments as ``(producer labels of the space, start, features, first)``."""
    spaces = analysis.spaces_by_id
    return [
        (
            producers_of(spaces[analysis.root[s.space]]),
            s.start,
            s.features,
            s.first,
        )
        for s in layout.segments
    ]


def ops_by_node(mod: tvm.IRModule) -> dict[str, set[str]]:
    """The Relax ops each ONNX node became."""
    out: dict[str, set[str]] = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                out.setdefault(node_of(b.var.name), set()).add(b.value.op.name)
    return out


def shapes(mod: tvm.IRModule) -> dict[str, tuple]:
    """Static shape of every tensor binding, by binding name."""
    out = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            ty = b.var.ty
            if isinstance(ty, relax.TensorType) and ty.shape is not None:
                out[b.var.name] = tuple(int(d) for d in ty.shape.values)
    return out


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def onnx_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def kept(plan) -> dict[str, int]:
    return {g.name: g.kept_channels for g in plan.groups}


# ---- 1. split along channels ----------------------------------------------------------


def c2f_block() -> onnx.ModelProto:
    """conv(8) -> split [4, 4] -> the second part through a 3x3 conv -> concat of both parts
    and the conv's output (as in YOLOv8's C2f) -> conv."""
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    g.op("Split", "split", [stem, g.ints("split_sizes", [4, 4])], ["part0", "part1"], axis=1)
    branch = g.relu("branch_act", g.conv("branch", "part1", 4, 4, k=3))
    cat = g.op("Concat", "cat", ["part0", "part1", branch], axis=1)
    return g.model(g.conv("head", cat, 12, 6))


def test_split_along_channels_cuts_the_producer_into_one_group_per_part():
    imported, analysis = analyze(c2f_block())
    by_prod = spaces_by_producer(analysis)
    assert "stem" not in by_prod, "the whole stem space must be cut into its parts"
    first, second = by_prod["stem[0:4]"], by_prod["stem[4:8]"]
    assert first.id != second.id
    for part, rows in ((first, (0, 4)), (second, (4, 8))):
        assert (part.size, part.unit, part.frozen) == (4, 1, [])
        assert [(p.op, p.rows, p.weight.shape) for p in part.producers] == [
            ("conv2d", rows, (4, 4))
        ]
    assert {label(p) for sp in analysis.prunable() for p in sp.producers} == {
        "stem[0:4]",
        "stem[4:8]",
        "branch",
    }

    split = only_site(analysis, "split", "split")
    assert (split.axis, split.layout.axis, split.layout.size) == (1, 1, 8)
    assert segments(analysis, split.layout) == [({"stem[0:4]"}, 0, 4, 0), ({"stem[4:8]"}, 4, 4, 0)]
    producer = only_site(analysis, "stem", "producer")
    assert segments(analysis, producer.layout) == segments(analysis, split.layout)
    # the branch reads only the second part; the head both parts and the branch, side by side
    branch_in = only_site(analysis, "branch", "consumer")
    assert branch_in.layout.size == 4
    assert segments(analysis, branch_in.layout) == [({"stem[4:8]"}, 0, 4, 0)]
    head_in = only_site(analysis, "head", "consumer")
    assert head_in.layout.size == 12
    assert segments(analysis, head_in.layout) == [
        ({"stem[0:4]"}, 0, 4, 0),
        ({"stem[4:8]"}, 4, 4, 0),
        ({"branch"}, 8, 4, 0),
    ]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem[0:4]": 2, "stem[4:8]": 2, "branch": 2}
    shape = shapes(pruned)
    assert shape["stem"] == (1, 4, 8, 8)
    assert shape["split"] == shape["split:1"] == (1, 2, 8, 8)
    assert shape["cat"] == (1, 6, 8, 8)
    onnx_out = export_model(imported, pruned)
    split_node = onnx_node(onnx_out, "split")
    assert initializer(onnx_out, split_node.input[1]).tolist() == [2, 2]
    assert initializer(onnx_out, "stem_w").shape == (4, 4, 1, 1)
    assert initializer(onnx_out, "branch_w").shape == (2, 2, 3, 3)
    assert initializer(onnx_out, "head_w").shape == (6, 6, 1, 1)


def test_a_split_part_is_protected_by_its_group_name():
    imported, _ = analyze(c2f_block())
    plan, _ = prune_module(imported.mod, sparsity=0.5, protect=["stem[0:4]"])
    assert [(f.name, f.reason) for f in plan.frozen if f.name.startswith("stem")] == [
        ("stem[0:4]", "protected by 'stem[0:4]'")
    ]
    assert "stem[4:8]" in kept(plan)


# ---- 2. split along another axis ------------------------------------------------------


def test_split_along_a_spatial_axis_passes_the_whole_layout_to_every_part():
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    g.op("Split", "rows", [stem, g.ints("row_sizes", [4, 4])], ["top", "bottom"], axis=2)
    total = g.op(
        "Add", "sum", [g.conv("top_conv", "top", 8, 6), g.conv("low_conv", "bottom", 8, 6)]
    )
    imported, analysis = analyze(g.model(g.conv("head", g.relu("sum_act", total), 6, 3)))

    stem_space = spaces_by_producer(analysis)["stem"]
    assert (stem_space.size, stem_space.unit, stem_space.frozen) == (8, 1, [])
    assert sites(analysis, "rows", "split") == [], "a spatial split edits nothing"
    whole = [({"stem"}, 0, 8, 0)]
    for node in ("top_conv", "low_conv"):
        read = only_site(analysis, node, "consumer")
        assert (read.layout.axis, read.layout.size) == (1, 8)
        assert segments(analysis, read.layout) == whole
    # the two parts' convs are added: one space, two producers
    assert producers_of(spaces_by_producer(analysis)["top_conv"]) == {"top_conv", "low_conv"}

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem": 4, "top_conv": 3}
    shape = shapes(pruned)
    assert shape["stem"] == (1, 4, 8, 8)
    assert shape["sum"] == (1, 3, 4, 8)


# ---- 3. slices of the channel axis ----------------------------------------------------


def sliced(steps=None) -> onnx.ModelProto:
    """conv(8) -> Slice channels [2:6] -> conv, added to a conv reading all 8 channels."""
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    args = [stem, g.ints("starts", [2]), g.ints("ends", [6]), g.ints("axes", [1])]
    if steps is not None:
        args.append(g.ints("steps", [steps]))
    mid = g.op("Slice", "mid", args)
    width = len(range(2, 6, steps or 1))
    total = g.op("Add", "sum", [g.conv("mid_conv", mid, width, 6), g.conv("full_conv", stem, 8, 6)])
    return g.model(g.conv("head", g.relu("sum_act", total), 6, 3))


def test_unit_step_slice_of_the_channels_keeps_whole_sub_spaces():
    imported, analysis = analyze(sliced())
    by_prod = spaces_by_producer(analysis)
    assert "stem" not in by_prod
    for name, size in (("stem[0:2]", 2), ("stem[2:6]", 4), ("stem[6:8]", 2)):
        assert (by_prod[name].size, by_prod[name].frozen) == (size, [])
    cut = [({"stem[0:2]"}, 0, 2, 0), ({"stem[2:6]"}, 2, 4, 0), ({"stem[6:8]"}, 6, 2, 0)]
    window = only_site(analysis, "mid", "slice")
    assert (window.axis, window.layout.size) == (1, 8)
    assert segments(analysis, window.layout) == cut
    assert segments(analysis, only_site(analysis, "full_conv", "consumer").layout) == cut
    read = only_site(analysis, "mid_conv", "consumer")
    assert read.layout.size == 4
    assert segments(analysis, read.layout) == [({"stem[2:6]"}, 0, 4, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    k = kept(plan)
    assert (k["stem[0:2]"], k["stem[2:6]"], k["stem[6:8]"]) == (1, 2, 1)
    shape = shapes(pruned)
    assert shape["stem"] == (1, 4, 8, 8)
    assert shape["mid"] == (1, 2, 8, 8)
    onnx_out = export_model(imported, pruned)
    node = onnx_node(onnx_out, "mid")
    begin = int(initializer(onnx_out, node.input[1])[0])
    end = int(initializer(onnx_out, node.input[2])[0])
    assert (begin, end) == (1, 3), "the window moves to where the kept middle channels are"


def test_strided_slice_of_the_channels_freezes_the_producer():
    imported, analysis = analyze(sliced(steps=2))
    assert "relax.strided_slice" in ops_by_node(imported.mod)["mid"]
    stem = spaces_by_producer(analysis)["stem"]
    assert stem.size == 8
    assert len(stem.frozen) == 1 and "strided slice" in stem.frozen[0]
    assert "binding 'mid'" in stem.frozen[0]
    assert sites(analysis, "mid", "slice") == []
    assert stem not in analysis.prunable()


# ---- 4. resize and FPN ----------------------------------------------------------------


def test_resize_passes_channels_and_an_fpn_add_couples_the_two_producers():
    g = Graph((1, 4, 8, 8))
    down = g.relu("down_act", g.conv("down", "x", 4, 8, k=3, strides=[2, 2]))
    scales = g.const("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    up = g.op("Resize", "up", [down, "", scales], mode="nearest")
    merged = g.op("Add", "merge", [up, g.conv("lateral", "x", 4, 8)])
    imported, analysis = analyze(g.model(g.conv("head", merged, 8, 3, k=3)))
    assert ops_by_node(imported.mod)["up"] == {"relax.image.resize2d"}

    fpn = spaces_by_producer(analysis)["down"]
    assert spaces_by_producer(analysis)["lateral"] is fpn
    assert producers_of(fpn) == {"down", "lateral"}
    assert (fpn.size, fpn.unit, fpn.frozen) == (8, 1, [])
    assert segments(analysis, only_site(analysis, "head", "consumer").layout) == [
        ({"down", "lateral"}, 0, 8, 0)
    ]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    (group,) = plan.groups
    assert group.name == group.producers[0]
    assert (sorted(group.producers), group.channels, group.kept_channels) == (
        ["down", "lateral"],
        8,
        4,
    )
    shape = shapes(pruned)
    assert shape["up"] == (1, 4, 8, 8)
    assert shape["merge"] == (1, 4, 8, 8)
    onnx_out = export_model(imported, pruned)
    assert initializer(onnx_out, "down_w").shape == (4, 4, 3, 3)
    assert initializer(onnx_out, "lateral_w").shape == (4, 4, 1, 1)
    assert initializer(onnx_out, "head_w").shape == (3, 4, 3, 3)


# ---- 5. ConvTranspose -----------------------------------------------------------------


def upsampler() -> onnx.ModelProto:
    """conv(8) -> relu -> ConvTranspose(8 -> 6, k=2, stride 2) -> relu -> conv."""
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    w = g.const("up_w", g.weight(8, 6, 2, 2))
    b = g.const("up_b", g.weight(6, scale=0.1))
    up = g.op("ConvTranspose", "up", [stem, w, b], kernel_shape=[2, 2], strides=[2, 2])
    return g.model(g.conv("head", g.relu("up_act", up), 6, 3))


def test_conv_transpose_reads_and_makes_prunable_channels():
    imported, analysis = analyze(upsampler())
    assert "relax.nn.conv2d_transpose" in ops_by_node(imported.mod)["up"]
    by_prod = spaces_by_producer(analysis)
    stem, up = by_prod["stem"], by_prod["up"]
    assert (stem.size, stem.frozen) == (8, [])
    assert (up.size, up.frozen) == (6, [])
    assert [p.op for p in up.producers] == ["conv2d_transpose"]
    assert {sp.id for sp in analysis.prunable()} >= {stem.id, up.id}

    read = only_site(analysis, "up", "consumer")
    assert (read.arg, read.axis, read.out_axis) == (1, 0, 1), "IOHW: inputs on axis 0"
    assert read.tap_scale == pytest.approx(1 / 4)
    assert segments(analysis, read.layout) == [({"stem"}, 0, 8, 0)]
    made = only_site(analysis, "up", "producer")
    assert (made.axis, made.layout.axis) == (1, 1)
    assert segments(analysis, made.layout) == [({"up"}, 0, 6, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert sorted(kept(plan).values()) == [3, 4]
    shape = shapes(pruned)
    assert shape["stem"] == (1, 4, 8, 8)
    assert shape["up"] == (1, 3, 16, 16)
    onnx_out = export_model(imported, pruned)
    assert initializer(onnx_out, "up_w").shape == (4, 3, 2, 2)
    assert initializer(onnx_out, "up_b").shape == (3,)
    assert initializer(onnx_out, "head_w").shape == (3, 3, 1, 1)


def test_conv_transpose_group_is_named_after_its_onnx_node():
    imported, _ = analyze(upsampler())
    plan, _ = prune_module(imported.mod, sparsity=0.5)
    assert sorted(kept(plan)) == ["stem", "up"]


# ---- 6. squeeze / unsqueeze -----------------------------------------------------------


def test_squeezing_spatial_unit_axes_moves_the_channels_to_the_gemm():
    g = Graph((1, 4, 8, 8))
    pooled = g.op("GlobalAveragePool", "gap", [g.relu("stem_act", g.conv("stem", "x", 4, 8))])
    flat = g.op("Squeeze", "squeeze", [pooled, g.ints("squeeze_axes", [2, 3])])
    imported, analysis = analyze(g.model(g.gemm("fc", flat, 8, 5)))
    assert ops_by_node(imported.mod)["squeeze"] == {"relax.squeeze"}

    stem = spaces_by_producer(analysis)["stem"]
    assert (stem.size, stem.frozen) == (8, [])
    read = only_site(analysis, "fc", "consumer")
    assert (read.axis, read.out_axis, read.layout.axis) == (0, 1, 1)
    assert segments(analysis, read.layout) == [({"stem"}, 0, 8, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem": 4}
    assert shapes(pruned)["squeeze"] == (1, 4)
    assert shapes(pruned)["fc"] == (1, 5)


def test_unsqueeze_puts_the_channels_back_on_axis_one_for_a_conv():
    g = Graph((1, 4, 8, 8))
    pooled = g.op("GlobalAveragePool", "gap", [g.relu("stem_act", g.conv("stem", "x", 4, 8))])
    flat = g.op("Squeeze", "squeeze", [pooled, g.ints("squeeze_axes", [2, 3])])
    back = g.op("Unsqueeze", "unsqueeze", [flat, g.ints("unsqueeze_axes", [2, 3])])
    imported, analysis = analyze(g.model(g.conv("head", back, 8, 3)))
    assert "relax.expand_dims" in ops_by_node(imported.mod)["unsqueeze"]

    assert spaces_by_producer(analysis)["stem"].frozen == []
    read = only_site(analysis, "head", "consumer")
    assert read.layout.axis == 1
    assert segments(analysis, read.layout) == [({"stem"}, 0, 8, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem": 4}
    assert shapes(pruned)["unsqueeze"] == (1, 4, 1, 1)


def test_squeezing_the_channel_axis_itself_freezes_the_producer():
    g = Graph((1, 4, 8, 8))
    plane = g.op("Squeeze", "squeeze", [g.conv("stem", "x", 4, 1), g.ints("squeeze_axes", [1])])
    out = g.op("MatMul", "proj", [plane, g.const("proj_w", g.weight(8, 4))])
    _, analysis = analyze(g.model(out))

    stem = spaces_by_producer(analysis)["stem"]
    assert stem.size == 1
    assert len(stem.frozen) == 1
    assert "binding 'squeeze'" in stem.frozen[0]
    assert "squeezes the channel axis" in stem.frozen[0]
    assert analysis.prunable() == []


# ---- 7. squeeze-and-excitation --------------------------------------------------------


def test_se_gate_couples_the_expand_conv_with_the_main_path_producer():
    g = Graph((1, 4, 8, 8))
    main = g.relu("main_act", g.conv("main", "x", 4, 8))
    pooled = g.op("GlobalAveragePool", "gap", [main])
    squeezed = g.relu("reduce_act", g.conv("reduce", pooled, 8, 2))
    gate = g.op("HardSigmoid", "gate", [g.conv("expand", squeezed, 2, 8)])
    scaled = g.op("Mul", "scale", [main, gate])
    imported, analysis = analyze(g.model(g.conv("head", scaled, 8, 3)))

    by_prod = spaces_by_producer(analysis)
    gated = by_prod["main"]
    assert by_prod["expand"] is gated
    assert producers_of(gated) == {"main", "expand"}
    assert (gated.size, gated.unit, gated.frozen) == (8, 1, [])
    assert gated.merge == "approximate", "a product of two channel tensors is not linear"
    assert (by_prod["reduce"].size, by_prod["reduce"].frozen) == (2, [])
    # the gate's squeeze conv and the head both read the coupled channels
    for node in ("reduce", "head"):
        read = only_site(analysis, node, "consumer")
        assert segments(analysis, read.layout) == [({"main", "expand"}, 0, 8, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    group = next(gp for gp in plan.groups if "main" in gp.producers)
    assert sorted(group.producers) == ["expand", "main"]
    assert group.kept_channels == 4
    shape = shapes(pruned)
    assert shape["gate"] == (1, 4, 1, 1)
    assert shape["scale"] == (1, 4, 8, 8)
    onnx_out = export_model(imported, pruned)
    assert initializer(onnx_out, "main_w").shape == (4, 4, 1, 1)
    assert initializer(onnx_out, "expand_w").shape == (4, 1, 1, 1)
    assert initializer(onnx_out, "reduce_w").shape == (1, 4, 1, 1)


# ---- 8. decomposed LayerNorm on a residual stream, with an FFN ------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["with_gamma_beta", "plain"])
def test_ffn_hidden_neurons_are_prunable_but_a_layer_normed_residual_stream_is_frozen(affine):
    g = Graph((1, 6, 16))
    stream = g.linear("embed", "x", 16, 16)
    mean = g.op("ReduceMean", "ln/mean", [stream], axes=[-1], keepdims=1)
    centered = g.op("Sub", "ln/sub", [stream, mean])
    square = g.op("Pow", "ln/pow", [centered, g.const("two", np.array(2.0, np.float32))])
    var = g.op("ReduceMean", "ln/var", [square], axes=[-1], keepdims=1)
    var = g.op("Add", "ln/eps", [var, g.const("eps", np.array(1e-5, np.float32))])
    normed = g.op("Div", "ln/div", [centered, g.op("Sqrt", "ln/sqrt", [var])])
    if affine:  # onnxruntime may fuse this form into one LayerNormalization node on import
        normed = g.op("Mul", "ln/gamma", [normed, g.const("gamma", 1 + g.weight(16))])
        normed = g.op("Add", "ln/beta", [normed, g.const("beta", g.weight(16))])
    hidden = g.linear("ffn_up", normed, 16, 32)
    erf = g.op(
        "Erf",
        "gelu/erf",
        [g.op("Div", "gelu/div", [hidden, g.const("sqrt2", np.sqrt(np.float32(2)))])],
    )
    gelu = g.op(
        "Mul", "gelu/mul", [hidden, g.op("Add", "gelu/add", [erf, g.const("one", np.float32(1))])]
    )
    gelu = g.op("Mul", "gelu/half", [gelu, g.const("half", np.float32(0.5))])
    stream = g.op("Add", "residual", [stream, g.linear("ffn_down", gelu, 32, 16)])
    imported, analysis = analyze(g.model(g.linear("head", stream, 16, 4)))

    by_prod = spaces_by_producer(analysis)
    ffn = by_prod["ffn_up"]
    assert (ffn.size, ffn.unit, ffn.frozen) == (32, 1, [])
    assert [label(p) for sp in analysis.prunable() for p in sp.producers] == ["ffn_up"]
    read = only_site(analysis, "ffn_down", "consumer")
    assert (read.axis, read.layout.axis) == (0, 2)
    assert segments(analysis, read.layout) == [({"ffn_up"}, 0, 32, 0)]

    residual = by_prod["embed"]
    assert by_prod["ffn_down"] is residual, "the residual add couples the stream's producers"
    assert residual.size == 16
    assert residual.frozen, "normalizing over the channels must freeze the stream"
    fused = any("relax.nn.layer_norm" in ops for ops in ops_by_node(imported.mod).values())
    assert affine or not fused, "without gamma and beta the LayerNorm stays decomposed"
    why = "normalizes across channels" if fused else "reduces over the channel axis"
    assert why in residual.frozen[0], residual.frozen
    assert residual.frozen[0].startswith("binding 'ln/"), residual.frozen

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"ffn_up": 16}
    assert {f.name: f.channels for f in plan.frozen} == {"embed": 16, "head": 4}
    shape = shapes(pruned)
    assert shape["ffn_up"] == (1, 6, 16)
    assert shape["residual"] == (1, 6, 16)


# ---- 9. Pad ---------------------------------------------------------------------------


def padded(pads: list[int]) -> onnx.ModelProto:
    """conv(8) -> Pad (pads computed by a constant Concat, folded on import) -> relu -> conv."""
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    half = len(pads) // 2
    begin, end = g.ints("pads_begin", pads[:half]), g.ints("pads_end", pads[half:])
    width = g.op("Concat", "pads", [begin, end], axis=0)
    pad = g.op("Pad", "pad", [stem, width, g.const("pad_value", np.float32(0))], mode="constant")
    channels = 8 + pads[1] + pads[half + 1]
    return g.model(g.conv("head", g.relu("pad_act", pad), channels, 3, k=3, pads=[0] * 4))


def test_constant_spatial_pad_passes_the_channels():
    imported, analysis = analyze(padded([0, 0, 1, 1, 0, 0, 1, 1]))
    prepared = [n.op_type for n in imported.prepared.model.graph.node]
    assert "Concat" not in prepared and "Pad" in prepared, "the pads are folded on import"
    assert ops_by_node(imported.mod)["pad"] == {"relax.nn.pad"}
    stem = spaces_by_producer(analysis)["stem"]
    assert (stem.size, stem.frozen) == (8, [])
    read = only_site(analysis, "head", "consumer")
    assert segments(analysis, read.layout) == [({"stem"}, 0, 8, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem": 4}
    assert shapes(pruned)["pad"] == (1, 4, 10, 10)
    assert shapes(pruned)["head"] == (1, 3, 8, 8)


def test_pad_on_the_channel_axis_freezes_the_producer():
    imported, analysis = analyze(padded([0, 1, 0, 0, 0, 1, 0, 0]))
    assert ops_by_node(imported.mod)["pad"] == {"relax.nn.pad"}
    stem = spaces_by_producer(analysis)["stem"]
    assert len(stem.frozen) == 1
    assert "binding 'pad'" in stem.frozen[0]
    assert "pads the channel axis" in stem.frozen[0]
    assert analysis.prunable() == []


# ---- 10. grouped conv -----------------------------------------------------------------


def test_grouped_conv_prunes_channels_evenly_per_group_on_both_sides():
    g = Graph((1, 4, 8, 8))
    stem = g.relu("stem_act", g.conv("stem", "x", 4, 8))
    grouped = g.relu("gconv_act", g.conv("gconv", stem, 8, 8, k=3, group=2))
    model = g.model(g.conv("head", grouped, 8, 3))
    imported, analysis = analyze(model)

    by_producer = spaces_by_producer(analysis)
    # the stem's two halves (what the two groups read) are one space of 4 features
    stem_space = by_producer["stem[0:4]"]
    assert by_producer["stem[4:8]"] is stem_space
    assert stem_space.size == 4 and not stem_space.frozen
    # the grouped conv's outputs: channel i of both groups is one feature
    gspace = by_producer["gconv[0:4]"]
    assert by_producer["gconv[4:8]"] is gspace and gspace.size == 4
    consumer = only_site(analysis, "gconv", "consumer")
    assert (consumer.axis, consumer.layout.size) == (1, 4)

    plan, pruned = prune_module(imported.mod, sparsity=0.5, model="tiny")
    assert {gp.name: gp.kept_channels for gp in plan.groups} == {"stem": 2, "gconv": 2}
    weight = next(
        b.value.args[1].value.numpy().shape
        for b in pruned["main"].body.blocks[0].bindings
        if node_of(b.var.name) == "gconv" and b.value.op.name == "relax.nn.conv2d"
    )
    assert weight == (4, 2, 3, 3)  # 2 groups x 2 outputs, 2 inputs per group
    exported = export_model(imported, pruned)
    conv = next(n for n in exported.graph.node if n.name == "gconv")
    assert next(a.i for a in conv.attribute if a.name == "group") == 2


# ---- 11. ops without a rule -----------------------------------------------------------


def _cumsum(g: Graph, x: str) -> str:
    return g.op("CumSum", "mixer", [x, g.const("cumsum_axis", np.array(1, dtype=np.int64))])


def _topk(g: Graph, x: str) -> str:
    return g.op("TopK", "mixer", [x, g.ints("k", [4])], ["mixer_values", "mixer_indices"], axis=1)


def _reduce_max(g: Graph, x: str) -> str:
    return g.op("ReduceMax", "mixer", [x], axes=[1], keepdims=1)


@pytest.mark.parametrize(
    "mix, op, width, has_rule, why",
    [
        (_cumsum, "relax.cumsum", 8, False, "op is not understood"),
        (_topk, "relax.topk", 4, False, "op is not understood"),
        (_reduce_max, "relax.max", 1, True, "reduces over the channel axis"),
    ],
    ids=["cumsum", "topk", "reduce_max"],
)
def test_an_op_that_mixes_the_channels_freezes_them_and_names_the_op(mix, op, width, has_rule, why):
    g = Graph((1, 4, 8, 8))
    mixed = mix(g, g.relu("stem_act", g.conv("stem", "x", 4, 8)))
    imported, analysis = analyze(g.model(g.conv("head", mixed, width, 3)))
    assert op in ops_by_node(imported.mod)["mixer"]
    assert (op in RULES) == has_rule

    stem = spaces_by_producer(analysis)["stem"]
    assert len(stem.frozen) == 1
    assert f"({op})" in stem.frozen[0]
    assert why in stem.frozen[0]
    # nothing is guessed past the op: the head reads no known channels
    assert sites(analysis, "head", "consumer") == []
    assert analysis.prunable() == []


# ---- 12. the registry -----------------------------------------------------------------


def test_registering_a_rule_twice_is_an_error_and_leaves_the_first_rule():
    before = RULES["relax.nn.conv2d"]
    with pytest.raises(ValueError, match="relax.nn.conv2d"):
        rule("relax.nn.conv2d")(lambda ctx, var, call, where: None)
    assert RULES["relax.nn.conv2d"] is before


def test_every_registered_rule_is_for_a_real_relax_op():
    assert RULES
    for name in RULES:
        assert name.startswith("relax."), name
        assert tvm.ir.Op.get(name).name == name


def test_a_failed_registration_leaves_the_registry_unchanged():
    name = "relax.qmfrg_test_only_op"
    try:
        with pytest.raises(ValueError):
            rule(name, "relax.nn.conv2d")(lambda ctx, var, call, where: None)
        assert name not in RULES
    finally:
        RULES.pop(name, None)


# ---- 13. model outputs ----------------------------------------------------------------


def test_channels_reaching_the_model_output_are_never_pruned():
    g = Graph((1, 4, 8, 8))
    pooled = g.op("GlobalAveragePool", "gap", [g.relu("stem_act", g.conv("stem", "x", 4, 8))])
    imported, analysis = analyze(g.model(g.gemm("fc", g.op("Flatten", "flat", [pooled]), 8, 5)))

    by_prod = spaces_by_producer(analysis)
    fc = by_prod["fc"]
    assert (fc.size, fc.frozen) == (5, [OUTPUT_REASON])
    assert by_prod["stem"].frozen == []
    flat = only_site(analysis, "flat", "shape")
    assert segments(analysis, flat.layout) == [({"stem"}, 0, 8, 0)]

    plan, pruned = prune_module(imported.mod, sparsity=0.5)
    assert kept(plan) == {"stem": 4}
    assert [(f.name, f.channels, f.reason) for f in plan.frozen] == [("fc", 5, OUTPUT_REASON)]
    assert shapes(pruned)["flat"] == (1, 4)
    assert shapes(pruned)["fc"] == (1, 5)
