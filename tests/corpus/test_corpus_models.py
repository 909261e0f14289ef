"""The exporter-idiom corpus: every model is valid ONNX, runs, and really holds its idiom."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from .idioms import CORPUS, FAMILY, INPUT_SHAPES, IR_VERSION, OPSET, random_inputs

NAMES = sorted(CORPUS)


@functools.cache
def _model(name: str) -> onnx.ModelProto:
    return CORPUS[name]()


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(name: str, *, batch: int = 1, extra_outputs: tuple[str, ...] = ()) -> list[np.ndarray]:
    model = onnx.ModelProto()
    model.CopyFrom(_model(name))
    for out in extra_outputs:
        model.graph.output.append(helper.make_empty_tensor_value_info(out))
    return _session(model).run(None, random_inputs(name, batch=batch))


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value behind ``name`` if an initializer or a Constant node holds it."""
    inits = _initializers(model)
    if name in inits:
        return inits[name]
    node = _producers(model).get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _ancestor_ops(model: onnx.ModelProto, name: str) -> set[str]:
    """Op types of every node upstream of tensor ``name``."""
    producers, seen, ops, stack = _producers(model), set(), set(), [name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        ops.add(node.op_type)
        stack.extend(i for i in node.input if i)
    return ops


def _attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def _symbolic_batch(model: onnx.ModelProto) -> bool:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


# -- the registry -------------------------------------------------------------------------


def test_the_registry_lists_all_seven_idioms_with_a_family_and_input_shapes():
    assert set(CORPUS) == {
        "tf_same_padding_mobilenet",
        "paddle_constant_weights",
        "yolo_c2f_detector",
        "dbnet_fpn",
        "se_hardsigmoid_mobilenetv3",
        "attention_fused_qkv",
        "squeeze_unsqueeze_head",
    }
    assert set(FAMILY) == set(CORPUS) == set(INPUT_SHAPES)
    assert set(FAMILY.values()) == {"cnn", "detector", "transformer"}


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_declares_the_inputs_its_registry_entry_names(name):
    model = _model(name)
    assert [i.name for i in model.graph.input] == list(INPUT_SHAPES[name])
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        static = INPUT_SHAPES[name][graph_input.name]
        assert len(dims) == len(static)
        for dim, size in zip(dims, static):
            assert dim.dim_param == "batch" and size == 1 or dim.dim_value == size


# -- validity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_passes_the_onnx_checker(name):
    onnx.checker.check_model(_model(name), full_check=True)


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_targets_opset_17_and_ir_version_8(name):
    model = _model(name)
    assert model.ir_version == IR_VERSION == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


@pytest.mark.parametrize("name", NAMES)
def test_every_node_has_a_unique_exporter_style_name(name):
    names = [n.name for n in _model(name).graph.node]
    assert all(names) and len(set(names)) == len(names)
    prefix = "p2o." if name == "paddle_constant_weights" else "/"
    assert all(n.startswith(prefix) for n in names)


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_documents_the_exporter_idiom_it_reproduces(name):
    model = _model(name)
    assert len(CORPUS[name].__doc__.split()) > 20
    assert model.doc_string and model.producer_name


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_is_built_deterministically(name):
    assert CORPUS[name]().SerializeToString() == CORPUS[name]().SerializeToString()


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_stays_small(name):
    weights = sum(t.size for t in _initializers(_model(name)).values())
    weights += sum(
        numpy_helper.to_array(n.attribute[0].t).size
        for n in _model(name).graph.node
        if n.op_type == "Constant"
    )
    assert weights < 400_000


# -- execution ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_corpus_model_runs_in_onnxruntime_with_finite_outputs(name):
    outputs = _run(name)
    assert len(outputs) == len(_model(name).graph.output)
    for out in outputs:
        assert out.size > 0 and np.all(np.isfinite(out))
        assert np.std(out) > 0


@pytest.mark.parametrize("name", [n for n in NAMES if _symbolic_batch(CORPUS[n]())])
def test_models_with_a_symbolic_batch_give_each_sample_the_output_it_gets_alone(name):
    feeds = random_inputs(name, batch=3)
    sess = _session(_model(name))
    together = sess.run(None, feeds)
    for i in range(3):
        alone = sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})
        for t, a in zip(together, alone):
            np.testing.assert_allclose(t[i : i + 1], a, rtol=1e-4, atol=1e-5)


