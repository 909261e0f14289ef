"""Module passes that refuse anything but an ``IRModule`` with a clear error.

TVM's pass machinery answers a wrong argument with an FFI ``TypeError`` about
``RValueRef<ir.IRModule>``; :func:`checks_its_input` makes the call say what was expected.
"""

from __future__ import annotations

import tvm

from tvm_qmfrg.errors import OptionError


def checks_its_input(pass_cls):
    """Class decorator (outside ``@tvm.transform.module_pass``): calling the pass with
    something other than a ``tvm.IRModule`` raises :class:`OptionError` naming the pass."""
    run = pass_cls.__call__
    name = pass_cls.__name__

    def __call__(self, mod, *args, **kwargs):
        if not isinstance(mod, tvm.IRModule):
            raise OptionError(
                f"{name}: expected a tvm.IRModule (e.g. from import_model or from_onnx), "
                f"got {type(mod).__name__}"
            )
        return run(self, mod, *args, **kwargs)

    pass_cls.__call__ = __call__
    return pass_cls
