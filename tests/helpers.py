"""Shared helpers for the TVM-side tests: compile and run a module on the real VM."""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm_qmfrg.passes.importer import import_onnx

HOST = tvm.target.Target({"kind": "llvm"})


def input_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def random_input(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(input_shape(model)).astype(np.float32)


def compiled(mod: tvm.IRModule):
    """Compile once; return ``f(x) -> numpy output`` running on the VM."""
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    return lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    return compiled(mod)(x)


def load(model: onnx.ModelProto) -> tvm.IRModule:
    return import_onnx(model)
