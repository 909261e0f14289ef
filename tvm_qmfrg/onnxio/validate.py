"""How closely a pruned ONNX model follows its dense original on held-out samples.

:func:`fidelity` runs both models in onnxruntime over the same samples, in batches of the
models' static batch size (the last batch padded by repeating its last sample, the padded
outputs dropped), and compares each of their outputs per sample:

- ``top-1 agreement`` when the first output is ``(N, classes)`` with more than one class: the
  share of samples on which both models' argmax is the same class;
- ``mean cosine`` otherwise: the mean over samples of the cosine between the flattened dense
  and pruned outputs (1 when both are zero, 0 when only one is), and with it ``R²``, the share
  of the dense output's variation over the samples that the pruned one reproduces,

      R² = 1 - sum_n ||y~_n - y_n||² / sum_n ||y_n - mean_m y_m||²

  (``None`` for fewer than two samples or an output that does not vary). A cosine hides an
  error in a small part of an output beside a large constant one (a detector's box grid
  beside its class scores); ``R²`` measures the error against what the input changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import GraphError, OptionError, one_line
from ..metrics import unexplained_variance

TOP1 = "top-1 agreement"
COSINE = "mean cosine"


@dataclass(frozen=True)
class Fidelity:
    """How one output of a pruned model follows its dense original."""

    metric: str  # TOP1 or COSINE
    value: float
    samples: int
    r2: float | None = None  # with COSINE: see the module doc
    output: str = ""  # the output's name

    def measure(self) -> str:
        """``"<metric> with the dense model <value>[, R² <r2>]"``."""
        r2 = "" if self.r2 is None else f", R² {self.r2:.3f}"
        return f"{self.metric} with the dense model {self.value:.3f}{r2}"

    def __str__(self) -> str:
        return f"{self.measure()} ({self.samples} samples)"


def describe(results: list[Fidelity]) -> str:
    """One line for every output: the measure alone for one output, else each named."""
    if len(results) == 1:
        return results[0].measure()
    return "; ".join(f"{r.output}: {r.measure()}" for r in results)


def fidelity(
    dense_model: onnx.ModelProto,
    pruned_model: onnx.ModelProto,
    samples: dict[str, np.ndarray],
    *,
    batch: int,
    name: str = "model",
) -> list[Fidelity]:
    """Compare every output of ``pruned_model`` with ``dense_model``'s on ``samples`` (see
    module doc), in the dense model's output order.

    ``samples`` maps every input name to an array whose leading axis counts the samples
    (:func:`tvm_qmfrg.calibration_data.load_samples`); ``batch`` is the models' static batch
    size; ``name`` names the model in messages.
    """
    if batch < 1:
        raise OptionError(f"{name}: validation batch size {batch} must be >= 1")
    if not samples:
        raise OptionError(f"{name}: no validation samples")
    counts = {k: int(a.shape[0]) for k, a in samples.items()}
    n = next(iter(counts.values()))
    if n == 0 or len(set(counts.values())) > 1:
        raise OptionError(f"{name}: validation inputs need one non-zero sample count ({counts})")
    names = [o.name for o in dense_model.graph.output]
    if [o.name for o in pruned_model.graph.output] != names:
        raise GraphError(f"{name}: the pruned model's outputs are not the dense model's {names}")
    dense_outs = _outputs(dense_model, samples, n, batch, f"{name} (dense)")
    pruned_outs = _outputs(pruned_model, samples, n, batch, f"{name} (pruned)")
    return [
        _compare(out, dense, pruned, n, name)
        for out, dense, pruned in zip(names, dense_outs, pruned_outs)
    ]


def _compare(output: str, dense: np.ndarray, pruned: np.ndarray, n: int, name: str) -> Fidelity:
    if dense.shape != pruned.shape:
        raise GraphError(
            f"{name}: the pruned model's output '{output}' has shape {pruned.shape[1:]} per "
            f"sample, the dense model's {dense.shape[1:]}"
        )
    if dense.ndim == 2 and dense.shape[1] > 1:
        value = float(np.mean(dense.argmax(axis=1) == pruned.argmax(axis=1)))
        return Fidelity(TOP1, value, n, output=output)
    dense, pruned = dense.reshape(n, -1), pruned.reshape(n, -1)
    return Fidelity(COSINE, _mean_cosine(dense, pruned), n, _r2(dense, pruned), output)


def _outputs(
    model: onnx.ModelProto, samples: dict[str, np.ndarray], n: int, batch: int, name: str
) -> list[np.ndarray]:
    """The model's outputs for every sample, each stacked: ``(n, *per-sample shape)``."""
    names, run = _session(model, name)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        feed = {}
        for key, array in samples.items():
            part = array[start:stop]
            if stop - start < batch:  # pad the last batch with copies of its last sample
                pad = np.repeat(part[-1:], batch - (stop - start), axis=0)
                part = np.concatenate([part, pad], axis=0)
            feed[key] = part
        chunk = []
        for output, out in zip(names, run(feed)):
            out = np.asarray(out)
            if out.ndim >= 1 and out.shape[0] == batch:
                out = out[: stop - start]
            elif batch == 1:  # no batch axis on the output: the whole output is one sample's
                out = out[None]
            else:
                raise GraphError(
                    f"{name}: output '{output}' has shape {out.shape}, not one row per sample "
                    f"of a batch of {batch}"
                )
            chunk.append(out)
        chunks.append(chunk)
    return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]


def _session(model: onnx.ModelProto, name: str):
    """One onnxruntime session (CPU) for all batches: ``(output names, f)`` with
    ``f(feed) -> outputs``; a model it rejects is a :class:`GraphError`, as in
    :func:`.runtime.run_onnx`."""
    import onnxruntime as ort

    def failed(exc: Exception) -> GraphError:
        return GraphError(f"{name}: onnxruntime cannot run the model: {one_line(exc)}")

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise failed(exc) from exc
    names = [o.name for o in sess.get_outputs()]

    def run(feed: dict) -> list[np.ndarray]:
        try:
            return sess.run(names, feed)
        except Exception as exc:
            raise failed(exc) from exc

    return names, run


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    cos = np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, np.finfo(np.float64).tiny), 0.0)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    return float(np.mean(np.clip(cos, -1.0, 1.0)))


def _r2(dense: np.ndarray, pruned: np.ndarray) -> float | None:
    """``1 - sum ||pruned - dense||^2 / sum ||dense - mean(dense)||^2`` over the rows."""
    if dense.shape[0] < 2 or np.all(dense == dense[0]):
        return None
    return 1.0 - unexplained_variance(dense, pruned.astype(np.float64))