def test_at_least_the_detector_and_four_other_models_have_a_symbolic_batch():
    symbolic = {n for n in NAMES if _symbolic_batch(_model(n))}
    assert "yolo_c2f_detector" in symbolic and len(symbolic) >= 5


@pytest.mark.parametrize("name", [n for n in NAMES if "BatchNormalization" in _ops(CORPUS[n]())])
def test_batchnorm_layers_carry_realistic_running_statistics(name):
    model = _model(name)
    for node in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        gamma, beta, mean, var = (_constant_value(model, i) for i in node.input[1:])
        assert np.all(var > 0.1) and np.std(var) > 0
        assert np.any(mean != 0) and np.any(beta != 0)
        assert np.any(gamma < 0.05) and np.any(gamma > 0.5)  # slimmed channels + live ones


# -- 1. TF SAME padding -------------------------------------------------------------------


def test_the_tf_model_pads_with_tensors_computed_from_the_input_shape():
    model = _model("tf_same_padding_mobilenet")
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2
    for pad in pads:
        assert _constant_value(model, pad.input[1]) is None
        assert _producers(model)[pad.input[1]].op_type == "Cast"
        upstream = _ancestor_ops(model, pad.input[1])
        assert {"Shape", "Gather", "Sub", "Div", "Max", "Concat", "Cast"} <= upstream
        conv = next(n for n in model.graph.node if pad.output[0] in n.input)
        assert conv.op_type == "Conv" and _attr(conv, "strides") == [2, 2]
        assert _attr(conv, "pads") == [0, 0, 0, 0]
    # the block's Pad goes through torch's _prepare_onnx_paddings chain
    assert {"ConstantOfShape", "Reshape", "Slice", "Transpose"} <= _ancestor_ops(
        model, pads[1].input[1]
    )


def test_the_tf_model_computes_the_asymmetric_same_pads_tensorflow_uses():
    model = _model("tf_same_padding_mobilenet")
    pads = [n.input[1] for n in model.graph.node if n.op_type == "Pad"]
    values = _run("tf_same_padding_mobilenet", extra_outputs=tuple(pads))[1:]
    for value in values:  # 32 -> 16 and 16 -> 8 with k3 s2: pad 1, all of it after
        assert value.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_the_tf_model_writes_relu6_as_clip_and_has_depthwise_convs_and_residuals():
    model = _model("tf_same_padding_mobilenet")
    ops = _ops(model)
    for clip in (n for n in model.graph.node if n.op_type == "Clip"):
        assert _constant_value(model, clip.input[1]) == 0.0
        assert _constant_value(model, clip.input[2]) == 6.0
    depthwise = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and _attr(n, "group", 1) > 1
        and _initializers(model)[n.input[1]].shape[1] == 1
    ]
    assert len(depthwise) == 3
    assert ops["Add"] >= 2 and ops["GlobalAveragePool"] == 1 and ops["Flatten"] == 1
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert _attr(gemm, "transB") == 1 and gemm.output[0] == "output"


# -- 2. Paddle ----------------------------------------------------------------------------


def test_the_paddle_model_has_no_initializers_and_keeps_every_weight_in_a_constant_node():
    model = _model("paddle_constant_weights")
    assert len(model.graph.initializer) == 0
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type in ("Conv", "BatchNormalization", "MatMul"):
            for weight in node.input[1:]:
                assert producers[weight].op_type == "Constant"
                assert producers[weight].attribute[0].t.data_type == onnx.TensorProto.FLOAT


