"""One exception family for the whole toolkit.

Every error a user can cause (bad model file, unusable weights, out-of-range option,
graph the pass cannot handle, a build TVM rejects, a board that does not answer) is a
:class:`QMFRGError`; the CLI turns it into one readable line and a non-zero exit code.
Messages name the model, the node and the reason.
"""

from __future__ import annotations

import numpy as np


class QMFRGError(Exception):
    """Base class of every error raised on purpose by tvm_qmfrg."""


class ModelError(QMFRGError):
    """The model file is missing, unreadable, not ONNX, or structurally invalid."""


class WeightError(QMFRGError, ValueError):
    """A weight tensor is empty, all zero, or holds NaN/Inf."""


class OptionError(QMFRGError, ValueError):
    """An option is out of range or unknown."""


class GraphError(QMFRGError):
    """The graph has a form the pass cannot handle (e.g. dynamic shapes)."""


class ToolchainError(QMFRGError):
    """A compiler or linker an export needs is not installed, or it failed."""


class BuildError(QMFRGError):
    """TVM failed to compile a module for a target, or MetaSchedule failed to tune it."""


class DeviceError(QMFRGError):
    """An RPC server or tracker is unreachable or does not answer, or no board has the key."""


def one_line(exc: BaseException, *, last: bool = False, limit: int = 300) -> str:
    """The first (or ``last``) non-empty line of an exception's message, at most ``limit``
    characters; the exception's type name when the message is empty. TVM puts the reason on
    the last line of a traceback-shaped message, most libraries on the first."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]


def check_weight(array: np.ndarray, what: str, *, allow_zero: bool = False) -> np.ndarray:
    """Return ``array`` as float64 after checking it is usable as an operator weight.

    Raises :class:`WeightError` naming ``what`` when the array is empty, holds NaN/Inf,
    or (unless ``allow_zero``) is all zero.
    """
    arr = np.asarray(array, dtype=np.float64)
    if arr.size == 0:
        raise WeightError(f"{what} is empty (shape {tuple(arr.shape)})")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise WeightError(f"{what} holds {bad} NaN/Inf value(s)")
    if not allow_zero and not np.any(arr):
        raise WeightError(f"{what} is all zero, so it has no spectrum")
    return arr
