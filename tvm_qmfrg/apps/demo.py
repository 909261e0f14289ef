"""The main job on the shipped model: analyze, prune, build for the host, measure.

``tvm-qmfrg demo`` runs it. Steps (each reported through ``progress``):

1. spectral analysis of the shipped digits ResNet (which layers are most redundant);
2. the dense model built for ``x86-host`` (untuned): test / augmented accuracy, latency;
3. pruned to ``flops_reduction`` with ``qmfrg`` data-free, with ``qmfrg`` refit on 256
   training images (data-aware, calibrated), and with the ``magnitude`` baseline; each built
   and measured the same way;
4. the folder: ``report.md``, ``results.json``, every plan as JSON, the calibrated pruned
   model as ONNX, and the spectra / QM-FRG figures.

The table and the report lead with the calibrated run, the recommended mode when a few
hundred samples of the model's inputs are at hand; ``results.json`` keeps the runs' short
labels (``qmfrg``, ``qmfrg+cal``, ``magnitude``) in the order they ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx
import tvm
from tvm import relax

from tvm_qmfrg.apps import plots
from tvm_qmfrg.apps.datasets import augmented_copy, load_digits_splits
from tvm_qmfrg.apps.evaluation import CALIBRATION_IMAGES, accuracy, latency_ms
from tvm_qmfrg.onnxio.reader import default_model_path, linear_operators, load_onnx
from tvm_qmfrg.passes import apply_plan, export_onnx, prune_module
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.normalize import normalize
from tvm_qmfrg.report import format_table, write_atomic, write_json
from tvm_qmfrg.targets import compile_module, load

DEFAULT_REDUCTION = 0.3
BATCH = 120
RUNS = (  # (label, criterion, calibrated)
    ("qmfrg", "qmfrg", False),
    ("qmfrg+cal", "qmfrg", True),
    ("magnitude", "magnitude", False),
)


# how the table and the report name each run, in the order they list them (main line first)
DISPLAY = {
    "dense": "dense",
    "qmfrg+cal": f"qmfrg (calibrated, {CALIBRATION_IMAGES} images)",
    "qmfrg": "qmfrg (data-free)",
    "magnitude": "magnitude (baseline)",
}


@dataclass(frozen=True)
class DemoRow:
    label: str
    flops_reduction: float
    params: int
    test_accuracy: float
    augmented_accuracy: float
    latency_ms: float


def _vm(mod, config):

    return relax.VirtualMachine(compile_module(mod, config, model="digits_resnet"), tvm.cpu())


def run_demo(
    out: str,
    flops_reduction: float = DEFAULT_REDUCTION,
    progress: Callable[[str], None] = lambda _: None,
) -> list[DemoRow]:
    """Run the demo, write ``out``; return the rows (dense first)."""

    t_start = time.perf_counter()
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        progress(f"[{step}/6 {time.perf_counter() - t_start:5.1f} s] {text}")

    path = default_model_path()
    say(f"analyzing {os.path.basename(path)}: spectra and QM-FRG of every layer")
    os.makedirs(out, exist_ok=True)
    figs = plots.figure_names(out)
    most, least = plots.redundancy_figures(
        linear_operators(load_onnx(path)), figs["spectra"], figs["heatmap"]
    )
    progress(
        f"      most redundant layer {most.name} (median nearest-channel angle "
        f"{most.median_nearest_angle:.2f} rad), least {least.name} "
        f"({least.median_nearest_angle:.2f} rad)"
    )
    data = load_digits_splits(0)
    x_aug, y_aug = augmented_copy(data.x_test, data.y_test, copies=10, seed=0)
    model = onnx.load(path)
    mod_batch = import_onnx(model, {"input": [BATCH, 1, 8, 8]})
    mod_one = import_onnx(model, {"input": [1, 1, 8, 8]})
    mod_cal = import_onnx(model, {"input": [CALIBRATION_IMAGES, 1, 8, 8]})
    config = load("x86-host")

    def measure(label, plan, pruned_batch) -> DemoRow:
        vm = _vm(pruned_batch, config)
        one = apply_plan(mod_one, plan) if plan else mod_one
        return DemoRow(
            label=label,
            flops_reduction=plan.flops_reduction if plan else 0.0,
            params=module_cost(pruned_batch).params,
            test_accuracy=accuracy(vm, data.x_test, data.y_test, BATCH),
            augmented_accuracy=accuracy(vm, x_aug, y_aug, BATCH),
            latency_ms=latency_ms(_vm(one, config), (1, 1, 8, 8), repeat=10),
        )

    say(f"building the dense model for {config.name} and measuring it")
    rows = [measure("dense", None, normalize(mod_batch))]
    plans = {}
    for label, criterion, calibrated in RUNS:
        how = f"refit on {CALIBRATION_IMAGES} training images" if calibrated else "data-free"
        say(f"pruning {flops_reduction:.0%} of the FLOPs with {criterion} ({how}), building")
        plan, _ = prune_module(
            mod_cal if calibrated else mod_batch,
            criterion=criterion,
            flops_reduction=flops_reduction,
            calibration=data.x_train[:CALIBRATION_IMAGES] if calibrated else None,
            onnx_model=model if calibrated else None,
            model="digits_resnet",
        )
        plans[label] = plan
        rows.append(measure(label, plan, apply_plan(mod_batch, plan)))
        progress(
            f"      test accuracy {rows[-1].test_accuracy:.4f}, "
            f"latency {rows[-1].latency_ms:.3f} ms"
        )

    say(f"writing {out}")
    for label, plan in plans.items():
        write_json(os.path.join(out, f"plan_{label}.json"), plan.to_dict())
    best = export_onnx(apply_plan(mod_one, plans["qmfrg+cal"]), model_name="digits_resnet")
    write_atomic(os.path.join(out, "pruned_qmfrg_cal.onnx"), best.SerializeToString())
    table = demo_table(rows)
    write_json(
        os.path.join(out, "results.json"),
        {"flops_reduction": flops_reduction, "rows": [asdict(r) for r in rows]},
    )
    by_label = {r.label: r for r in rows}
    cal, free = by_label["qmfrg+cal"], by_label["qmfrg"]
    report = (
        "# tvm-qmfrg demo: the shipped digits ResNet\n\n"
        f"Pruned to {flops_reduction:.0%} fewer conv/matmul FLOPs, built with TVM for "
        f"{config.name} (untuned schedules), measured on the test split and its augmented "
        "copy; latency is batch 1, median.\n\n"
        f"```\n{table}\n```\n\n"
        f"Calibrated on {CALIBRATION_IMAGES} training images, qmfrg keeps "
        f"{cal.test_accuracy:.1%} test accuracy (dense {rows[0].test_accuracy:.1%}); "
        f"data-free, {free.test_accuracy:.1%}. Calibrated pruning is the recommended mode "
        "when you have a few hundred samples of the model's inputs:\n\n"
        "```sh\n"
        f"tvm-qmfrg prune model.onnx --flops-reduction {flops_reduction:g} "
        "--calibration samples.npz --validate held_out.npz -o pruned.onnx\n"
        "```\n\n"
        "(`--calibration` also takes a `.npy` file or a folder of images with `--preprocess`; "
        "`--validate` prints how closely the pruned model follows the dense one on samples "
        "the pass did not see.) Data-free pruning is for when no data is at hand.\n\n"
        f"Most redundant layer: `{most.name}`; least: `{least.name}`.\n\n"
        "![spectra](spectra_most_least_redundant.png)\n\n"
        "![QM-FRG heat map](qmfrg_heatmap.png)\n"
    )
    write_atomic(os.path.join(out, "report.md"), report.encode())
    progress(f"done in {time.perf_counter() - t_start:.1f} s")
    return rows


def demo_table(rows: list[DemoRow]) -> str:
    """The rows as a text table: dense, then the calibrated run (the main line), data-free,
    the baseline; labels as in :data:`DISPLAY`."""
    dense = rows[0]
    order = list(DISPLAY)
    rows = sorted(rows, key=lambda r: order.index(r.label) if r.label in order else len(order))
    return format_table(
        ["model", "FLOPs -", "params", "test acc", "aug acc", "latency ms", "speed-up"],
        [
            [
                DISPLAY.get(r.label, r.label),
                f"{r.flops_reduction:.1%}",
                r.params,
                r.test_accuracy,
                r.augmented_accuracy,
                r.latency_ms,
                f"{dense.latency_ms / r.latency_ms:.2f}x" if r.latency_ms > 0 else "-",
            ]
            for r in rows
        ],
    )
