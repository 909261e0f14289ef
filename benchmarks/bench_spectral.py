"""Speed of the spectral core against its floor, the bare numpy GEMM of the same size.

Measures, in one run on this machine:

1. exact pairwise Fubini–Study distances of a 4096-channel layer of dimension 4608
   (a 512x3x3 conv's filters) versus ``X @ X.T`` of the same shape and dtype;
2. the kNN QM-FRG of 16384 channels versus the same bare GEMM (16384 x 16384, the full
   matrix the kNN build never holds), with the peak memory the build allocated.

Run from the repository root::

    .venv/bin/python benchmarks/bench_spectral.py [--out benchmarks/results/spectral.json]

Each figure is the best of ``--repeat`` runs (the floor too); the ratio is ours / floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc

import numpy as np

from tvm_qmfrg.graph import build_graph
from tvm_qmfrg.metrics import pairwise_fubini_study
from tvm_qmfrg.report import write_json


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_pairwise(n: int, d: int, dtype, repeat: int, rng) -> dict:
    x = rng.standard_normal((n, d)).astype(dtype)
    floor = best_time(lambda: x @ x.T, repeat)
    ours = best_time(lambda: pairwise_fubini_study(x, dtype=dtype), repeat)
    return {
        "case": "pairwise_fs_exact",
        "n": n,
        "dim": d,
        "dtype": np.dtype(dtype).name,
        "seconds": ours,
        "gemm_floor_seconds": floor,
        "ratio": ours / floor,
    }


def bench_knn(n: int, d: int, k: int, dtype, repeat: int, rng) -> dict:
    x = rng.standard_normal((n, d)).astype(dtype)
    floor = best_time(lambda: x @ x.T, repeat)
    ours = best_time(lambda: build_graph(x, k=k, dtype=dtype), repeat)
    tracemalloc.start()
    graph = build_graph(x, k=k, dtype=dtype)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_bytes = n * n * np.dtype(dtype).itemsize
    return {
        "case": "qmfrg_knn",
        "n": n,
        "dim": d,
        "k": k,
        "dtype": np.dtype(dtype).name,
        "seconds": ours,
        "gemm_floor_seconds": floor,
        "ratio": ours / floor,
        "edges": graph.num_edges,
        "peak_alloc_bytes": peak,
        "full_matrix_bytes": full_bytes,
        "peak_over_full_matrix": peak / full_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/spectral.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--knn-dim", type=int, default=4608)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for dtype in (np.float64, np.float32):
        rows.append(bench_pairwise(4096, 4608, dtype, args.repeat, rng))
        print(json.dumps(rows[-1]))
    rows.append(bench_knn(16384, args.knn_dim, 8, np.float32, args.repeat, rng))
    print(json.dumps(rows[-1]))
    write_json(
        args.out,
        {
            "command": "python benchmarks/bench_spectral.py",
            "machine": {"cpu": platform.processor() or platform.machine(), "numpy": np.__version__},
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
