"""Distances between points on the hypersphere, and the bounds they certify.

Definitions (vectors are compared projectively: their norms and signs do not matter):

- fidelity        ``F(x, y) = |<x, y>|^2 / (||x||^2 ||y||^2)``
- Fubini–Study    ``d_FS(x, y) = arccos sqrt(F(x, y))`` in ``[0, pi/2]``
- Wasserstein-2   between the entries of two spectra as 1-D empirical distributions,
  ``W2(u, v)^2 = int_0^1 (F_u^{-1}(t) - F_v^{-1}(t))^2 dt``; equal lengths ``r``:
  ``||sort(u) - sort(v)||_2 / sqrt(r)``.

Bounds (DESIGN.md, "The mathematics"):

- Mirsky:        ``||s(W1) - s(W2)||_2 <= ||W1 - W2||_F`` (equality at the best orthogonal
  alignment), see :func:`spectral_gap`.
- Eckart–Young:  ``sin d_FS(psi(W), psi(W_k)) = ||W - W_k||_F / ||W||_F``, see
  :func:`truncation_angle` and :func:`rank_for_angle`.
- Merge:         removing channel ``j`` and folding it into ``i`` errs by at most
  ``||V[:, j]|| * ||w_j|| * sin(theta_ij)`` per unit input, see :func:`merge_error_bound`.

Vectors of different length are zero-padded to one length for FS and fidelity.

Outputs of a pruned model against the dense one, over ``n`` samples (rows):

- unexplained variance  ``sum_n ||y~_n - y_n||^2 / sum_n ||y_n - mean_m y_m||^2`` (``1 - R^2``:
  0 exact, 1 as far off as always answering the mean output), see
  :func:`unexplained_variance`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import OptionError, WeightError
from .spectral import normalize

_DEFAULT_CHUNK_BYTES = 256 * 2**20


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, np.float64).reshape(-1)
    b = np.asarray(y, np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise WeightError("cannot compare an empty vector")
    if a.size != b.size:
        width = max(a.size, b.size)
        a = np.pad(a, (0, width - a.size))
        b = np.pad(b, (0, width - b.size))
    return normalize(a, "first vector"), normalize(b, "second vector")


def fidelity(x: np.ndarray, y: np.ndarray) -> float:
    """``|<x, y>|^2 / (||x||^2 ||y||^2)``, in ``[0, 1]``."""
    a, b = _pair(x, y)
    return float(min(1.0, abs(a @ b)) ** 2)


def fubini_study(x: np.ndarray, y: np.ndarray) -> float:
    """``d_FS(x, y) = arccos |<x^, y^>|`` in ``[0, pi/2]``.

    Evaluated as ``2 arcsin(min(||x^ - y^||, ||x^ + y^||) / 2)``, which equals the arccos form
    and stays accurate for nearly parallel vectors, where arccos loses half the digits.
    """
    a, b = _pair(x, y)
    chord = min(np.linalg.norm(a - b), np.linalg.norm(a + b))
    return float(min(np.pi / 2, 2.0 * np.arcsin(min(1.0, chord / 2.0))))


def wasserstein2(u: np.ndarray, v: np.ndarray) -> float:
    """W2 between the entries of ``u`` and ``v`` as uniform 1-D empirical distributions.

    Exact quantile-function formula; ``u`` and ``v`` may differ in length. Both quantile
    functions are step functions; on the merged breakpoints ``{i/n} U {j/m}`` the integrand
    is constant, so the integral is a finite sum.
    """
    a = np.sort(np.asarray(u, np.float64).reshape(-1))
    b = np.sort(np.asarray(v, np.float64).reshape(-1))
    if a.size == 0 or b.size == 0:
        raise WeightError("cannot compare an empty spectrum")
    if a.size == b.size:
        return float(np.linalg.norm(a - b) / np.sqrt(a.size))
    n, m = a.size, b.size
    cuts = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], cuts]))
    mids = cuts - widths / 2
    ia = np.minimum((mids * n).astype(np.int64), n - 1)
    ib = np.minimum((mids * m).astype(np.int64), m - 1)
    return float(np.sqrt(np.sum(widths * (a[ia] - b[ib]) ** 2)))


def _rows_per_chunk(n_cols: int, itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, n_cols * itemsize))


def unit_rows(x: np.ndarray, dtype: type) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm, in ``dtype`` (one copy at most)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise OptionError(f"pairwise wants an (n, d) array, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1).astype(np.float64)
    if np.any(norms == 0):
        raise WeightError(
            f"row {int(np.argmin(norms))}: zero vector has no direction on the sphere"
        )
    return (arr / norms[:, None].astype(dtype)).astype(dtype, copy=False)


def iter_abs_cosine(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    dtype: type = np.float64,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(row_start, |X^ Y^T|[rows])`` block by block: one GEMM, bounded memory.

    ``x`` is ``(n, d)`` and ``y`` ``(m, d)`` (``y = x`` when omitted); rows are normalized
    first. Each block holds at most ``chunk_bytes`` of output.
    """
    xn = unit_rows(x, dtype)
    yn = xn if y is None else unit_rows(y, dtype)
    if xn.shape[1] != yn.shape[1]:
        raise OptionError(f"pairwise wants equal row lengths, got {xn.shape} and {yn.shape}")
    step = _rows_per_chunk(yn.shape[0], np.dtype(dtype).itemsize, chunk_bytes)
    for start in range(0, xn.shape[0], step):
        block = xn[start : start + step] @ yn.T  # one chunk of X X^T runs as BLAS syrk
        np.abs(block, out=block)
        np.minimum(block, 1.0, out=block)
        yield start, block


