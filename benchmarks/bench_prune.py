"""Wall time of the pruning pass (analysis + selection + rewrite) on large model shapes.

ResNet-50-shaped (25.6 M parameters, 224x224 input) and BERT-base-shaped (12 layers, 768
wide, 12 heads, FFN 3072, sequence 128) models with seeded random weights, pruned to 50 %
FLOPs with the ``qmfrg`` and ``magnitude`` criteria. TVM's ONNX import is timed apart: it is
not part of the pass. Run from the repository root::

    .venv/bin/python benchmarks/bench_prune.py [--out benchmarks/results/prune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.prune import QMFRGPrune

from tvm_qmfrg import synthetic
from tvm_qmfrg.report import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/prune.json")
    args = parser.parse_args()
    rows = []
    for name in ("resnet50", "bert_base"):
        model = getattr(synthetic, name)(seed=0)
        t0 = time.perf_counter()
        mod = import_onnx(model)
        import_s = time.perf_counter() - t0
        for criterion in ("qmfrg", "magnitude"):
            prune = QMFRGPrune(criterion=criterion, flops_reduction=0.5)
            t0 = time.perf_counter()
            prune(mod)
            seconds = time.perf_counter() - t0
            plan = prune.plan
            rows.append(
                {
                    "model": name,
                    "criterion": criterion,
                    "pass_seconds": round(seconds, 3),
                    "import_seconds": round(import_s, 3),
                    "groups": len(plan.groups),
                    "channels": sum(g.channels for g in plan.groups),
                    "flops_reduction": round(plan.flops_reduction, 4),
                    "params_before": plan.params_before,
                    "params_after": plan.params_after,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    write_json(
        args.out,
        {
            "command": "python benchmarks/bench_prune.py",
            "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
