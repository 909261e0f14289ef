"""QM-FRG: the Quantum Metric-Driven Functional Redundancy Graph.

Nodes are operators (or the channels of one group); an undirected edge ``i -- j`` carries
``d_FS(i, j)``. Edges are kept where ``d_FS <= epsilon`` and/or among each node's ``k``
nearest neighbours. Small node sets are built exactly; large ones (``n > exact_limit``) by a
chunked k-nearest-neighbour pass that never holds an ``n x n`` matrix (memory ``~ n * k``).
Clusters are sets of mutually substitutable nodes: connected components of the thresholded
graph, or single-linkage agglomeration down to a target count (cutting the heaviest edges of
the graph's minimum spanning forest). Every result is deterministic: ties break by index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from .errors import OptionError
from .metrics import pairwise_fubini_study, unit_rows

log = logging.getLogger(__name__)

EXACT_LIMIT = 4096
KNN_BLOCK_BYTES = 64 * 2**20  # one square block of cosines; top-k adds 2x this in indices


@dataclass(frozen=True)
class RedundancyGraph:
    """Undirected weighted graph on ``n`` nodes; edge ``(rows[e], cols[e])`` with ``rows < cols``.

    ``weights[e]`` is the Fubini–Study distance of the pair. Edges are sorted by
    ``(rows, cols)`` and unique.
    """

    n: int
    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray

    @property
    def num_edges(self) -> int:
        return int(self.rows.size)

    def adjacency(self, offset: float = 0.0) -> sp.csr_matrix:
        """Symmetric sparse adjacency with ``weight + offset`` on every edge.

        scipy's graph routines read a stored zero as "no edge", and duplicates have
        ``d_FS = 0``: pass ``offset > 0`` whenever the values matter as weights.
        """
        data = np.concatenate([self.weights, self.weights]) + offset
        r = np.concatenate([self.rows, self.cols])
        c = np.concatenate([self.cols, self.rows])
        return sp.csr_matrix((data, (r, c)), shape=(self.n, self.n))

    def components(self) -> np.ndarray:
        """Connected-component label of every node, labels numbered by first member."""
        _, labels = connected_components(self.adjacency(offset=1.0), directed=False)
        return _relabel_by_first_member(labels)

    def clusters(self, n_clusters: int) -> np.ndarray:
        """Single-linkage labels with at most ``n_clusters`` clusters (fewer edges, more).

        Agglomerates along the minimum spanning forest, merging nearest pairs first; when the
        graph has more components than ``n_clusters`` those components are the answer.
        """
        if not 1 <= n_clusters <= self.n:
            raise OptionError(f"n_clusters={n_clusters} is outside [1, {self.n}]")
        # MST is invariant to a monotone shift of the weights; the shift keeps zero edges.
        forest = minimum_spanning_tree(self.adjacency(offset=1.0)).tocoo()
        order = np.lexsort((forest.col, forest.row, forest.data))
        n_components = self.n - forest.nnz
        keep = order[: max(0, self.n - max(n_clusters, n_components))]
        kept = sp.csr_matrix(
            (np.ones(keep.size), (forest.row[keep], forest.col[keep])), shape=(self.n, self.n)
        )
        _, labels = connected_components(kept, directed=False)
        return _relabel_by_first_member(labels)

    def nearest(self) -> tuple[np.ndarray, np.ndarray]:
        """For each node, its nearest neighbour in the graph and the distance (-1, inf if none)."""
        idx = np.full(self.n, -1, dtype=np.int64)
        dist = np.full(self.n, np.inf)
        for a, b in ((self.rows, self.cols), (self.cols, self.rows)):
            order = np.lexsort((b, self.weights, a))  # by node, then distance, then index
            first = np.ones(order.size, dtype=bool)
            first[1:] = a[order][1:] != a[order][:-1]
            nodes, cand, d = a[order][first], b[order][first], self.weights[order][first]
            better = (d < dist[nodes]) | ((d == dist[nodes]) & (cand < idx[nodes]))
            idx[nodes[better]] = cand[better]
            dist[nodes[better]] = d[better]
        return idx, dist


def _relabel_by_first_member(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(np.argsort(first))] = np.arange(first.size)
    return rank[labels]


def build_graph(
    states: np.ndarray,
    *,
    epsilon: float | None = None,
    k: int | None = None,
    exact_limit: int = EXACT_LIMIT,
    block_bytes: int = KNN_BLOCK_BYTES,
    dtype: type = np.float64,
) -> RedundancyGraph:
    """Build the QM-FRG of ``states`` (``(n, d)`` rows, compared projectively).

    Keeps an edge when ``d_FS <= epsilon`` (if given) or when it is among either endpoint's
    ``k`` nearest neighbours (if given). At least one of the two is required. For
    ``n > exact_limit`` the build runs chunk by chunk and needs ``k`` (a threshold alone
    could keep ``n^2`` edges); ``block_bytes`` bounds its working memory (one square block
    of cosines, plus the top-k selection's indices, twice that).
    """
    x = np.asarray(states)
    if x.ndim != 2 or x.shape[0] == 0:
        raise OptionError(f"states must be a non-empty (n, d) array, got shape {x.shape}")
    if epsilon is None and k is None:
        raise OptionError("build_graph needs epsilon, k, or both")
    if epsilon is not None and not 0 <= epsilon <= np.pi / 2:
        raise OptionError(f"epsilon={epsilon} is outside [0, pi/2]")
    n = x.shape[0]
    if k is not None:
        if k < 1:
            raise OptionError(f"k={k} must be >= 1")
        k = min(k, n - 1)
    if n <= exact_limit:
        return _build_exact(x, epsilon, k, dtype)
    if k is None:
        raise OptionError(f"{n} nodes exceed exact_limit={exact_limit}: pass k for a kNN build")
    return _build_knn(x, epsilon, k, dtype, block_bytes)


def _build_exact(
    x: np.ndarray, epsilon: float | None, k: int | None, dtype: type
) -> RedundancyGraph:
    d = pairwise_fubini_study(x, dtype=dtype).astype(np.float64, copy=False)
    n = d.shape[0]
    keep = np.zeros((n, n), dtype=bool)
    if epsilon is not None:
        keep |= d <= epsilon
    if k:
        masked = d + np.diag(np.full(n, np.inf))
        # stable sort: equal distances break by column index
        nn = np.argsort(masked, axis=1, kind="stable")[:, :k]
        keep[np.repeat(np.arange(n), k), nn.reshape(-1)] = True
    keep |= keep.T
    r, c = np.nonzero(np.triu(keep, 1))
    return RedundancyGraph(n, r.astype(np.int64), c.astype(np.int64), d[r, c])


def _build_knn(
    x: np.ndarray, epsilon: float | None, k: int, dtype: type, block_bytes: int
) -> RedundancyGraph:
    """Exact kNN (plus epsilon edges) over square blocks of ``X^ X^T``.

    Only blocks on and above the diagonal are computed; block ``(I, J)`` updates the running
    top-``k`` of rows ``I`` and, transposed, of rows ``J``: half the flops of a full GEMM and
    memory ``O(n k + block^2)``.
    """
    n = x.shape[0]
    xn = unit_rows(x, dtype)
    side = max(k + 1, int(np.sqrt(block_bytes / np.dtype(dtype).itemsize)))
    starts = list(range(0, n, side))
    best_val = np.full((n, k), -np.inf)
    best_idx = np.zeros((n, k), dtype=np.int64)
    cos_eps = None if epsilon is None else np.cos(epsilon)
    near_r, near_c, near_v = [], [], []
    for bi, i0 in enumerate(starts):
        rows_i = slice(i0, min(n, i0 + side))
        for j0 in starts[bi:]:
            rows_j = slice(j0, min(n, j0 + side))
            block = np.abs(xn[rows_i] @ xn[rows_j].T)
            if i0 == j0:
                np.fill_diagonal(block, -1.0)  # exclude self
            _merge_topk(best_val, best_idx, rows_i, block, j0, k)
            if i0 != j0:
                _merge_topk(best_val, best_idx, rows_j, block.T, i0, k)
            if cos_eps is not None:
                r, c = np.nonzero(block >= cos_eps)
                near_r.append(r + i0)
                near_c.append(c + j0)
                near_v.append(block[r, c])
        log.debug("kNN graph: row block %d/%d", bi + 1, len(starts))
    r = np.concatenate([np.repeat(np.arange(n), k)] + near_r)
    c = np.concatenate([best_idx.reshape(-1)] + near_c)
    cosine = np.concatenate([best_val.reshape(-1)] + [v.astype(np.float64) for v in near_v])
    w = np.arccos(np.clip(cosine, 0.0, 1.0))
    lo, hi = np.minimum(r, c), np.maximum(r, c)
    _, first = np.unique(lo * n + hi, return_index=True)  # sorted by (lo, hi), unique
    return RedundancyGraph(n, lo[first].astype(np.int64), hi[first].astype(np.int64), w[first])


def _merge_topk(
    best_val: np.ndarray, best_idx: np.ndarray, rows: slice, block: np.ndarray, col0: int, k: int
) -> None:
    """Fold the ``k`` largest entries of each row of ``block`` into the running top-k."""
    kk = min(k, block.shape[1])
    part = np.argpartition(block, -kk, axis=1)[:, -kk:]
    vals = np.concatenate([best_val[rows], np.take_along_axis(block, part, axis=1)], axis=1)
    idx = np.concatenate([best_idx[rows], part + col0], axis=1)
    keep = np.argpartition(vals, -k, axis=1)[:, -k:]
    best_val[rows] = np.take_along_axis(vals, keep, axis=1)
    best_idx[rows] = np.take_along_axis(idx, keep, axis=1)
