"""`tvm-qmfrg prune` end to end, and the pruned ONNX against TVM in onnxruntime."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import load, random_input, run
from tvm_qmfrg.passes.onnx_export import export_onnx
from tvm_qmfrg.passes.prune import QMFRGPrune

from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.plan import PruningPlan


@pytest.mark.parametrize("family", ["resnet_cifar", "mobilenet_v2", "vgg", "mlp", "bert_encoder"])
def test_exported_pruned_onnx_matches_tvm(family):
    model = getattr(synthetic, family)(seed=4)
    pruned = QMFRGPrune(flops_reduction=0.4)(load(model))
    exported = export_onnx(
        pruned, model_name=family, output_names=[o.name for o in model.graph.output]
    )
    x = random_input(model)
    got = ort.InferenceSession(exported.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, run(pruned, x), atol=1e-4)
    assert len(exported.SerializeToString()) < len(model.SerializeToString())


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tvm_qmfrg.cli", *args], capture_output=True, text=True
    )


def test_cli_prune_writes_plan_and_model(tmp_path):
    model = synthetic.resnet_cifar(seed=5)
    path, plan_path, out = tmp_path / "m.onnx", tmp_path / "plan.json", tmp_path / "p.onnx"
    onnx.save(model, path)
    proc = cli(
        "prune",
        str(path),
        "--flops-reduction",
        "0.5",
        "--round-to",
        "4",
        "--plan",
        str(plan_path),
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "FLOPs" in proc.stdout and "fewer" in proc.stdout
    plan = PruningPlan.load(plan_path)
    assert abs(plan.flops_reduction - 0.5) <= 0.03
    assert all(g.kept_channels % 4 == 0 for g in plan.groups)
    assert json.loads(plan_path.read_text())["criterion"] == "qmfrg"
    x = random_input(model)
    dense = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    pruned = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert pruned.shape == dense.shape


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sparsity", "1.5"], "sparsity=1.5 is outside [0, 1)"),
        (["--sparsity", "0.2", "--criterion", "nope"], "unknown criterion 'nope'"),
    ],
)
def test_cli_prune_bad_options_fail_cleanly(tmp_path, args, match):
    path = tmp_path / "m.onnx"
    onnx.save(synthetic.mlp(seed=0), path)
    out = tmp_path / "p.onnx"
    proc = cli("prune", str(path), *args, "-o", str(out))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tvm-qmfrg prune: error: {match}")
    assert not out.exists()


def test_cli_prune_with_substitution_writes_report(tmp_path):
    model = synthetic.bert_encoder(seed=1)
    path, report, out = tmp_path / "b.onnx", tmp_path / "sub.json", tmp_path / "p.onnx"
    onnx.save(model, path)
    proc = cli(
        "prune",
        str(path),
        "--flops-reduction",
        "0.3",
        "--substitute",
        "lowrank,dedup",
        "--sub-epsilon",
        "0.5",
        "--report",
        str(report),
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["substitutions"] and data["flops_after"] < data["flops_before"]
    assert all(s["frobenius_bound"] <= np.sin(0.5) + 1e-9 for s in data["substitutions"])
    x = random_input(model)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (1, 8, 32)


def test_cli_compare_finds_the_same_operators(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(synthetic.resnet_cifar(seed=1), a)
    onnx.save(synthetic.bert_encoder(seed=1), b)
    same = cli("compare", str(a), str(a), "--top", "3", "--json", str(tmp_path / "p.json"))
    assert same.returncode == 0, same.stderr
    pairs = json.loads((tmp_path / "p.json").read_text())
    assert all(p["fs"] < 1e-6 and p["verdict"].startswith("equivalent") for p in pairs)
    cross = cli("compare", str(a), str(b), "--top", "5")
    assert cross.returncode == 0 and "equivalent" not in cross.stdout
