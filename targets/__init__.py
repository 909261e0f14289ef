"""Deployment targets of tvm_qmfrg: per-board configs, tuning, export and RPC benchmarking.

``load("arm-rk3399")`` (or a path to your own ``.toml``) gives a validated
:class:`TargetConfig`; ``available()`` lists the shipped ones; ``build(mod, config)``
compiles a Relax module for it (untuned, or MetaSchedule-tuned with ``trials=N``) and
exports an :class:`Artifact`; :mod:`.rpc` runs and times artifacts on boards over TVM RPC.
TVM failures raise :class:`BuildError`, boards that cannot be reached :class:`DeviceError`
(one line each, translated by :func:`.translate.translate_errors`).
"""

from tvm_qmfrg.errors import BuildError, DeviceError

from .build import Artifact, ToolchainError, build, compile_module, export
from .config import TargetConfig, available, load
from .tune import TuneProgress, TuneSummary, tune

__all__ = [
    "Artifact",
    "BuildError",
    "DeviceError",
    "TargetConfig",
    "ToolchainError",
    "available",
    "build",
    "compile_module",
    "export",
    "load",
    "tune",
    "TuneProgress",
    "TuneSummary",
]