def pairwise_fubini_study(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    dtype: type = np.float64,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """Matrix ``D[i, j] = d_FS(x_i, y_j)`` (``y = x`` when omitted), one chunked GEMM.

    Uses ``arccos`` of the cosine matrix: nearly parallel pairs carry an absolute error of
    about ``sqrt(machine epsilon)``; call :func:`fubini_study` on the pairs that matter when
    you need them exact.
    """
    n = np.asarray(x).shape[0]
    m = n if y is None else np.asarray(y).shape[0]
    out = np.empty((n, m), dtype=dtype)
    for start, block in iter_abs_cosine(x, y, dtype=dtype, chunk_bytes=chunk_bytes):
        np.arccos(block, out=out[start : start + block.shape[0]])
    if y is None:
        np.fill_diagonal(out, 0.0)
    return out


def pairwise_fidelity(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Matrix ``F[i, j] = |<x_i^, y_j^>|^2``."""
    n = np.asarray(x).shape[0]
    m = n if y is None else np.asarray(y).shape[0]
    out = np.empty((n, m))
    for start, block in iter_abs_cosine(x, y):
        np.square(block, out=out[start : start + block.shape[0]])
    return out


def pairwise_wasserstein2(spectra: list[np.ndarray]) -> np.ndarray:
    """Matrix ``W[i, j] = W2(spectra_i, spectra_j)`` for spectra of any lengths.

    Spectra of one common length are done together with one GEMM
    (``W2^2 = (||a||^2 + ||b||^2 - 2 <sort a, sort b>) / r``); pairs of different
    lengths use the exact formula of :func:`wasserstein2`.
    """
    sorted_specs = [np.sort(np.asarray(s, np.float64).reshape(-1)) for s in spectra]
    n = len(sorted_specs)
    out = np.zeros((n, n))
    lengths = np.array([s.size for s in sorted_specs])
    for r in np.unique(lengths):
        idx = np.flatnonzero(lengths == r)
        block = np.stack([sorted_specs[i] for i in idx])
        sq = np.sum(block**2, axis=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * block @ block.T) / r
        out[np.ix_(idx, idx)] = np.sqrt(np.maximum(d2, 0.0))
    for i in range(n):
        for j in range(i + 1, n):
            if lengths[i] != lengths[j]:
                out[i, j] = out[j, i] = wasserstein2(sorted_specs[i], sorted_specs[j])
    np.fill_diagonal(out, 0.0)
    return out


def spectral_gap(w1: np.ndarray, w2: np.ndarray) -> float:
    """``||s(W1) - s(W2)||_2`` (zero-padded): Mirsky's lower bound on ``||W1 - W2||_F``.

    It equals ``min over orthogonal U, V of ||W1 - U W2 V^T||_F``: a large gap proves the
    operators differ; a small one proves closeness only up to a change of basis.
    """
    s1 = np.linalg.svd(np.asarray(w1, np.float64), compute_uv=False)
    s2 = np.linalg.svd(np.asarray(w2, np.float64), compute_uv=False)
    width = max(s1.size, s2.size)
    return float(
        np.linalg.norm(np.pad(s1, (0, width - s1.size)) - np.pad(s2, (0, width - s2.size)))
    )


def truncation_angle(s: np.ndarray, k: int) -> float:
    """``d_FS(psi(W), psi(W_k))`` for the best rank-``k`` truncation, from singular values.

    By Eckart–Young, ``sin`` of it is ``||W - W_k||_F / ||W||_F = ||s_{>k}|| / ||s||``.
    """
    s = np.sort(np.asarray(s, np.float64).reshape(-1))[::-1]
    if not 0 <= k <= s.size:
        raise OptionError(f"rank {k} is outside [0, {s.size}]")
    total = np.linalg.norm(s)
    if total == 0:
        raise WeightError("all-zero spectrum has no truncation angle")
    return float(np.arcsin(min(1.0, np.linalg.norm(s[k:]) / total)))


def rank_for_angle(s: np.ndarray, epsilon: float) -> int:
    """Smallest ``k`` with ``truncation_angle(s, k) <= epsilon``."""
    if not 0 <= epsilon <= np.pi / 2:
        raise OptionError(f"epsilon={epsilon} is outside [0, pi/2]")
    s = np.sort(np.asarray(s, np.float64).reshape(-1))[::-1]
    total = np.linalg.norm(s)
    # tail[k] = ||s_{>k}||, for k = 0..len(s)
    tail = np.sqrt(np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]]))
    ok = np.flatnonzero(tail <= np.sin(epsilon) * total * (1 + 1e-12))
    return int(ok[0])


def merge_error_bound(consumer_norm: float, state_norm: float, theta: float) -> float:
    """``||V[:, j]|| * ||w_j|| * sin(theta)``: consumer error per unit input of a merge.

    ``theta = pi/2`` (``sin = 1``) is plain removal, the magnitude-pruning cost.
    """
    return float(consumer_norm * state_norm * np.sin(theta))


def best_scale(w_i: np.ndarray, w_j: np.ndarray) -> tuple[float, float]:
    """The direct check in the network's own basis: ``c`` minimizing ``||W_j - c W_i||_F``
    (``c = <W_i, W_j> / ||W_i||^2``) and the relative residual ``||W_j - c W_i|| / ||W_j||``."""
    a = np.asarray(w_i, np.float64)
    b = np.asarray(w_j, np.float64)
    if a.shape != b.shape:
        raise OptionError(f"direct check needs equal shapes, got {a.shape} and {b.shape}")
    c = float(np.vdot(a, b) / np.vdot(a, a))
    return c, float(np.linalg.norm(b - c * a) / np.linalg.norm(b))


def unexplained_variance(want: np.ndarray, got: np.ndarray, relative_floor: float = 0.0) -> float:
    """``sum ||got - want||^2 / max(sum ||want - mean want||^2, relative_floor * sum ||want||^2)``
    over the rows (axis 0, the samples): ``1 - R^2`` of ``got`` as a prediction of ``want``.
    ``relative_floor`` keeps an output that hardly varies from magnifying round-off; a
    denominator of zero is taken as ``1e-30``."""
    w = np.asarray(want, dtype=np.float64)
    spread = float(np.sum((w - w.mean(axis=0)) ** 2))
    if relative_floor:
        spread = max(spread, relative_floor * float(np.sum(w * w)))
    return float(np.sum((got - w) ** 2)) / max(spread, 1e-30)
