"""Compile a Relax module for a deployment target and export it as a library, untuned.

:func:`build` applies the best schedules TVM gives without tuning, compiles with
:func:`tvm.compile` and exports ``.so`` (linked with the config's cross compiler and its
options) or ``.tar`` (objects only, no toolchain needed), written atomically. With
``trials > 0`` it tunes first (:mod:`.tune`) and compiles with the tuned schedules.

Next to the artifact goes its input signature, ``<artifact>.json`` (``model.so.json``):
names, shapes and dtypes of ``main``'s parameters, and the artifact's sha256, so that
``tvm-qmfrg bench`` needs no ``--input-shape`` (:func:`read_signature`). It is written
atomically after the artifact; a stale one is removed first, so a crash in between leaves an
artifact without a signature, never one with another build's.

TVM failures raise :class:`~tvm_qmfrg.errors.BuildError`, failed links
:class:`~tvm_qmfrg.errors.ToolchainError` (one line each, via :func:`.translate.translate_errors`).

Untuned schedules per target kind (``relax.get_default_pipeline(target)``):

* GPU targets (CUDA, OpenCL): legalize, fuse, then dlight's default GPU rules
  (``Matmul``, ``GEMV``, ``Reduction``, ``GeneralReduction``, ``Fallback``), which bind
  threads; Adreno first tries its own ``Conv2d``/``LayoutTransform``/``Pool2D`` rules.
* CPU targets (llvm): legalize and fuse elementwise epilogues into their producers
  (``FuseOps``/``FuseTIR``), no thread binding or vectorization. dlight's CPU rules
  (``dl.cpu.GEMV``, ``dl.cpu.Reduction``) are not applied: they match only GEMV and
  reductions (never conv2d), and on small models their thread-pool launches cost more than
  they save (measured on a 2-core x86 host: small_cnn 0.047 -> 0.060 ms, bert_encoder
  0.06 -> 0.23 ms, digits_resnet unchanged; only a 4096-wide MLP gained, 227 -> 184 ms).
  Fusion itself gains little untuned (digits_resnet 1.41 -> 1.39 ms): the naive conv loops
  dominate until MetaSchedule tunes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm_qmfrg.errors import BuildError, ModelError, OptionError, ToolchainError
from tvm_qmfrg.report import write_atomic

from .artifact import (
    cross_fcompile,
    debian_packages,
    input_signature,
    sha256_file,
    signature_path,
)
from .config import TargetConfig, load
from .translate import translate_errors

logger = logging.getLogger(__name__)
_WARNED_UNTUNED: set[tuple[str, str]] = set()  # (model, target) untuned builds announced

# Measured on this project's machine kind (TVM-NOTES.md): ResNet-18, 2-core x86 host.
UNTUNED_NOTE = (
    "untuned TVM code is typically 8-50x slower than tuned code (ResNet-18 on a 2-core "
    "x86 host: 1.86 s untuned vs 38.6 ms after 608 MetaSchedule trials)"
)


@dataclass(frozen=True)
class Artifact:
    """An exported deployment library.

    ``executable`` is the in-memory :class:`tvm.relax.Executable` the file was written from
    (for inspection: device modules, kernel source); it is not part of equality.
    """

    path: Path
    target: str
    format: str
    tuned: bool
    executable: Any = field(default=None, compare=False, repr=False)


def _as_config(config: TargetConfig | str | os.PathLike) -> TargetConfig:
    return config if isinstance(config, TargetConfig) else load(config)


def untuned_pipeline(target):
    """The Relax pipeline with TVM's best untuned schedules for ``target`` (see module doc)."""
    from tvm import relax

    try:
        return relax.get_default_pipeline(target)
    except ValueError:  # a kind TVM has no backend pipeline for: plain lowering
        logger.debug("no default pipeline for %s; using the generic build pipeline", target)
        return relax.get_pipeline("default")


def compile_tuned(
    mod,
    config: TargetConfig | str | os.PathLike,
    work_dir,
    *,
    model="model",
    prepared=False,
    shape_bindings: Mapping[str, int] | None = None,
):
    """Apply ``work_dir``'s database to ``mod`` and compile it; returns the Relax Executable."""
    import tvm

    from .tune import apply_database

    config = config if isinstance(config, TargetConfig) else load(config)
    target = config.tvm_target()
    with translate_errors(model, f"TVM failed to compile it for {config.name}", BuildError):
        tuned = apply_database(
            mod, config, work_dir, prepared=prepared, shape_bindings=shape_bindings, model=model
        )
        return tvm.compile(tuned, target=target, relax_pipeline=untuned_pipeline(target))


def compile_module(mod, config: TargetConfig | str | os.PathLike, *, model: str = "model"):
    """Compile ``mod`` for ``config`` with untuned schedules; returns the Relax Executable.

    Logs a warning that the result is untuned, once per model, target and process.
    """
    import tvm

    config = _as_config(config)
    if not isinstance(mod, tvm.IRModule):
        raise ModelError(f"{model}: expected a tvm.IRModule, got {type(mod).__name__}")
    target = config.tvm_target()
    if (model, config.name) not in _WARNED_UNTUNED:
        _WARNED_UNTUNED.add((model, config.name))
        logger.warning(
            "%s: building for %s without tuning; %s. Tune before comparing latency "
            "(suggested budget for %s: %d trials, %d per task).",
            model,
            config.name,
            UNTUNED_NOTE,
            config.name,
            config.tuning.trials,
            config.tuning.trials_per_task,
        )
    with translate_errors(model, f"TVM failed to compile it for {config.name}", BuildError):
        return tvm.compile(mod, target=target, relax_pipeline=untuned_pipeline(target))


