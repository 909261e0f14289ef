"""What a removed channel leaves behind, and how the consumer makes up for it (numpy only).

Removing unit ``j`` (or merging it into ``i`` with ``a_j ~= c a_i``) leaves the consumer a
mean error ``E[a_j - c a_i] V[:, j]``; folding it into the consumer's bias removes it
(DESIGN.md, "Bias compensation"). Data-free, the mean comes from a BatchNorm's statistics:
the pre-activation is ``z ~ N(m, s^2)`` and ``E[relu(z)] = m Phi(m/s) + s phi(m/s)``. With
data, :mod:`tvm_qmfrg.reconstruction` refits the consumers instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy.stats import norm


def relu_mean(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``E[max(z, 0)]`` for ``z ~ N(mean, std^2)``: ``m Phi(m/s) + s phi(m/s)``."""
    m, s = np.asarray(mean, np.float64), np.maximum(np.asarray(std, np.float64), 1e-12)
    return m * norm.cdf(m / s) + s * norm.pdf(m / s)


def pruned_offsets(
    means: np.ndarray,
    unit: int,
    pruned: Iterable[int],
    merges: Mapping[int, tuple[int, float]],
) -> dict[int, float]:
    """Per feature of every pruned unit, ``E[a_f] - c E[a_partner]`` (``c = 0`` if removed).

    ``means[f]`` is ``E[a_f]``; unit ``j`` holds features ``j*unit .. j*unit + unit - 1``;
    ``merges[j] = (i, c)`` when ``j`` was merged into ``i``. Zero offsets are left out.
    """
    out = {}
    for j in pruned:
        i, c = merges.get(j, (-1, 0.0))
        for t in range(unit):
            f = j * unit + t
            mu = means[f] - (c * means[i * unit + t] if i >= 0 else 0.0)
            if mu != 0.0:
                out[f] = float(mu)
    return out


def unit_spectra(mats: np.ndarray) -> np.ndarray:
    """Singular values of a batch of matrices (a one-row or one-column matrix: its norm)."""
    if 1 in mats.shape[1:]:
        return np.linalg.norm(mats.reshape(mats.shape[0], -1), axis=1, keepdims=True)
    return np.linalg.svd(mats, compute_uv=False)
