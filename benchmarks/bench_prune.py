"""Wall time of the pruning pass (analysis + selection + rewrite) on large model shapes.

ResNet-50-shaped (25.6 M parameters, 224x224 input) and BERT-base-shaped (12 layers, 768
wide, 12 heads, FFN 3072, sequence 128) models with seeded random weights, pruned to 50 %
FLOPs:

- data-free, with the ``qmfrg`` and ``magnitude`` criteria: the pass on the module TVM's
  ONNX import gives (the import is timed apart, it is not part of the pass): the median of
  three runs, after one untimed run (the first pass in a process also pays one-time costs
  of TVM and LLVM; ``first_pass_seconds`` records it);
- calibrated (``qmfrg+cal``) on ``--samples`` seeded random inputs (256 by default), with
  the activations collected by onnxruntime on the prepared ONNX model: the whole
  calibrated pass (sensitivity allocation, sequential selection and refit).

Random weights and inputs give the real cost (every FLOP is spent), not a meaningful
accuracy. Run from the repository root::

    .venv/bin/python benchmarks/bench_prune.py [--out benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import numpy as np
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.onnx_io import import_model
from tvm_qmfrg.passes.prune import QMFRGPrune, prune_module

from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.report import write_json

REDUCTION = 0.5
REPEATS = 3  # timed runs of each data-free pass and import (the median is reported)


def _row(name, criterion, seconds, import_s, plan, **extra) -> dict:
    return {
        "model": name,
        "criterion": criterion,
        "pass_seconds": round(seconds, 3),
        "import_seconds": round(import_s, 3),
        "pass_over_import": round(seconds / import_s, 1),
        "groups": len(plan.groups),
        "channels": sum(g.channels for g in plan.groups),
        "flops_reduction": round(plan.flops_reduction, 4),
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        **extra,
    }


def _median_time(fn, arg, repeats: int = REPEATS):
    """The median wall time of ``repeats`` calls ``fn(arg)`` and the last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(arg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def _samples(model, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal([n, *dims[1:]]).astype(np.float32)
    return out


def calibrated(model, name: str, samples: int):
    """``(seconds, plan)`` of calibrated pruning of ``model`` to 50 % FLOPs on ``samples``
    seeded inputs, activations by onnxruntime on the prepared model (import untimed)."""
    imported = import_model(model, name=name)
    calibration = _samples(model, samples)
    t0 = time.perf_counter()
    plan, _ = prune_module(
        imported.mod,
        flops_reduction=REDUCTION,
        calibration=calibration,
        onnx_model=imported.prepared.model,
        model=name,
    )
    return time.perf_counter() - t0, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/prune.json")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--models", default="resnet50,bert_base")
    parser.add_argument("--no-calibrated", action="store_true", help="data-free rows only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows: list[dict] = []

    def record(row: dict) -> None:  # written after every row: a long run keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(
            args.out,
            {
                "command": "python benchmarks/bench_prune.py",
                "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
                "results": rows,
            },
        )

    for name in args.models.split(","):
        model = getattr(synthetic, name)(seed=0)
        import_onnx(model)  # untimed, as the passes: one-time costs of the frontend
        import_s, mod = _median_time(import_onnx, model)
        for criterion in ("qmfrg", "magnitude"):
            prune = QMFRGPrune(criterion=criterion, flops_reduction=REDUCTION)
            t0 = time.perf_counter()
            prune(mod)
            first = time.perf_counter() - t0
            seconds, _ = _median_time(prune, mod)
            record(
                _row(
                    name,
                    criterion,
                    seconds,
                    import_s,
                    prune.plan,
                    first_pass_seconds=round(first, 3),
                )
            )
        if args.no_calibrated:
            continue
        seconds, plan = calibrated(model, name, args.samples)
        record(_row(name, "qmfrg+cal", seconds, import_s, plan, samples=args.samples))


if __name__ == "__main__":
    main()
