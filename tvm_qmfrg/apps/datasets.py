"""Scikit-learn's bundled digits data set, split and augmented deterministically.

Images are float32 arrays of shape ``(N, 1, 8, 8)`` (NCHW) with pixels scaled
from 0..16 to [0, 1]; labels are int64 class indices 0..9. Everything here is
numpy-only: scikit-learn is imported lazily, only to read the bundled data,
which needs no network access.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_qmfrg.errors import OptionError

__all__ = ["DigitsSplits", "augmented_copy", "load_digits_splits"]

_TRAIN_FRACTION = 0.6
_VAL_FRACTION = 0.2
_NOISE_STD = 0.05


@dataclass(frozen=True)
class DigitsSplits:
    """Train/validation/test splits: ``x_*`` float32 (N, 1, 8, 8) in [0, 1], ``y_*`` int64 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """Return a stratified 60/20/20 train/validation/test split of the 1797 digits.

    Each class's samples are permuted with ``numpy.random.default_rng(seed)`` and
    cut into ``round(0.6 n)`` train, ``round(0.2 n)`` validation and the rest test;
    each split is then shuffled with the same generator. The result depends only
    on ``seed`` (seed 0 gives 1078 / 359 / 360 samples).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(digits.target, dtype=np.int64)

    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_train = round(_TRAIN_FRACTION * idx.size)
        n_val = round(_VAL_FRACTION * idx.size)
        for part, chunk in zip(parts, np.split(idx, [n_train, n_train + n_val]), strict=True):
            part.append(chunk)
    train, val, test = (rng.permutation(np.concatenate(part)) for part in parts)
    return DigitsSplits(
        x_train=x[train],
        y_train=y[train],
        x_val=x[val],
        y_val=y[val],
        x_test=x[test],
        y_test=y[test],
    )


def augmented_copy(
    x: np.ndarray, y: np.ndarray, copies: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``copies`` perturbed copies of ``(x, y)``, stacked copy after copy.

    Each image is shifted by a random integer of -1, 0 or +1 pixels along each
    axis (vacated pixels are zero, nothing wraps around), then Gaussian noise of
    standard deviation 0.05 is added and the result is clipped to [0, 1].
    ``x`` must have shape (N, 1, 8, 8). The output is float32 of shape
    (copies * N, 1, 8, 8) with labels ``np.tile(y, copies)`` (int64), so copy
    ``k`` of sample ``i`` is at row ``k * N + i``. The same arguments always give
    the same result.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise OptionError(f"x must have shape (N, 1, 8, 8), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise OptionError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if copies < 1:
        raise OptionError(f"copies must be >= 1, got {copies}")

    rng = np.random.default_rng(seed)
    base = np.tile(x, (copies, 1, 1, 1))
    shifts = rng.integers(-1, 2, size=(base.shape[0], 2))
    padded = np.pad(base, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.empty_like(base)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            # out[i, j] = x[i - dy, j - dx]: content moves by (dy, dx).
            out[sel] = padded[sel, :, 1 - dy : 9 - dy, 1 - dx : 9 - dx]
    out += rng.normal(0.0, _NOISE_STD, size=out.shape).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out, np.tile(y, copies)
