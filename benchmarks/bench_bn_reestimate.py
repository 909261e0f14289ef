"""Does re-estimating BatchNorm statistics after pruning help? Measured on the digits ResNet.

Calibrated pruning refits each group's mixing consumer towards the dense network's
activations, so the BatchNorm after it already sees (close to) the dense statistics. The
common alternative for pruning without refits (adaptive BN, as in EagleEye) re-estimates
every BatchNorm's mean and variance on calibration data from the pruned network. This
benchmark measures both on the shipped digits ResNet with the 256 training images the
``eval`` grid uses: calibrated pruning with and without refits (``qmfrg+cal`` and
``qmfrg+cal-refit``), each exported to ONNX, then every BatchNormalization's statistics
re-estimated in graph order (each one on the network with the ones before it already
re-estimated), test accuracy before and after. Run from the repository root::

    .venv/bin/python benchmarks/bench_bn_reestimate.py [--out benchmarks/results/bn_reestimate.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from tvm_qmfrg.passes.onnx_io import export_model, import_model
from tvm_qmfrg.passes.prune import prune_module

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.apps.evaluation import CALIBRATION_IMAGES
from tvm_qmfrg.onnxio.reader import load_onnx
from tvm_qmfrg.report import write_json

MODEL = "tvm_qmfrg/data/digits_resnet.onnx"
BATCH = 8
VARIANTS = {"qmfrg+cal": {}, "qmfrg+cal-refit": {"reconstruct": False}}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])


def _batches(x: np.ndarray):
    for i in range(0, len(x), BATCH):
        chunk = x[i : i + BATCH]
        pad = BATCH - len(chunk)
        yield np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]), len(chunk)


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = _session(model)
    name = sess.get_inputs()[0].name
    preds = [sess.run(None, {name: b})[0][:n].argmax(axis=1) for b, n in _batches(x)]
    return float(np.mean(np.concatenate(preds) == y))


def reestimate_batchnorm(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """Every BatchNormalization's mean and variance set to the per-channel statistics of
    its input on ``x``, in graph order (each measured with the ones before it updated)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(out)
        probe.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
        sess = _session(probe)
        name = sess.get_inputs()[0].name
        acts = np.concatenate(
            [sess.run([node.input[0]], {name: b})[0][:n] for b, n in _batches(x)]
        ).astype(np.float64)
        axes = (0, *range(2, acts.ndim))
        for slot, value in ((3, acts.mean(axis=axes)), (4, acts.var(axis=axes))):
            new = numpy_helper.from_array(value.astype(np.float32), f"{node.name}_reest_{slot}")
            out.graph.initializer.append(new)
            node.input[slot] = new.name  # a new initializer: the old one may be shared
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/bn_reestimate.json")
    parser.add_argument("--reductions", default="0.3,0.5,0.6")
    args = parser.parse_args()
    data = load_digits_splits(0)
    calib = data.x_train[:CALIBRATION_IMAGES]
    imported = import_model(load_onnx(MODEL), {"input": [BATCH, 1, 8, 8]}, name="digits")
    dense = imported.prepared.model
    rows = [
        {
            "variant": "dense",
            "flops_reduction": 0.0,
            "test_accuracy": accuracy(dense, data.x_test, data.y_test),
            "test_accuracy_bn_reestimated": accuracy(
                reestimate_batchnorm(dense, calib), data.x_test, data.y_test
            ),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for reduction in (float(r) for r in args.reductions.split(",")):
        for variant, extra in VARIANTS.items():
            _, pruned = prune_module(
                imported.mod,
                flops_reduction=reduction,
                calibration=calib,
                onnx_model=dense,
                model="digits",
                **extra,
            )
            model = export_model(imported, pruned)
            rows.append(
                {
                    "variant": variant,
                    "flops_reduction": reduction,
                    "test_accuracy": accuracy(model, data.x_test, data.y_test),
                    "test_accuracy_bn_reestimated": accuracy(
                        reestimate_batchnorm(model, calib), data.x_test, data.y_test
                    ),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    write_json(
        args.out,
        {
            "command": "python benchmarks/bench_bn_reestimate.py",
            "calibration_images": CALIBRATION_IMAGES,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
