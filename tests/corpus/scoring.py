"""Scoring a pruned model against its dense original on synthetic held-out inputs (the
corpus benchmark and tests have no real data for these models)."""

from __future__ import annotations

import numpy as np
import onnx

from tvm_qmfrg.metrics import unexplained_variance


def synthetic_inputs(shapes: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` seeded float32 samples per input (leading axis): for an image ``(1, C, H, W)``,
    8x8 blocks of standard-normal noise plus 0.3 of it per pixel (smooth fields with edges,
    which convs answer as they answer images); standard normal for other shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            _, c, h, w = shape
            coarse = rng.standard_normal((n, c, -(-h // 8), -(-w // 8)))
            x = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :h, :w]
            x = x + 0.3 * rng.standard_normal(x.shape)
        else:
            x = rng.standard_normal((n, *shape[1:]))
        out[name] = x.astype(np.float32)
    return out


def outputs(model: onnx.ModelProto, inputs: dict) -> list[np.ndarray]:
    """Every output of ``model`` per sample, stacked: one ``(n, ...)`` array per output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = next(iter(inputs.values())).shape[0]
    runs = [sess.run(None, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
    return [np.stack(per_output).astype(np.float64) for per_output in zip(*runs)]


def held_out_error(dense: list[np.ndarray], pruned: list[np.ndarray]) -> float:
    """Mean over the outputs of ``sum ||y - y_dense||^2 / sum ||y_dense - mean||^2`` over the
    samples: the share of each output's variation the pruned model gets wrong (``1 - R^2``;
    0 is exact, 1 as far off as always answering the mean output)."""
    return float(np.mean([unexplained_variance(d, p) for d, p in zip(dense, pruned)]))
