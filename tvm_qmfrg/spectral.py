"""Operators as points on the unit hypersphere.

A linear operator ``y = W x + b`` with ``W`` in R^{m x n} is embedded by its augmented matrix

    A = [[W, b], [0, 1]]  in R^{(m+1) x (n+1)}

and the normalized singular-value spectrum ``psi = s(A) / ||s(A)||_2``, a point on the unit
sphere's nonnegative orthant. Spectra of different length are compared after zero-padding.

Matrix views (convention ``y = W x``; rows are output channels):

- dense / matmul weight: ``W`` as is (ONNX ``MatMul`` weights ``(K, N)`` are transposed by
  the reader, so every view here is ``out x in``);
- conv kernel ``(O, I/g, kh, kw)``: per group ``g`` an ``O/g x (I/g*kh*kw)`` matrix; the whole
  grouped conv is block-diagonal, so its spectrum is the union of the groups' spectra;
- attention head ``h`` with row blocks ``Q_h, K_h, V_h`` (``d_head x d_model``) of the
  projections and column block ``O_h`` (``d_model x d_head``) of the output projection:
  OV circuit ``O_h V_h`` and QK circuit ``Q_h^T K_h`` (both ``d_model x d_model``).

Channel states: output channel ``j`` of a producer is the row ``[w_j ; b_j]`` after folding
every per-channel affine ``y_j -> scale_j * y_j + shift_j`` (bias, BatchNorm) that lies before
the first nonlinearity.

All functions are pure numpy; none imports TVM.
"""

from __future__ import annotations

import numpy as np

from .errors import OptionError, WeightError, check_weight