def _fcompile(config: TargetConfig):
    """The ``export_library`` fcompile for ``config`` (``None``: TVM's host default)."""
    from tvm.support import cc

    compiler = config.cross_compiler
    if compiler is None:
        compiler = cc.get_cc() or "g++"  # what export_library uses: $CXX, $CC or PATH
        program = shlex.split(compiler)[0]
        fcompile = None
    else:
        program = compiler  # already split from its options when the config was loaded
        fcompile = cross_fcompile(compiler, config.compiler_options)
    if shutil.which(program) is None:
        packages = debian_packages(compiler)
        hint = f"; on Debian/Ubuntu: apt-get install -y {packages}" if packages else ""
        raise ToolchainError(
            f"{config.name}: exporting a .so needs the compiler '{compiler}', which is not on "
            f'PATH{hint} (or set format = "tar" in the target config and link on the device)'
        )
    return fcompile


def _default_output(config: TargetConfig, work_dir: Path | None) -> Path:
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix=f"tvm_qmfrg-{config.name}-"))
        logger.info("%s: no output or work_dir given; writing under %s", config.name, work_dir)
    return work_dir / f"{config.name}.{config.format}"


def export(
    executable,
    config: TargetConfig | str | os.PathLike,
    output: str | os.PathLike,
    *,
    inputs: list[dict] | None = None,
):
    """Write ``executable`` to ``output`` in the config's format, atomically.

    ``inputs`` (see :func:`input_signature`) is written to ``<output>.json`` after it; without
    it, a signature left by an earlier build of ``output`` is removed.
    """
    config = _as_config(config)
    output = Path(output)
    if output.suffix != f".{config.format}":
        raise OptionError(
            f"{config.name}: output {output} must end in .{config.format} (the config's format)"
        )
    fcompile = _fcompile(config) if config.format == "so" else None
    sig = signature_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private directory next to the output, then rename: readers never see a
    # partial file, and the file gets the usual permissions (mkstemp's would be 0600).
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        workspace = staging / "objects"
        workspace.mkdir()
        kwargs = {"workspace_dir": str(workspace)}
        if fcompile is not None:
            kwargs["fcompile"] = fcompile
        tmp = staging / output.name
        with translate_errors(config.name, f"exporting {output.name} failed", ToolchainError):
            executable.export_library(str(tmp), **kwargs)
            if not tmp.is_file():
                raise FileNotFoundError(f"the compiler wrote no {output.name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sig)  # never leave another build's signature next to the new artifact
        os.replace(tmp, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if inputs is not None:
        record = {"artifact": output.name, "sha256": sha256_file(output), "inputs": inputs}
        write_atomic(sig, (json.dumps(record, indent=1) + "\n").encode())
    return output


def build(
    mod,
    config: TargetConfig | str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    model: str = "model",
    trials: int = 0,
    trials_per_task: int | None = None,
    tracker: str | None = None,
    shape_bindings: Mapping[str, int] | None = None,
    **tune_options,
) -> Artifact:
    """Compile ``mod`` for ``config`` without tuning and export it; returns the :class:`Artifact`.

    ``config`` is a :class:`TargetConfig` or anything :func:`load` accepts. ``output``
    defaults to ``<work_dir>/<target>.<format>``; with neither given, a fresh temporary
    directory holds it. The file is written to a temporary name and renamed into place.
    ``model`` names the model in messages.

    With ``trials > 0`` the module is tuned first with MetaSchedule
    (:func:`~tvm_qmfrg.targets.tune.tune`: ``trials_per_task`` defaults to the config's,
    ``tracker`` is the RPC tracker ``host:port`` for RPC runners, other keyword options go to
    ``tune``); the JSON database lives in ``work_dir`` (required then) and is reused by later
    runs. Tuning needs static shapes: symbolic dimensions are bound from ``shape_bindings``
    (name -> size), else to 1, and the tuned library takes those shapes. The best schedules
    are applied and the result is compiled and exported as above, with ``Artifact.tuned`` set.
    A tuning run holds ``work_dir`` (:func:`~tvm_qmfrg.targets.tune.work_dir_lock`): a second
    one at the same time fails at once. The input signature goes to ``<output>.json``.
    """
    config = _as_config(config)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    out = Path(output) if output is not None else _default_output(config, work)
    if out.suffix != f".{config.format}":
        raise OptionError(
            f"{config.name}: output {out} must end in .{config.format} (the config's format)"
        )
    if config.format == "so":
        _fcompile(config)  # fail on a missing toolchain before spending time compiling
    if trials < 0:
        raise OptionError(f"trials must be >= 0, got {trials}")
    if trials > 0:
        from .tune import prepare, tune, work_dir_lock

        if work is None:
            raise OptionError(f"{model}: tuning needs a work_dir for its database")
        with work_dir_lock(work, model=model):
            with translate_errors(model, f"preparing it for {config.name}", BuildError):
                legal = prepare(
                    mod, config.tvm_target(), shape_bindings=shape_bindings, model=model
                )
            tune(
                legal,
                config,
                work_dir=work,
                trials=trials,
                trials_per_task=trials_per_task,
                tracker=tracker,
                model=model,
                prepared=True,
                **tune_options,
            )
            executable = compile_tuned(legal, config, work, model=model, prepared=True)
        signed = legal
    else:
        executable = compile_module(mod, config, model=model)
        signed = mod
    export(executable, config, out, inputs=input_signature(signed))
    logger.info(
        "%s: wrote %s for %s (%s)", model, out, config.name, "tuned" if trials else "untuned"
    )
    return Artifact(
        path=out,
        target=config.name,
        format=config.format,
        tuned=trials > 0,
        executable=executable,
    )
