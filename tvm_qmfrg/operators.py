"""LinearOperator: one constant-weight linear operator of a model, as numpy data.

Read from ONNX by :func:`tvm_qmfrg.onnxio.reader.linear_operators`; what ``analyze`` and
``compare`` place on the hypersphere. No ONNX or TVM here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spectral import channel_states, operator_spectrum


@dataclass(frozen=True)
class LinearOperator:
    """One constant-weight Conv/Gemm/MatMul node, its epilogue folded in.

    ``weight`` is ``(out, in)`` for dense kinds and ``(O, I/g, *k)`` for conv, always in the
    ``y = W x`` convention; ``bias`` is ``(out,)``, already including folded BatchNorm.
    """

    name: str
    op_type: str
    kind: str  # "conv" or "dense"
    weight: np.ndarray
    bias: np.ndarray
    groups: int
    folded: tuple[str, ...]  # names of the nodes folded into this operator

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def spectrum(self) -> np.ndarray:
        """Normalized spectrum ``psi`` of the augmented operator matrix."""
        return operator_spectrum(self.weight, self.bias, groups=self.groups, name=self.name)

    def channel_states(self) -> np.ndarray:
        """``(out, D + 1)`` channel states ``[w_j ; b_j]``."""
        return channel_states(self.weight, self.bias)