def augmented_matrix(weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``[[W, b], [0, 1]]`` for a 2-D ``W`` (m x n) and bias ``b`` (m,), zero when absent."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise OptionError(f"augmented_matrix wants a 2-D weight, got shape {w.shape}")
    m, n = w.shape
    a = np.zeros((m + 1, n + 1), dtype=np.float64)
    a[:m, :n] = w
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.shape[0] != m:
            raise OptionError(f"bias of length {b.shape[0]} does not match {m} output rows")
        a[:m, n] = b
    a[m, n] = 1.0
    return a


def singular_values(matrices: np.ndarray) -> np.ndarray:
    """Singular values, descending, of one matrix ``(m, n)`` or a batch ``(B, m, n)``."""
    return np.linalg.svd(np.asarray(matrices, dtype=np.float64), compute_uv=False)


def normalize(vectors: np.ndarray, what: str = "spectrum") -> np.ndarray:
    """Scale each row (or the vector) to unit L2 norm; a zero row is a :class:`WeightError`."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise WeightError(f"{what}: zero vector has no direction on the sphere")
    return v / norms


def operator_spectrum(
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    groups: int = 1,
    augmented: bool = True,
    name: str = "operator",
) -> np.ndarray:
    """Normalized spectrum ``psi`` of a dense ``(m, n)`` or conv ``(O, I/g, *k)`` weight.

    For ``groups > 1`` the operator matrix is block-diagonal over groups, so ``psi`` is the
    sorted union of the groups' singular values (with the augmented row and column appended
    once when ``augmented``), normalized to unit length.
    """
    w = check_weight(weight, name)
    if w.ndim < 2:
        raise WeightError(f"{name}: weight must have at least 2 dims, got shape {w.shape}")
    blocks = conv_group_matrices(w, groups) if w.ndim > 2 or groups > 1 else w[None]
    if not augmented:
        s = singular_values(blocks).reshape(-1)
    else:
        b = None if bias is None else check_weight(bias, f"{name} bias", allow_zero=True)
        g, rows, cols = blocks.shape
        if g == 1:
            s = singular_values(augmented_matrix(blocks[0], b))
        else:
            # The augmented column couples the groups: build the full block-diagonal matrix.
            full = np.zeros((g * rows, g * cols))
            for i in range(g):
                full[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = blocks[i]
            s = singular_values(augmented_matrix(full, b))
    return normalize(np.sort(s)[::-1], f"{name} spectrum")


def conv_group_matrices(kernel: np.ndarray, groups: int = 1) -> np.ndarray:
    """Conv kernel ``(O, I/g, *k)`` -> ``(g, O/g, I/g * prod(k))``, one matrix per group."""
    k = np.asarray(kernel, dtype=np.float64)
    if groups < 1 or k.shape[0] % groups:
        raise OptionError(f"{k.shape[0]} output channels are not divisible by groups={groups}")
    return k.reshape(groups, k.shape[0] // groups, -1)


def pad_spectra(spectra: list[np.ndarray]) -> np.ndarray:
    """Stack spectra of different length into one array, zero-padding on the right."""
    if not spectra:
        return np.zeros((0, 0))
    width = max(len(s) for s in spectra)
    out = np.zeros((len(spectra), width))
    for i, s in enumerate(spectra):
        out[i, : len(s)] = s
    return out


def attention_head_circuits(
    w_q: np.ndarray,
    w_k: np.ndarray,
    w_v: np.ndarray,
    w_o: np.ndarray,
    num_heads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """OV and QK circuits of every head, each ``(H, d_model, d_model)``.

    ``w_q, w_k, w_v`` are ``(H*d_head, d_model)`` and ``w_o`` is ``(d_model, H*d_head)``
    (convention ``y = W x``). Head ``h`` owns rows ``h*d_head:(h+1)*d_head`` of the
    projections and the same columns of ``w_o``: ``OV_h = O_h V_h``, ``QK_h = Q_h^T K_h``.
    """
    q, k, v, o = (np.asarray(a, dtype=np.float64) for a in (w_q, w_k, w_v, w_o))
    inner = v.shape[0]
    if num_heads < 1 or inner % num_heads:
        raise OptionError(f"projection width {inner} is not divisible by {num_heads} heads")
    if q.shape != k.shape or q.shape[0] != inner or o.shape[1] != inner:
        raise OptionError(
            f"attention weight shapes do not agree: Q{q.shape} K{k.shape} V{v.shape} O{o.shape}"
        )
    dh = inner // num_heads
    qh = q.reshape(num_heads, dh, -1)
    kh = k.reshape(num_heads, dh, -1)
    vh = v.reshape(num_heads, dh, -1)
    oh = o.reshape(o.shape[0], num_heads, dh).transpose(1, 0, 2)
    return oh @ vh, qh.transpose(0, 2, 1) @ kh


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as ``y = scale * x + shift`` per channel.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
    """
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return scale, shift


def channel_states(
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``[scale_j * w_j ; scale_j * b_j + shift_j]``, one per output channel.

    ``weight`` is ``(O, ...)`` (flattened per channel); the result is ``(O, D + 1)``.
    This is the producer with its per-channel affine folded in, so rows are comparable
    channel by channel.
    """
    w = np.asarray(weight, dtype=np.float64)
    rows = w.reshape(w.shape[0], -1)
    o = rows.shape[0]
    b = np.zeros(o) if bias is None else np.asarray(bias, np.float64).reshape(o)
    s = np.ones(o) if scale is None else np.asarray(scale, np.float64).reshape(o)
    t = np.zeros(o) if shift is None else np.asarray(shift, np.float64).reshape(o)
    return np.concatenate([rows * s[:, None], (b * s + t)[:, None]], axis=1)


def effective_rank(psi: np.ndarray) -> float:
    """``exp(H(p))`` with ``p = psi^2`` (a probability vector for unit ``psi``)."""
    p = np.asarray(psi, np.float64) ** 2
    p = p[p > 0] / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s: np.ndarray) -> float:
    """``||W||_F^2 / ||W||_2^2 = sum(s^2) / max(s)^2``."""
    s = np.asarray(s, np.float64)
    return float(np.sum(s**2) / np.max(s) ** 2)
