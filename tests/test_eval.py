"""The shipped digits model through TVM, `tvm-qmfrg eval` on a tiny grid, and `demo`."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from helpers import compiled
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tvm_qmfrg.passes.importer import import_onnx

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.apps.fidelity import fidelity
from tvm_qmfrg.onnxio.reader import default_model_path


def test_shipped_model_reaches_its_recorded_accuracy_through_tvm():
    with open(default_model_path().replace(".onnx", ".json")) as f:
        record = json.load(f)
    data = load_digits_splits(record["split_seed"])
    n = len(data.x_test)
    run = compiled(import_onnx(onnx.load(default_model_path()), {"input": [n, 1, 8, 8]}))
    accuracy = float((run(data.x_test).argmax(axis=1) == data.y_test).mean())
    assert abs(accuracy - record["test_accuracy"]) < 1e-9


def _eval(out, *args: str) -> subprocess.CompletedProcess:
    """``tvm-qmfrg eval ARGS --out OUT`` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "tvm_qmfrg.cli", "eval", *args, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_eval_on_a_tiny_grid_writes_its_report(tmp_path):
    out = tmp_path / "eval"
    proc = _eval(
        out,
        *("--reductions", "0.3", "--criteria", "magnitude,qmfrg", "--seeds", "1"),
        *("--models", "digits,minilm", "--ffn-sparsity", "", "--ablations", ""),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    digits, minilm = results["digits"], results["minilm"]
    assert [c["criterion"] for c in digits] == ["dense", "magnitude", "qmfrg"]
    assert digits[0]["test_accuracy"] > 0.99
    assert all(abs(c["flops_reduction"] - 0.3) <= 0.03 for c in digits[1:])
    assert all(c["allocation"] in ("uniform", "global") for c in digits[1:])
    assert [c["criterion"] for c in minilm] == ["dense", "magnitude", "qmfrg"]
    assert minilm[0]["mean_cosine"] > 0.9999 and minilm[0]["nn_agreement"] == 1.0
    assert all(0 < c["mean_cosine"] < 1 and c["params"] < minilm[0]["params"] for c in minilm[1:])
    report = (out / "report.md").read_text()
    assert "Digits ResNet" in report and "all-MiniLM-L6-v2" in report
    for png in ("quality_vs_flops.png", "spectra_most_least_redundant.png", "qmfrg_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png in report


def test_eval_runs_calibrated_pruning_and_its_ablation_rows_on_digits(tmp_path):
    out = tmp_path / "eval"
    proc = _eval(
        out,
        *("--reductions", "0.5", "--criteria", "qmfrg,qmfrg+cal", "--models", "digits"),
        *("--ablations", "sens", "--ablation-reductions", "0.5"),
    )
    assert proc.returncode == 0, proc.stderr
    cells = {c["criterion"]: c for c in json.loads((out / "results.json").read_text())["digits"]}
    assert set(cells) == {"dense", "qmfrg", "qmfrg+cal", "qmfrg+cal-sens"}
    assert cells["qmfrg+cal"]["allocation"] == "sensitivity"
    assert cells["qmfrg+cal-sens"]["allocation"] == "uniform"
    assert cells["qmfrg"]["allocation"] == "uniform"
    assert cells["qmfrg+cal"]["test_accuracy"] > cells["qmfrg"]["test_accuracy"]
    assert "qmfrg+cal-sens" in (out / "report.md").read_text()


def test_eval_rejects_an_unknown_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_qmfrg.cli", "eval", "--models", "imagenet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "--models imagenet: choose from digits, minilm" in proc.stderr
    assert not any(tmp_path.iterdir())


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float64, (6, 6), elements=st.floats(-1, 1, allow_nan=False)),
    st.sampled_from([0.125, 0.5, 2.0, 16.0]),  # exact in floating point: ties stay ties
)
def test_fidelity_of_an_embedding_with_itself_is_perfect(emb, scale):
    emb = emb + 3 * np.eye(6)  # rows non-zero
    cosine, agreement = fidelity(scale * emb, emb)
    assert abs(cosine - 1.0) < 1e-9
    assert agreement == 1.0


def test_demo_runs_end_to_end_and_writes_its_folder(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_qmfrg.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/6" in proc.stdout and "[6/6" in proc.stdout  # progress
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["dense", "qmfrg", "qmfrg+cal", "magnitude"]
    assert rows["dense"]["test_accuracy"] > 0.99
    for label in ("qmfrg", "qmfrg+cal", "magnitude"):
        assert abs(rows[label]["flops_reduction"] - 0.3) <= 0.03
        assert rows[label]["params"] < rows["dense"]["params"]
        assert rows[label]["latency_ms"] > 0
    for name in ("report.md", "plan_qmfrg.json", "plan_qmfrg+cal.json", "plan_magnitude.json"):
        assert (out / name).stat().st_size > 0
    pruned = onnx.load(str(out / "pruned_qmfrg_cal.onnx"))
    onnx.checker.check_model(pruned)
    data = load_digits_splits(0)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[None]})[0] for x in data.x_test[:60]])
    expected = rows["qmfrg+cal"]["test_accuracy"]
    assert abs((logits.argmax(axis=1) == data.y_test[:60]).mean() - expected) < 0.1
