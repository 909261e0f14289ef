"""ONNX in, ONNX out: the path a user's exported model takes through the pruning pass.

    imported = import_model(onnx.load("model.onnx"), {"images": [1, 3, 640, 640]})
    plan, pruned = prune_module(imported.mod, flops_reduction=0.3, model=imported.name)
    onnx.save(export_model(imported, pruned), "pruned.onnx")

:func:`import_model` prepares the model (:mod:`tvm_qmfrg.onnxio.prepare`: shape chains
folded, inputs static, node names unique), imports it with the naming importer and
normalizes it. :func:`export_model` patches the prepared graph with what the pass changed
(:mod:`.onnx_patch`) and checks it in onnxruntime against the pruned module compiled by TVM
for this host, so a model that is written computes what TVM computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from tvm_qmfrg.onnxio.prepare import PreparedModel, prepare
from tvm_qmfrg.onnxio.runtime import random_inputs

from .importer import import_onnx
from .normalize import normalize
from .onnx_patch import check_against, patch_onnx

log = logging.getLogger(__name__)

HOST = {"kind": "llvm"}


@dataclass
class ImportedModel:
    """A prepared ONNX model and its normalized Relax module (bindings named by node)."""

    prepared: PreparedModel
    mod: tvm.IRModule

    @property
    def name(self) -> str:
        return self.prepared.name

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return self.prepared.input_shapes


def import_model(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    *,
    name: str | None = None,
    dim_sizes: dict[str, int] | None = None,
) -> ImportedModel:
    """Prepare, import and normalize ``model`` (see module doc).

    Parameters
    ----------
    model
        The exporter's ONNX model.
    input_shapes
        Static sizes by input name (a symbolic leading dim defaults to 1).
    name
        Name used in messages and plans (default: the graph's name).
    dim_sizes
        Sizes of symbolic dims by name (``{"batch": 8}``).
    """
    prepared = prepare(model, input_shapes, name=name, dim_sizes=dim_sizes)
    mod = import_onnx(prepared.model, prepared.input_shapes)
    return ImportedModel(prepared, normalize(mod, model=prepared.name))


def host_runner(mod: tvm.IRModule, input_names: list[str]):
    """Compile ``mod`` for this host; ``f(inputs by name) -> list of numpy outputs``."""
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(HOST)), tvm.cpu())

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = vm["main"](*[tvm.runtime.tensor(inputs[n]) for n in input_names])
        if isinstance(out, tvm.runtime.Tensor):
            return [out.numpy()]
        return [o.numpy() for o in out]

    return run


def sample_inputs(imported: ImportedModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the model's static shapes and dtypes (:func:`random_inputs`)."""
    return random_inputs(imported.prepared.model, imported.input_shapes, seed)


def export_model(
    imported: ImportedModel,
    pruned: tvm.IRModule,
    *,
    check: bool = True,
    rtol: float = 1e-4,
) -> onnx.ModelProto:
    """The prepared graph patched with ``pruned``'s changes; checked against TVM if ``check``.

    Raises :class:`~tvm_qmfrg.errors.GraphError` when a change cannot be written back, or
    when onnxruntime rejects the result or computes something else than TVM.
    """
    out = patch_onnx(imported.prepared.model, imported.mod, pruned, model=imported.name)
    if check:
        names = list(imported.input_shapes)
        err = check_against(
            out,
            host_runner(pruned, names),
            sample_inputs(imported),
            model=imported.name,
            rtol=rtol,
        )
        log.info(
            "%s: exported ONNX matches TVM (max error %.1e of the output scale)", imported.name, err
        )
    return out