def test_the_paddle_model_flattens_through_a_runtime_shape_computation():
    model = _model("paddle_constant_weights")
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert _constant_value(model, reshape.input[1]) is None
    assert {"Shape", "Cast", "Slice", "Concat"} <= _ancestor_ops(model, reshape.input[1])
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert {_attr(c, "to") for c in casts} == {onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def test_the_paddle_model_has_se_hard_swish_and_a_matmul_add_classifier():
    model = _model("paddle_constant_weights")
    ops = _ops(model)
    assert ops["HardSwish"] == 1 and ops["HardSigmoid"] == 2 and ops["Mul"] == 2
    assert ops["MatMul"] == 1 and ops["Gemm"] == 0
    producers = _producers(model)
    se_gate = next(
        n
        for n in model.graph.node
        if n.op_type == "Mul"
        and producers[n.input[1]].op_type == "HardSigmoid"
        and not n.input[1].endswith(".hs")
    )
    assert "GlobalAveragePool" in _ancestor_ops(model, se_gate.input[1])
    hard_swish = next(
        n for n in model.graph.node if n.op_type == "Mul" and n.input[1].endswith(".hs")
    )
    assert producers[hard_swish.input[1]].input[0] == hard_swish.input[0]
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert producers[add.input[0]].op_type == "MatMul"


# -- 3. YOLO ------------------------------------------------------------------------------


def test_the_yolo_model_has_fused_convs_with_silu_c2f_sppf_and_a_resize_pan_neck():
    model = _model("yolo_c2f_detector")
    ops = _ops(model)
    assert ops["BatchNormalization"] == 0
    convs = [n for n in model.graph.node if n.op_type == "Conv" and "/dfl/" not in n.name]
    assert all(len(n.input) == 3 for n in convs)  # BN folded into a conv bias
    consumers = {i: n for n in model.graph.node for i in n.input}
    silu = 0
    for sig in (n for n in model.graph.node if n.op_type == "Sigmoid"):
        mul = consumers.get(sig.output[0])
        if mul is not None and mul.op_type == "Mul":
            assert sig.input[0] in mul.input
            silu += 1
    assert silu == ops["Sigmoid"] - 1  # every Sigmoid but the class scores' is a SiLU
    c2f = [
        n.name
        for n in model.graph.node
        if n.op_type == "Split" and n.name.count("/") == 2 and "/model.14/" not in n.name
    ]
    assert c2f == [f"/model.{i}/Split" for i in (2, 4, 6, 10, 13)]
    assert ops["MaxPool"] == 3 and ops["Resize"] == 1 and ops["Range"] == 4


def test_the_yolo_model_builds_its_anchor_grid_from_the_feature_map_shapes():
    model = _model("yolo_c2f_detector")
    for rng in (n for n in model.graph.node if n.op_type == "Range"):
        assert {"Shape", "Gather", "Cast"} <= _ancestor_ops(model, rng.input[1])
    assert {"Expand", "ConstantOfShape", "Unsqueeze"} <= set(_ops(model))
    dfl = next(n for n in model.graph.node if n.name == "/model.14/dfl/conv/Conv")
    np.testing.assert_array_equal(
        _constant_value(model, dfl.input[1]).ravel(), np.arange(16, dtype=np.float32)
    )
    assert model.graph.input[0].name == "images" and _symbolic_batch(model)


def test_the_yolo_model_decodes_boxes_on_the_stride_8_and_16_grids():
    (out,) = _run("yolo_c2f_detector", batch=2)
    assert out.shape == (2, 8, 8 * 8 + 4 * 4)
    scores = out[:, 4:]
    assert np.all((scores > 0) & (scores < 1))
    width = out[:, 2]  # DFL distances are in [0, 15], times the level stride
    assert np.all(width >= 0) and np.all(width[:, :64] <= 30 * 8) and np.all(width <= 30 * 16)


# -- 4. DBNet -----------------------------------------------------------------------------


def test_the_dbnet_model_upsamples_with_resize_scales_and_sizes_and_adds_levels():
    model = _model("dbnet_fpn")
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    with_sizes = [n for n in resizes if len(n.input) == 4 and n.input[3]]
    assert len(resizes) == 6 and len(with_sizes) == 1
    assert _constant_value(model, with_sizes[0].input[3]) is None
    assert {"Shape", "Slice", "Concat"} <= _ancestor_ops(model, with_sizes[0].input[3])
    assert _ops(model)["Add"] == 3 and _ops(model)["Concat"] >= 2


def test_the_dbnet_head_decodes_with_two_stride_2_conv_transposes_and_a_sigmoid():
    model = _model("dbnet_fpn")
    deconvs = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert len(deconvs) == 2 and all(_attr(n, "strides") == [2, 2] for n in deconvs)
    producers = _producers(model)
    assert producers["maps"].op_type == "Sigmoid"
    assert producers[producers["maps"].input[0]].op_type == "ConvTranspose"
    (maps,) = _run("dbnet_fpn")
    assert maps.shape == (1, 1, 64, 64) and np.all((maps > 0) & (maps < 1))


# -- 5. MobileNetV3 -----------------------------------------------------------------------


def test_the_mobilenetv3_model_has_hardsigmoid_se_blocks_and_a_grouped_conv():
    model = _model("se_hardsigmoid_mobilenetv3")
    ops = _ops(model)
    assert ops["HardSwish"] >= 6 and ops["HardSigmoid"] == 2 and ops["Add"] == 2
    assert ops["GlobalAveragePool"] == 3
    inits = _initializers(model)
    groups = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        cout, cin_per_group = inits[conv.input[1]].shape[:2]
        groups.append((_attr(conv, "group", 1), cin_per_group))
    assert (4, 6) in groups  # 24 channels in 4 groups
    assert sum(1 for g, c in groups if c == 1 and g > 1) == 2  # the depthwise convs
    producers = _producers(model)
    for mul in (n for n in model.graph.node if n.op_type == "Mul"):
        assert producers[mul.input[0]].op_type == "HardSigmoid"


# -- 6. attention -------------------------------------------------------------------------


def test_the_attention_model_decomposes_layer_norm_and_splits_a_fused_qkv_projection():
    model = _model("attention_fused_qkv")
    ops = _ops(model)
    assert ops["ReduceMean"] == 7 and ops["Pow"] == 3 and ops["Sqrt"] == 3
    assert ops["Erf"] == 1 and ops["Softmax"] == 1 and ops["Gemm"] == 1
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert len(split.output) == 3
    qkv_add = _producers(model)[split.input[0]]
    qkv_mm = _producers(model)[qkv_add.input[1]]
    assert qkv_mm.op_type == "MatMul" and _initializers(model)[qkv_mm.input[1]].shape == (64, 192)
    for reshape in (n for n in model.graph.node if n.op_type == "Reshape"):
        assert _constant_value(model, reshape.input[1]) is not None
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 64


def test_the_attention_model_layer_norm_matches_its_definition():
    model = _model("attention_fused_qkv")
    (norm,) = [n.output[0] for n in model.graph.node if n.name == "/blocks/blocks.0/norm1/Add_1"]
    x = random_inputs("attention_fused_qkv")["input"]
    got = _run("attention_fused_qkv", extra_outputs=(norm,))[1]
    inits = _initializers(model)
    gamma, beta = inits["blocks.0.norm1.weight"], inits["blocks.0.norm1.bias"]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-6) * gamma + beta, atol=1e-5)


