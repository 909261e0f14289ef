"""Exporters' models in, pruned ONNX out: the exporter-idiom corpus and real pretrained models.

For every model: it imports (shape chains folded, inputs static), ``sparsity=0`` changes
nothing (TVM and the exported ONNX in onnxruntime match the original model in onnxruntime),
and 20% / 30% FLOPs cuts export a model that runs in onnxruntime, matches TVM (checked by
``export_model``) and reaches the target within one point. For the corpus models, a
calibrated 30% cut does the same and follows the dense model more closely than the data-free
cut on inputs the pass did not see.
"""

from __future__ import annotations

import onnx
import pytest
from tvm_qmfrg.passes.onnx_io import export_model, host_runner, import_model, sample_inputs
from tvm_qmfrg.passes.prune import prune_module

from tests.corpus.idioms import CORPUS, INPUT_SHAPES
from tests.corpus.pretrained import PRETRAINED
from tests.corpus.scoring import held_out_error, outputs, synthetic_inputs
from tvm_qmfrg.onnxio.runtime import output_error, run_onnx

CASES = [pytest.param(("corpus", k), id=k) for k in CORPUS] + [
    pytest.param(("pretrained", k), id=k) for k in PRETRAINED
]


def _load(case) -> tuple[onnx.ModelProto, dict]:
    kind, key = case
    if kind == "corpus":
        return CORPUS[key](), {k: list(v) for k, v in INPUT_SHAPES[key].items()}
    spec = PRETRAINED[key]
    path = spec.path()
    if path is None:
        pytest.fail(f"{spec.package}=={spec.version} is not installed (make installs it)")
    return onnx.load(path), spec.input_shapes


@pytest.fixture(scope="module", params=CASES)
def imported(request):
    model, shapes = _load(request.param)
    return request.param[1], model, import_model(model, shapes, name=request.param[1])


def test_sparsity_zero_changes_nothing_in_tvm_or_in_the_exported_onnx(imported):
    name, original, imp = imported
    inputs = sample_inputs(imp, seed=1)
    want = run_onnx(original, inputs)
    plan, pruned = prune_module(imp.mod, sparsity=0.0, model=name)
    assert plan.flops_after == plan.flops_before
    got_tvm = host_runner(pruned, list(imp.input_shapes))(inputs)
    exported = export_model(imp, pruned, check=False)
    got_onnx = run_onnx(exported, inputs)
    assert output_error(got_tvm, want) <= 1e-5
    assert output_error(got_onnx, want) <= 1e-5
    assert [n.name for n in exported.graph.node] == [n.name for n in imp.prepared.model.graph.node]


@pytest.mark.parametrize("target", [0.2, 0.3])
def test_a_flops_cut_exports_an_onnx_model_that_matches_tvm_and_reaches_the_target(
    imported, target
):
    name, _, imp = imported
    plan, pruned = prune_module(imp.mod, flops_reduction=target, model=name)
    exported = export_model(imp, pruned)  # raises unless onnxruntime matches TVM
    assert abs(plan.flops_reduction - target) <= 0.01
    sizes = sum(t.ByteSize() for t in exported.graph.initializer)
    assert sizes < sum(t.ByteSize() for t in imp.prepared.model.graph.initializer)
    before = [(n.name, n.op_type) for n in imp.prepared.model.graph.node]
    after = [(n.name, n.op_type) for n in exported.graph.node]
    assert [x for x in after if x in before] == before  # every node kept, in order
    extra = [x for x in after if x not in before]  # only bias compensation after a MatMul
    assert all(op == "Add" and name.endswith("/compensation") for name, op in extra)


@pytest.mark.parametrize("key", list(CORPUS))
def test_a_calibrated_cut_exports_and_beats_the_data_free_cut_on_held_out_inputs(key):
    model, shapes = _load(("corpus", key))
    imp = import_model(model, shapes, name=key)
    held = synthetic_inputs(shapes, 32, seed=2)
    dense = outputs(imp.prepared.model, held)
    _, free = prune_module(imp.mod, flops_reduction=0.3, model=key)
    plan, calibrated = prune_module(
        imp.mod,
        flops_reduction=0.3,
        calibration=synthetic_inputs(shapes, 64, seed=1),
        onnx_model=imp.prepared.model,
        model=key,
    )
    assert 0.3 <= plan.flops_reduction <= 0.32
    exported = export_model(imp, calibrated)  # raises unless onnxruntime matches TVM
    cal_error = held_out_error(dense, outputs(exported, held))
    free_error = held_out_error(dense, outputs(export_model(imp, free), held))
    assert cal_error < free_error
