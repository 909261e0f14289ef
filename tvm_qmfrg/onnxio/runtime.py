"""Running ONNX models in onnxruntime, seeded inputs for them, and comparing outputs.

One place for what preparing, exporting, the tests and the benchmarks all do: feed a model
seeded inputs, run it on the CPU provider, and measure how far two sets of outputs are apart.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import GraphError, one_line


def random_inputs(
    model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded inputs of ``shapes`` in the dtypes ``model`` declares: standard normal for
    floats, 0/1 for integers."""
    rng = np.random.default_rng(seed)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    feed = {}
    for name, shape in shapes.items():
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types.get(name, 1)))
        feed[name] = (
            rng.standard_normal(shape).astype(dtype)
            if dtype.kind == "f"
            else rng.integers(0, 2, size=shape).astype(dtype)
        )
    return feed


def run_onnx(model: onnx.ModelProto, inputs: dict, *, name: str = "model") -> list[np.ndarray]:
    """``model``'s outputs in onnxruntime (CPU); a model it rejects is a :class:`GraphError`."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, inputs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GraphError(f"{name}: onnxruntime cannot run the model: {one_line(exc)}") from exc


def output_error(got, want) -> float:
    """``max_k max |got_k - want_k| / max(max |want_k|, 1)`` over paired outputs; ``inf`` when
    the counts or shapes differ. The floor of 1 keeps near-zero outputs (a probability map on
    random input) from magnifying round-off."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / scale)
    return worst
