"""Cross-model operator comparison: what ``tvm-qmfrg compare A.onnx B.onnx`` reports.

The operators of two models are placed on one hypersphere (normalized augmented spectra,
zero-padded) and the closest cross-model pairs are listed by Fubini–Study and Wasserstein-2
distance. Spectral closeness is only a necessary condition for functional equivalence, so
each listed pair also gets the direct check in the network's own basis,
``||W_b - c W_a||_F <= delta ||W_b||_F`` — which only operators of one shape can pass. This
is the honest form of "cross-modal operator substitutability".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .metrics import best_scale, pairwise_fubini_study, wasserstein2
from .operators import LinearOperator
from .report import format_table
from .spectral import pad_spectra


@dataclass(frozen=True)
class OperatorPair:
    a: str
    b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    fs: float
    w2: float
    verdict: str  # "equivalent (c = ...)" | "differs (residual ...)" | "shapes differ"


def compare_operators(
    ops_a: list[LinearOperator], ops_b: list[LinearOperator], top: int = 10, delta: float = 1e-3
) -> list[OperatorPair]:
    """The ``top`` closest cross-model pairs by ``d_FS``, each with W2 and the direct check."""
    spec_a = [op.spectrum() for op in ops_a]
    spec_b = [op.spectrum() for op in ops_b]
    padded = pad_spectra(spec_a + spec_b)
    d = pairwise_fubini_study(padded[: len(ops_a)], padded[len(ops_a) :])
    order = np.argsort(d, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), len(ops_b))
        a, b = ops_a[i], ops_b[j]
        # compare as matrices (out x in*k): a 1x1 conv and a dense layer can be equivalent
        wa = np.concatenate([a.weight.reshape(a.out_channels, -1), a.bias[:, None]], axis=1)
        wb = np.concatenate([b.weight.reshape(b.out_channels, -1), b.bias[:, None]], axis=1)
        if wa.shape != wb.shape:
            verdict = "shapes differ"
        else:
            c, residual = best_scale(wa, wb)
            verdict = (
                f"equivalent (c = {c:.4g})"
                if residual <= delta
                else f"differs (residual {residual:.3g})"
            )
        pairs.append(
            OperatorPair(
                a.name,
                b.name,
                tuple(a.weight.shape),
                tuple(b.weight.shape),
                float(d[i, j]),
                wasserstein2(spec_a[i], spec_b[j]),
                verdict,
            )
        )
    return pairs


def pairs_table(pairs: list[OperatorPair]) -> str:
    rows = [
        [
            p.a,
            "x".join(map(str, p.shape_a)),
            p.b,
            "x".join(map(str, p.shape_b)),
            p.fs,
            p.w2,
            p.verdict,
        ]
        for p in pairs
    ]
    return format_table(
        ["operator A", "shape", "operator B", "shape", "d_FS", "W2", "direct check"], rows
    )


def pairs_json(pairs: list[OperatorPair]) -> list[dict]:
    return [asdict(p) for p in pairs]