# -- 7. squeeze / unsqueeze / ConvTranspose consumer ---------------------------------------


def test_the_squeeze_model_squeezes_before_its_gemms_and_unsqueezes_its_se_gate():
    model = _model("squeeze_unsqueeze_head")
    producers = _producers(model)
    squeezes = [n for n in model.graph.node if n.op_type == "Squeeze"]
    assert len(squeezes) == 2
    for sq in squeezes:
        assert _constant_value(model, sq.input[1]).tolist() == [2, 3]
        assert producers[sq.input[0]].op_type == "GlobalAveragePool"
        assert any(n.op_type == "Gemm" and sq.output[0] in n.input for n in model.graph.node)
    (unsq,) = [n for n in model.graph.node if n.op_type == "Unsqueeze"]
    assert any(n.op_type == "Mul" and unsq.output[0] in n.input for n in model.graph.node)
    assert producers["logits"].op_type == "Gemm"


def test_the_squeeze_model_feeds_conv_channels_into_a_conv_transpose_output():
    model = _model("squeeze_unsqueeze_head")
    producers = _producers(model)
    deconv = producers["recon"]
    assert deconv.op_type == "ConvTranspose"
    relu = producers[deconv.input[0]]
    assert relu.op_type == "Relu" and producers[relu.input[0]].op_type == "Conv"
    logits, recon = _run("squeeze_unsqueeze_head", batch=2)
    assert logits.shape == (2, 10) and recon.shape == (2, 3, 32, 32)
