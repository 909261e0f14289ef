"""Model-level spectral analysis: what ``tvm-qmfrg analyze`` reports.

Per operator: its normalized spectrum ``psi`` (augmented matrix, epilogue folded), the
effective rank ``exp(H(psi^2))``, the stable rank ``||A||_F^2 / ||A||_2^2``, its nearest other
operator by Fubini–Study and by Wasserstein-2 distance, and how many pairs of its output
channels lie within ``epsilon`` of each other (counted inside each conv group only: channels
of different groups read different inputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import OptionError
from .metrics import pairwise_fubini_study, pairwise_wasserstein2
from .operators import LinearOperator
from .spectral import effective_rank, pad_spectra, stable_rank


@dataclass(frozen=True)
class OperatorSummary:
    name: str
    op_type: str
    kind: str
    shape: tuple[int, ...]
    groups: int
    spectrum_length: int
    effective_rank: float
    stable_rank: float
    nearest_fs: str | None
    fs_distance: float | None
    nearest_w2: str | None
    w2_distance: float | None
    channels: int
    channel_pairs: int
    close_pairs: int


@dataclass(frozen=True)
class ModelAnalysis:
    model: str
    epsilon: float
    operators: list[OperatorSummary]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "epsilon": self.epsilon,
            "operators": [asdict(op) for op in self.operators],
        }


def close_channel_pairs(op: LinearOperator, epsilon: float) -> tuple[int, int]:
    """``(pairs within epsilon, all pairs)`` of output channels in the same group."""
    states = op.channel_states()
    per_group = states.shape[0] // op.groups
    close = total = 0
    for g in range(op.groups):
        block = states[g * per_group : (g + 1) * per_group]
        nonzero = block[np.linalg.norm(block, axis=1) > 0]
        n = nonzero.shape[0]
        total += per_group * (per_group - 1) // 2
        if n > 1:
            d = pairwise_fubini_study(nonzero)
            close += int(np.count_nonzero(np.triu(d <= epsilon, 1)))
    return close, total


def analyze_operators(
    operators: list[LinearOperator], model: str, epsilon: float = 0.05
) -> ModelAnalysis:
    """Summaries of ``operators``; ``epsilon`` (radians) sets what counts as a close pair."""
    if not 0 <= epsilon <= np.pi / 2:
        raise OptionError(f"epsilon={epsilon} is outside [0, pi/2]")
    spectra = [op.spectrum() for op in operators]
    n = len(operators)
    fs = pairwise_fubini_study(pad_spectra(spectra)) if n else np.zeros((0, 0))
    w2 = pairwise_wasserstein2(spectra) if n else np.zeros((0, 0))
    np.fill_diagonal(fs, np.inf)
    np.fill_diagonal(w2, np.inf)
    out = []
    for i, (op, psi) in enumerate(zip(operators, spectra)):
        j_fs = int(np.argmin(fs[i])) if n > 1 else None
        j_w2 = int(np.argmin(w2[i])) if n > 1 else None
        close, total = close_channel_pairs(op, epsilon)
        out.append(
            OperatorSummary(
                name=op.name,
                op_type=op.op_type,
                kind=op.kind,
                shape=tuple(int(d) for d in op.weight.shape),
                groups=op.groups,
                spectrum_length=int(psi.size),
                effective_rank=effective_rank(psi),
                stable_rank=stable_rank(psi),
                nearest_fs=None if j_fs is None else operators[j_fs].name,
                fs_distance=None if j_fs is None else float(fs[i, j_fs]),
                nearest_w2=None if j_w2 is None else operators[j_w2].name,
                w2_distance=None if j_w2 is None else float(w2[i, j_w2]),
                channels=op.out_channels,
                channel_pairs=total,
                close_pairs=close,
            )
        )
    return ModelAnalysis(model=model, epsilon=float(epsilon), operators=out)
