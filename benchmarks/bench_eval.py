"""The criteria grid of ``tvm-qmfrg eval`` on both real models, into the repo.

Digits ResNet (accuracy) and all-MiniLM-L6-v2 (embedding fidelity, paraphrase retrieval) at
the FLOPs reductions of the calibrated-pruning targets (30, 50, 60 %): data-free qmfrg, the
magnitude baseline and calibrated qmfrg (``qmfrg+cal``), plus one ablation row per part of
calibrated pruning at 30 % (``qmfrg+cal-X``). About 30 minutes on a 2-core machine (the
MiniLM rows dominate). Run from the repository root::

    .venv/bin/python benchmarks/bench_eval.py [--out benchmarks/results/eval]

The full data-free criteria grid (20..70 %, every criterion) is ``tvm-qmfrg eval`` with its
defaults (about an hour).
"""

from __future__ import annotations

import argparse
import sys

from tvm_qmfrg.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/eval")
    args = parser.parse_args()
    sys.exit(
        main(
            [
                "eval",
                "--reductions",
                "0.3,0.5,0.6",
                "--criteria",
                "qmfrg,qmfrg+cal,magnitude",
                "--seeds",
                "1",
                "--models",
                "digits,minilm",
                "--ffn-sparsity",
                "",
                "--ablations",
                "select,refit,seq,resid,sens,ridge",
                "--ablation-reductions",
                "0.3",
                "--out",
                args.out,
            ]
        )
    )
