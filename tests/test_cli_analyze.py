"""`tvm-qmfrg analyze` and the ONNX reader: real models, bad files, clean failures."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tvm_qmfrg import ModelError, WeightError
from tvm_qmfrg.analysis import analyze_operators
from tvm_qmfrg.cli import main
from tvm_qmfrg.onnxio.reader import linear_operators, load_onnx
from tvm_qmfrg.onnxio.synthetic import mlp, small_cnn


@pytest.fixture
def cnn_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(seed=1), path)
    return path


def test_reader_folds_batchnorm_and_orients_dense_weights():
    model = small_cnn(seed=0)
    ops = linear_operators(model)
    assert [op.kind for op in ops] == ["conv", "conv", "dense"]
    assert ops[0].folded and ops[0].weight.shape == (8, 3, 3, 3)
    assert ops[2].weight.shape == (10, 16)  # Gemm transB=1: (out, in)
    m = mlp(seed=0)
    dense = linear_operators(m)
    assert [op.weight.shape for op in dense] == [(64, 32), (48, 64), (10, 48)]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    w0 = next(v for k, v in inits.items() if k.startswith("fc_w"))
    np.testing.assert_allclose(dense[0].weight, w0.T.astype(np.float64))
    assert np.any(dense[0].bias)  # the Add bias is folded in


def test_analysis_counts_planted_duplicate_channels():
    model = small_cnn(seed=0)
    w = next(t for t in model.graph.initializer if t.name.startswith("conv_w"))
    arr = numpy_helper.to_array(w).copy()
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    consts = {t.name: t for t in model.graph.initializer}
    gamma = numpy_helper.to_array(consts[bn_nodes[0].input[1]]).copy()
    beta, mean = (numpy_helper.to_array(consts[bn_nodes[0].input[i]]) for i in (2, 3))
    var = numpy_helper.to_array(consts[bn_nodes[0].input[4]])
    # channel 1 := channel 0 exactly, including the folded BatchNorm
    arr[1] = arr[0]
    for name, src in zip(bn_nodes[0].input[1:5], (gamma, beta, mean, var)):
        v = src.copy()
        v[1] = v[0]
        consts[name].CopyFrom(numpy_helper.from_array(v, name))
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    report = analyze_operators(linear_operators(model), "planted", epsilon=1e-6)
    assert report.operators[0].close_pairs == 1
    assert report.operators[0].channel_pairs == 8 * 7 // 2


def test_cli_analyze_writes_json(cnn_path, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["analyze", str(cnn_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nearest (FS)" in text and "conv" in text
    data = json.loads(out.read_text())
    assert len(data["operators"]) == 3
    op = data["operators"][0]
    assert 1.0 <= op["effective_rank"] <= op["spectrum_length"]
    assert op["nearest_fs"] in {o["name"] for o in data["operators"]}


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.onnx", "no such file"),
        (lambda p: write_bytes(p / "text.onnx", b"this is not a protobuf at all \xff\xfe"), "not"),
        (lambda p: write_bytes(p / "empty.onnx", b""), "not an ONNX model"),
    ],
)
def test_unreadable_files_are_model_errors(tmp_path, make, match):
    with pytest.raises(ModelError, match=match):
        load_onnx(make(tmp_path))


def test_truncated_file_is_a_model_error(cnn_path, tmp_path):
    data = cnn_path.read_bytes()
    bad = write_bytes(tmp_path / "truncated.onnx", data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        load_onnx(bad)


def test_nan_weight_names_model_and_node(tmp_path):
    model = small_cnn(seed=0)
    t = model.graph.initializer[0]
    arr = numpy_helper.to_array(t).copy()
    arr.flat[3] = np.nan
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    with pytest.raises(WeightError, match=r"small_cnn: node 'conv_2' weight holds 1 NaN/Inf"):
        linear_operators(model)


@pytest.mark.parametrize("payload", [b"garbage", None])
def test_cli_fails_cleanly_without_partial_output(tmp_path, payload):
    model = tmp_path / "bad.onnx"
    if payload is None:  # a valid file with an all-zero weight
        m = small_cnn(seed=0)
        t = m.graph.initializer[0]
        t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        onnx.save(m, model)
    else:
        model.write_bytes(payload)
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_qmfrg.cli", "analyze", str(model), "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-qmfrg analyze: error: ")
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [model]
