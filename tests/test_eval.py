"""The shipped digits model through TVM, and `tvm-qmfrg eval` on a tiny grid."""

import json
import subprocess
import sys

import onnx
from helpers import compiled
from tvm_qmfrg.passes.normalize import import_onnx

from tvm_qmfrg.datasets import load_digits_splits
from tvm_qmfrg.onnx_model import default_model_path


def test_shipped_model_reaches_its_recorded_accuracy_through_tvm():
    with open(default_model_path().replace(".onnx", ".json")) as f:
        record = json.load(f)
    data = load_digits_splits(record["split_seed"])
    n = len(data.x_test)
    run = compiled(import_onnx(onnx.load(default_model_path()), {"input": [n, 1, 8, 8]}))
    accuracy = float((run(data.x_test).argmax(axis=1) == data.y_test).mean())
    assert abs(accuracy - record["test_accuracy"]) < 1e-9


def test_eval_on_a_tiny_grid_writes_its_report(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tvm_qmfrg.cli",
            "eval",
            "--reductions",
            "0.3",
            "--criteria",
            "magnitude,qmfrg+cal",
            "--seeds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [c["criterion"] for c in cells] == ["dense", "magnitude", "qmfrg+cal"]
    assert cells[0]["test_accuracy"] > 0.99
    assert all(abs(c["flops_reduction"] - 0.3) <= 0.03 for c in cells[1:])
    assert "accuracy vs FLOPs" in (out / "report.md").read_text()
