"""Does the pruned model really run faster? Dense vs 50%-FLOPs pruned, tuned alike, on x86-host.

A ResNet-18-shaped model (CIFAR size: 32x32 input, widths 64-512, seeded random weights) and
the same model pruned to 50 % FLOPs by ``qmfrg`` (channels rounded to the target's
``round_to``) are both tuned with the same MetaSchedule budget on this host, built, and timed
with TVM's ``time_evaluator``; onnxruntime runs the dense and the pruned ONNX in the same run.
Run from the repository root::

    .venv/bin/python benchmarks/bench_deploy.py [--trials 256] [--trials-per-task N] \
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tvm
from tvm import relax
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.onnx_export import export_onnx
from tvm_qmfrg.passes.prune import prune_module

from tvm_qmfrg import targets
from tvm_qmfrg.onnxio import synthetic
from tvm_qmfrg.report import write_json


def tvm_ms(path: Path, x: np.ndarray) -> float:
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    timer = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=10)
    return float(timer(tvm.runtime.tensor(x)).median * 1e3)


def ort_ms(model, x: np.ndarray, repeat: int = 200) -> float:
    sess = ort.InferenceSession(model.SerializeToString())
    for _ in range(20):
        sess.run(None, {"input": x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument(
        "--trials-per-task", type=int, default=None, help="default: the target config's"
    )
    parser.add_argument("--out", default="benchmarks/results/deploy.json")
    args = parser.parse_args()
    config = targets.load("x86-host")
    model = synthetic.resnet_cifar(seed=0, widths=(64, 128, 256, 512), image=32)
    mod = import_onnx(model)
    plan, pruned = prune_module(mod, flops_reduction=0.5, round_to=config.round_to)
    pruned_onnx = export_onnx(pruned, output_names=["logits"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("dense", mod), ("pruned", pruned)):
            t0 = time.perf_counter()
            art = targets.build(
                m,
                config,
                trials=args.trials,
                trials_per_task=args.trials_per_task,
                work_dir=Path(tmp) / name,
                output=Path(tmp) / f"{name}.so",
                model=name,
            )
            rows[name] = {
                "tune_build_seconds": round(time.perf_counter() - t0, 1),
                "tvm_ms": tvm_ms(art.path, x),
            }
            print(name, rows[name], flush=True)
    rows["dense"]["onnxruntime_ms"] = ort_ms(model, x)
    rows["pruned"]["onnxruntime_ms"] = ort_ms(pruned_onnx, x)
    result = {
        "command": f"python benchmarks/bench_deploy.py --trials {args.trials}"
        + (f" --trials-per-task {args.trials_per_task}" if args.trials_per_task else ""),
        "target": config.name,
        "trials_each": args.trials,
        "trials_per_task": args.trials_per_task or config.tuning.trials_per_task,
        "flops_reduction": plan.flops_reduction,
        "params": [plan.params_before, plan.params_after],
        "results": rows,
        "tvm_speedup_pruned_over_dense": rows["dense"]["tvm_ms"] / rows["pruned"]["tvm_ms"],
        "ort_speedup_pruned_over_dense": rows["dense"]["onnxruntime_ms"]
        / rows["pruned"]["onnxruntime_ms"],
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
