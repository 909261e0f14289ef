"""The folder ``tvm-qmfrg eval`` writes: results.json, report.md and its PNG figures."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tvm_qmfrg.apps import evaluation, fidelity, plots
from tvm_qmfrg.onnxio.reader import linear_operators, load_onnx
from tvm_qmfrg.report import write_atomic, write_json

_ABLATION_TEXT = (
    "`+cal-X`: the same with one part switched off, to show what it adds: `select` (the "
    "criterion picks the units, activations only refit them), `refit` (activations pick, "
    "no consumer refit), `seq` (every group from the dense network's activations, not "
    "sequentially), `resid` (a consumer ahead of a residual add reproduces its own dense "
    "output, not the dense sum, so it ignores the drift the stream carries), `sens` "
    "(uniform allocation instead of measured sensitivity), `ridge` "
    "(a fixed tiny ridge instead of one chosen on held-out samples)."
)


def write_eval_report(
    out: str,
    command: str,
    digits_cells: Sequence[evaluation.Cell],
    minilm_cells: Sequence[fidelity.FidelityCell],
    model_path: str,
) -> list[str]:
    """Write everything into ``out``; return the paths written."""
    os.makedirs(out, exist_ok=True)
    figs = plots.figure_names(out)
    write_json(
        os.path.join(out, "results.json"),
        {
            "command": command,
            "digits": evaluation.cells_json(digits_cells),
            "minilm": fidelity.cells_json(minilm_cells),
        },
    )
    plots.quality_vs_flops(digits_cells, minilm_cells, figs["quality"])
    most, least = plots.redundancy_figures(
        linear_operators(load_onnx(model_path)), figs["spectra"], figs["heatmap"]
    )
    parts = [
        "# Pruning criteria: accuracy and fidelity vs FLOPs\n",
        f"Command: `{command}`\n",
        "Latency: untuned TVM build for this host, batch 1, median (a shared machine: "
        "compare latencies within one run only).\n",
    ]
    if digits_cells:
        parts += [
            "## Digits ResNet (shipped model)\n",
            "Accuracy on the test split and on its seeded augmented copy (10x, shifts and "
            "noise). `allocation`: how the FLOPs budget was spread over the layers (with "
            "several allocations given, chosen per cell on the validation split). `+cal`: "
            "calibrated pruning on 256 training images (never the test split); "
            f"{_ABLATION_TEXT}\n",
            f"```\n{evaluation.summary_table(digits_cells)}\n```\n",
        ]
    if minilm_cells:
        parts += [
            "## all-MiniLM-L6-v2 (pretrained)\n",
            "Fidelity of the pruned encoder's embeddings of the 350 evaluation sentences to "
            "the dense ones: mean cosine and nearest-neighbour agreement@1. `flops F`: F of "
            "the matmul FLOPs, heads and FFN neurons alike; `ffn S`: S of every layer's FFN "
            "neurons, heads kept. `paraphrase@1`: share of the 60 paraphrase pairs' sentences "
            "whose nearest other sentence is their partner (the dense model's own score is "
            "the `dense` row). `+cal`: calibrated pruning on the separate calibration text; "
            f"{_ABLATION_TEXT}\n",
            f"```\n{fidelity.summary_table(minilm_cells)}\n```\n",
        ]
    parts += [
        "## Figures\n",
        "![quality vs FLOPs](quality_vs_flops.png)\n",
        f"Most redundant layer of the digits ResNet: `{most.name}` (median nearest-channel "
        f"angle {most.median_nearest_angle:.3f} rad); least: `{least.name}` "
        f"({least.median_nearest_angle:.3f} rad).\n",
        "![spectra](spectra_most_least_redundant.png)\n",
        "![QM-FRG heat map](qmfrg_heatmap.png)\n",
    ]
    report = os.path.join(out, "report.md")
    write_atomic(report, "\n".join(parts).encode())
    return [os.path.join(out, "results.json"), report, *figs.values()]
