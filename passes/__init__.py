"""TVM side of tvm_qmfrg: Relax module passes that apply pruning and substitution plans.

Importing this package registers the toolkit's exceptions with TVM's FFI, so an error raised
inside a pass reaches the caller as the same :class:`~tvm_qmfrg.errors.QMFRGError` subclass
instead of a generic ``RuntimeError``.
"""

import tvm_ffi

from tvm_qmfrg import errors as _errors

for _cls in (
    _errors.QMFRGError,
    _errors.ModelError,
    _errors.WeightError,
    _errors.OptionError,
    _errors.GraphError,
    _errors.BuildError,
    _errors.DeviceError,
):
    tvm_ffi.register_error(_cls.__name__, _cls)

from .onnx_export import export_onnx  # noqa: E402
from .onnx_io import export_model, import_model  # noqa: E402
from .prune import (  # noqa: E402
    ApplyPruningPlan,
    QMFRGPrune,
    apply_plan,
    plan_pruning,
    prune_module,
)
from .substitute import SpectralSubstitution, substitute_module  # noqa: E402

__all__ = [
    "ApplyPruningPlan",
    "QMFRGPrune",
    "export_model",
    "import_model",
    "SpectralSubstitution",
    "apply_plan",
    "export_onnx",
    "plan_pruning",
    "prune_module",
    "substitute_module",
]
