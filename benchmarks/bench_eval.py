"""The full criteria grid of ``tvm-qmfrg eval`` on both real models, into the repo.

Digits ResNet (accuracy) and all-MiniLM-L6-v2 (embedding fidelity) at FLOPs reductions
20..70 %, criteria qmfrg, qmfrg+cal, spectral, magnitude, random (3 seeds) and fpgm, plus
50 % FFN-neuron pruning of MiniLM. About 40 minutes on a 2-core machine (the MiniLM
calibration runs the dense encoder through an untuned TVM build). Run from the repository
root::

    .venv/bin/python benchmarks/bench_eval.py [--out benchmarks/results/eval]
"""

from __future__ import annotations

import argparse
import sys

from tvm_qmfrg.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/eval")
    args = parser.parse_args()
    sys.exit(main(["eval", "--out", args.out]))
