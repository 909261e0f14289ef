"""tvm_qmfrg: spectral-geometry structured pruning and operator substitution for Apache TVM.

The core (``spectral``, ``metrics``, ``graph``, ...) is numpy/scipy only. The TVM side lives
in :mod:`tvm_qmfrg.passes` and :mod:`tvm_qmfrg.targets`, imported on first attribute access
so that ``import tvm_qmfrg`` stays cheap and TVM-free.
"""

from __future__ import annotations

import importlib

from .errors import (
    BuildError,
    DeviceError,
    GraphError,
    ModelError,
    OptionError,
    QMFRGError,
    ToolchainError,
    WeightError,
)

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "DeviceError",
    "GraphError",
    "ModelError",
    "OptionError",
    "QMFRGError",
    "ToolchainError",
    "WeightError",
    "__version__",
]

_LAZY = ("passes", "targets")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tvm_qmfrg' has no attribute {name!r}")
