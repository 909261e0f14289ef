"""Bad input and faults: one line naming the model, node and reason, exit 1, nothing written."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.onnx_io import import_model
from tvm_qmfrg.passes.prune import QMFRGPrune, apply_plan, prune_module
from tvm_qmfrg.passes.substitute import SpectralSubstitution

from tvm_qmfrg.errors import ModelError, OptionError, WeightError
from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.options import PruneOptions
from tvm_qmfrg.plan import PruningPlan
from tvm_qmfrg.report import write_atomic


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tvm_qmfrg.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    errors = [x for x in lines if ": error: " in x]
    assert len(errors) == 1, lines
    return errors[0]


def _conv_gemm(conv_w: np.ndarray, gemm_w: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="/stem/Relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="/pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/flatten"),
        helper.make_node("Gemm", ["f", "gw"], ["y"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "faulty",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(conv_w, "cw"), numpy_helper.from_array(gemm_w, "gw")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        rng.standard_normal((4, 8)).astype(np.float32),
    )


@pytest.mark.parametrize("where", ["conv", "gemm"])
def test_nan_weights_are_one_line_naming_tensor_and_node_and_nothing_is_written(tmp_path, where):
    cw, gw = _weights()
    (cw if where == "conv" else gw)[0, 0] = np.nan
    path = tmp_path / "m.onnx"
    onnx.save(_conv_gemm(cw, gw), path)
    proc = _cli("prune", str(path), "--sparsity", "0.5", "-o", str(tmp_path / "out.onnx"))
    line = _one_line_error(proc)
    node = "/stem/Conv" if where == "conv" else "/fc/Gemm"
    assert "NaN/Inf" in line and node in line and ("'cw'" in line or "'gw'" in line)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_an_all_zero_layer_is_refused_with_a_clear_reason():
    cw, gw = _weights()
    with pytest.raises(WeightError, match=r"weight 'cw' of node '/stem/Conv' \(Conv\) is all zero"):
        import_model(_conv_gemm(np.zeros_like(cw), gw))


@pytest.mark.parametrize(
    "output, reason",
    [("dir", "is a directory"), ("under_file", "is a file, not a directory")],
)
def test_an_unwritable_output_fails_before_any_work(tmp_path, output, reason):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_gemm(*_weights()), path)
    (tmp_path / "a_file").write_text("x")
    target = {"dir": tmp_path, "under_file": tmp_path / "a_file" / "out.onnx"}[output]
    proc = _cli("prune", str(path), "--sparsity", "0.5", "-o", str(target))
    assert reason in _one_line_error(proc)
    assert "importing" not in proc.stdout  # checked before the model is read


def test_a_bad_input_shape_name_is_one_line():
    with pytest.raises(OptionError, match="model's inputs are x"):
        import_model(_conv_gemm(*_weights()), {"images": [1, 3, 8, 8]})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"flops_reduction": "0.5"}, "flops_reduction must be a number"),
        ({"sparsity": 0.5, "protect": "conv*"}, "protect must be a list of patterns"),
        ({"sparsity": 0.5, "round_to": 0}, "round_to=0 must be >= 1"),
        ({"sparsity": 0.5, "flops_reduction": 0.3}, "exactly one of"),
        ({"sparsity": 0.5, "allocation": "greedy"}, "allocation='greedy'"),
        ({"epsilon": 0.01, "criterion": "magnitude"}, "needs a merging criterion"),
        ({"sparsity": 0.5, "criterion": "nope"}, "nope"),
    ],
)
def test_bad_pruning_options_are_option_errors_naming_the_option(options, message):
    with pytest.raises(OptionError, match=message):
        PruneOptions(**options)
    with pytest.raises(OptionError, match=message):
        QMFRGPrune(**options)


def test_unknown_keyword_options_are_refused():
    with pytest.raises(OptionError, match="unknown pruning option"):
        prune_module(None, sparsity=0.5, flops=0.3)


def test_one_pass_instance_decides_anew_for_every_module():
    prune = QMFRGPrune(sparsity=0.5)
    first = import_model(synthetic.vgg(seed=1)).mod
    second = import_model(synthetic.mlp(seed=2)).mod
    prune(first)
    names_first = {g.name for g in prune.last_plan.groups}
    prune(second)
    names_second = {g.name for g in prune.last_plan.groups}
    assert names_first and names_second and not names_first & names_second


def test_temp_files_are_named_after_their_target_and_stale_ones_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    stale = tmp_path / f".out.onnx.tmp-{dead}-abc"
    stale.write_bytes(b"partial")
    other = tmp_path / ".other.onnx.tmp-1-abc"  # another target's temp file is not touched
    other.write_bytes(b"x")
    write_atomic(tmp_path / "out.onnx", b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([".other.onnx.tmp-1-abc", "out.onnx"])


def _saved_plan(tmp_path):
    plan, _ = prune_module(import_model(synthetic.vgg(seed=1)).mod, sparsity=0.5)
    path = tmp_path / "plan.json"
    plan.save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["groups"][0].update(kept=[999]), "'kept' index 999 is outside"),
        (lambda d: d["groups"][0].update(kept=[-1]), "'kept' index -1 is outside"),
        (lambda d: d["groups"][0].update(kept=[0, 0]), "'kept' repeats a unit"),
        (lambda d: d["groups"][0].update(kept=[]), "'kept' is empty"),
        (lambda d: d["groups"][0].update(merges=[[1, 0, float("nan")]], kept=[0]), "scale"),
        (lambda d: d["groups"][0].update(merges=[[1, 2, 0.5]], kept=[0]), "not kept"),
        (lambda d: d["groups"][0].pop("kept"), "malformed pruning plan"),
    ],
    ids=[
        "index-999",
        "negative",
        "duplicate",
        "empty",
        "nan-scale",
        "merge-into-pruned",
        "no-kept",
    ],
)
def test_a_broken_plan_file_is_a_model_error_naming_the_group_and_field(tmp_path, mutate, message):
    path, data = _saved_plan(tmp_path)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message) as info:
        PruningPlan.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"\xff\xfe not utf-8", b"{not json"])
def test_a_plan_file_that_is_not_a_plan_object_is_one_model_error(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=str(path)):
        PruningPlan.load(path)


def test_a_plan_saved_from_the_cli_replays_on_the_imported_model(tmp_path):
    model = synthetic.resnet_cifar(seed=5)
    onnx.save(model, tmp_path / "m.onnx")
    proc = _cli(
        "prune", str(tmp_path / "m.onnx"), "--sparsity", "0.5", "--plan", "plan.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    mod = import_model(model).mod
    replayed = apply_plan(mod, PruningPlan.load(tmp_path / "plan.json"))
    plan, pruned = prune_module(mod, sparsity=0.5)
    assert module_cost(replayed).weights == module_cost(pruned).weights


@pytest.mark.parametrize("make", [lambda: QMFRGPrune(sparsity=0.5), SpectralSubstitution])
def test_a_pass_given_something_other_than_a_module_says_what_it_expected(make):
    with pytest.raises(OptionError, match="expected a tvm.IRModule"):
        make()("model.onnx")


def test_a_flops_target_missed_by_rounding_is_a_warning_saying_why(caplog):
    mod = import_model(synthetic.vgg(seed=1)).mod
    with caplog.at_level(logging.WARNING):
        plan, _ = prune_module(mod, flops_reduction=0.3, round_to=16, model="vgg")
    assert abs(plan.flops_reduction - 0.3) > 0.02
    assert "not the requested 30%" in caplog.text and "multiples of 16" in caplog.text


def test_a_model_without_parameters_reports_no_parameter_change():
    plan = PruningPlan("m", "qmfrg", {}, [], [], flops_before=0, params_before=0)
    assert "params 0 -> 0 (n/a)" in plan.table()


def test_an_error_message_is_cut_to_its_first_or_last_nonempty_line():
    from tvm_qmfrg.errors import one_line

    text = "\n  Traceback (most recent call last):\n  frame\n\n  ValueError: the reason \n"
    exc = RuntimeError(text)
    assert one_line(exc) == "Traceback (most recent call last):"
    assert one_line(exc, last=True) == "ValueError: the reason"
    assert one_line(exc, last=True, limit=10) == "ValueError"
    assert one_line(KeyError()) == "KeyError"
