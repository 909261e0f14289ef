"""The QM-FRG: exact and kNN builds, components, clusters."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_qmfrg import OptionError
from tvm_qmfrg.graph import build_graph
from tvm_qmfrg.metrics import pairwise_fubini_study


def edge_set(g):
    return {(int(r), int(c)): float(w) for r, c, w in zip(g.rows, g.cols, g.weights)}


@given(st.integers(2, 40), st.integers(2, 12), st.integers(1, 6), st.integers(0, 10_000))
def test_knn_build_equals_exact_build(n, d, k, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))  # no distance ties, almost surely
    exact = build_graph(x, k=k, epsilon=0.3)
    blocked = build_graph(x, k=k, epsilon=0.3, exact_limit=1, block_bytes=8 * 7**2)  # 7x7 blocks
    a, b = edge_set(exact), edge_set(blocked)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6)
    assert all(r < c for r, c in a)
    dist = pairwise_fubini_study(x)
    for i in range(n):  # every node keeps an edge to each of its k nearest neighbours
        for j in np.argsort(dist[i] + np.diag(np.full(n, np.inf))[i])[: min(k, n - 1)]:
            assert (min(i, j), max(i, j)) in a


def test_knn_build_keeps_exact_duplicates():
    x = np.random.default_rng(1).standard_normal((50, 5))
    x[30] = -0.5 * x[3]
    g = build_graph(x, k=1, exact_limit=1, block_bytes=8 * 8**2)
    assert edge_set(g)[(3, 30)] == pytest.approx(0.0, abs=1e-6)
    assert g.components()[3] == g.components()[30]


def test_threshold_edges_and_components():
    base = np.eye(4)
    x = np.vstack([base[0], 2 * base[0], base[1], -base[1], base[2], base[3]])
    g = build_graph(x, epsilon=1e-6)
    assert set(edge_set(g)) == {(0, 1), (2, 3)}
    np.testing.assert_array_equal(g.components(), [0, 0, 1, 1, 2, 3])
    nearest, dist = g.nearest()
    assert list(nearest) == [1, 0, 3, 2, -1, -1]
    assert dist[0] == pytest.approx(0.0, abs=1e-7) and np.isinf(dist[4])


def test_single_linkage_clusters_merge_nearest_first():
    angles = np.array([0.0, 0.01, 0.5, 0.52, 1.2])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    g = build_graph(x, k=4)
    np.testing.assert_array_equal(g.clusters(5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(g.clusters(4), [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(g.clusters(3), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(g.clusters(2), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(g.clusters(1), [0, 0, 0, 0, 0])


def test_clusters_respect_disconnected_components():
    x = np.eye(3)
    g = build_graph(x, epsilon=0.1)
    assert g.num_edges == 0
    np.testing.assert_array_equal(g.clusters(1), [0, 1, 2])


def test_build_is_deterministic():
    x = np.random.default_rng(5).standard_normal((300, 16))
    a = build_graph(x, k=5, exact_limit=10, block_bytes=8 * 64**2)
    b = build_graph(x, k=5, exact_limit=10, block_bytes=8 * 64**2)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.weights, b.weights)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs epsilon, k, or both"),
        ({"epsilon": 2.0}, "outside"),
        ({"k": 0}, "k=0"),
        ({"epsilon": 0.1, "exact_limit": 2}, "pass k"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        build_graph(np.eye(3), **kwargs)
