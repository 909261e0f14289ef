"""Data-aware pruning of one group at its mixing consumers (numpy only).

A group's consumer ``c`` (a conv or matmul that mixes the group's features) reads the
features ``x`` (``F`` of them) and computes ``z = W x`` (kernel taps stacked into the rows of
``W``). Once the group is pruned to the kept features ``K``, the consumer reads ``x~_K``, the
kept features *of the network pruned so far*, and is refit so that it computes what it
computed in the dense network:

    x ~= R x~_K + mu        W' = W R   (kept columns),   b' = b + W mu

``R`` (``F x K``) is the ridge least-squares map, ``mu`` the intercept; kept rows of ``R``
start from the identity, so a kept feature that drifted upstream is corrected too. The loss
is the consumer's output error over the calibration samples,

    L_c(K) = E||W (x - R x~_K - mu)||^2 = tr(M (D - C_K^T G_KK^-1 C_K)),

with ``M = W^T W``, ``G = Cov(x~)``, ``C = Cov(x~, x)`` and ``D = Cov(x)`` (:class:`Moments`).

Selection (:func:`select_units`) removes units greedily, OBS-style (Hassibi & Stork 1993;
Frantar & Alistarh 2022): with ``H = G_KK^-1`` and ``Q = H C_K M C_K^T H``, removing the unit
``U`` from ``K`` raises ``L_c`` by ``tr(H_UU^-1 Q_UU)``, and ``H`` and ``Q`` are downdated in
closed form, so the greedy order is exact for a Gaussian model of the features. Every
consumer's loss is divided by its dense output energy ``tr(M D)``, so the consumers of a
residual stream count alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from scipy.linalg import blas, lapack

log = logging.getLogger(__name__)

SELECTION_RIDGE = 1e-3  # relative to the mean feature variance, while selecting
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # candidates for the refit's ridge


BLOCK_ROWS = 2048  # rows gathered before their products are formed (one GEMM per block)


@dataclass
class Moments:
    """Running sums of paired samples ``(x~, x)``: current and dense features, rows = samples
    (``n`` of them, the gathered ``pending`` rows included).

    Unpaired moments (``paired=False``: the target is the current features themselves,
    ``x = x~``) hold one sum and one Gram for all three, a third of the memory. The target
    may have another width than the features (``targets``: a projected target, see
    :class:`ConsumerData`)."""

    n: float
    sx: np.ndarray
    sy: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray
    syy: np.ndarray
    pending: list = field(default_factory=list, repr=False, compare=False)  # rows not summed
    _stats: tuple | None = field(default=None, repr=False, compare=False)  # until rows come

    @classmethod
    def empty(cls, features: int, paired: bool = True, targets: int | None = None) -> Moments:
        z = np.zeros(features)
        zz = np.zeros((features, features))
        if not paired:
            return cls(0.0, z, z, zz, zz, zz)
        t = features if targets is None else targets
        return cls(0.0, z, np.zeros(t), zz, np.zeros((features, t)), np.zeros((t, t)))

    @property
    def paired(self) -> bool:
        return self.sxy is not self.sxx

    def add(self, current: np.ndarray, dense: np.ndarray) -> None:
        """Add rows (``current`` and ``dense`` are ``(rows, F)``, the same samples).

        Rows are gathered up to :data:`BLOCK_ROWS`; the products of a block are formed in the
        rows' precision (float32 activations: float32 GEMMs, twice as fast) and summed
        across blocks in float64.
        """
        self.n += current.shape[0]
        self._stats = None
        self.pending.append((current, dense))
        if sum(c.shape[0] for c, _ in self.pending) >= BLOCK_ROWS:
            self.flush()

    def flush(self) -> None:
        """Sum the gathered rows into the moments."""
        if not self.pending:
            return
        same = all(c is d for c, d in self.pending)
        if not (same or self.paired):
            raise ValueError("unpaired moments take rows whose target is the rows themselves")
        dtype = np.result_type(*[a for pair in self.pending for a in pair], np.float32)
        xc = np.concatenate([np.asarray(c, dtype) for c, _ in self.pending])
        xd = xc if same else np.concatenate([np.asarray(d, dtype) for _, d in self.pending])
        self.pending.clear()
        xx = xc.T @ xc
        self.sx += xc.sum(axis=0, dtype=np.float64)
        self.sxx += xx
        if not self.paired:
            return
        self.sy += xd.sum(axis=0, dtype=np.float64)
        self.sxy += xx if same else xc.T @ xd
        self.syy += xx if same else xd.T @ xd

    def __add__(self, other: Moments) -> Moments:
        self.flush()
        other.flush()
        if not (self.paired or other.paired):
            sx, sxx = self.sx + other.sx, self.sxx + other.sxx
            return Moments(self.n + other.n, sx, sx, sxx, sxx, sxx)
        return Moments(
            self.n + other.n,
            self.sx + other.sx,
            self.sy + other.sy,
            self.sxx + other.sxx,
            self.sxy + other.sxy,
            self.syy + other.syy,
        )

    def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(mean x~, mean x, G, C, D)``: means and (co)variances (computed once; the
        arrays are shared, do not modify them)."""
        self.flush()
        if self._stats is None:
            n = max(self.n, 1.0)
            mx, my = self.sx / n, self.sy / n
            g = _centred(self.sxx, n, mx, mx)
            if not self.paired:
                self._stats = (mx, my, g, g, g)
                return self._stats
            self._stats = (mx, my, g, _centred(self.sxy, n, mx, my), _centred(self.syy, n, my, my))
        return self._stats


def _centred(s: np.ndarray, n: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``s / n - a b^T``, formed in one new array (a rank-one BLAS update in place)."""
    out = s / n
    blas.dger(-1.0, b, a, a=out.T, overwrite_a=1)  # out^T is F-ordered: updated in place
    return out


@dataclass
class ConsumerData:
    """One mixing consumer of a group: its weight Gram and the moments of what it reads.

    ``fit`` and ``held`` hold disjoint calibration samples (the held-out part chooses the
    refit's ridge); ``gram`` is ``M = sum_taps W_tap^T W_tap`` over the group's features.
    ``factor`` (optional, ``F x r``) is ``W^T`` itself, ``M = factor factor^T``: with
    ``r < F`` the selection and the loss work through it (``r`` instead of ``F`` columns).

    ``projected``: the moments' target is ``L^T x`` (``L`` = ``factor``), what the consumer
    computes from the target, rather than ``x``. Every quantity the selection and the refit
    read is one of ``C L``, ``L^T D L`` and ``L^T mean x``, so ``r``-wide target moments
    give the same results (and cost ``r / F`` of the cross moments, none of the ``F x F``
    target Gram); the refit is fitted as ``B = L^T R`` and lifted back to
    ``R = (L^T)^+ B``, which folds into ``W R = B`` alike (:func:`reconstruct`). Such moments
    belong to this consumer alone.
    """

    name: str
    gram: np.ndarray
    fit: Moments
    held: Moments
    factor: np.ndarray | None = None
    projected: bool = False
    _all: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.projected and (self.factor is None or self.fit.sy.size != self.factor.shape[1]):
            raise ValueError(f"{self.name}: projected moments need the factor they were taken by")

    def energy(self, d: np.ndarray) -> float:
        """``tr(M D)``, the consumer's dense output energy (``d``: the target covariance)."""
        return max(float(np.trace(d)), 1e-30) if self.projected else _energy(self.gram, d)

    @property
    def all(self) -> Moments:
        """The moments of every sample (computed once while no rows are added)."""
        key = (self.fit.n, self.held.n)
        if self._all is None or self._all[0] != key:
            self._all = (key, self.fit + self.held)
        return self._all[1]

    @property
    def rows(self) -> int:
        return int(self.fit.n + self.held.n)


@dataclass
class Reconstruction:
    """``x ~= r x~_K + mu`` for one consumer, with the ridge chosen and its held-out loss."""

    consumer: str
    r: np.ndarray  # (F, K)
    mu: np.ndarray  # (F,)
    ridge: float
    held_out_loss: float  # L_c / tr(M D) on the held-out samples


def _energy(gram: np.ndarray, d: np.ndarray) -> float:
    """``tr(M D)`` of symmetric ``M`` and ``D``: ``sum(M o D)``."""
    return max(float(np.vdot(gram, d)), 1e-30)


def _plus_diagonal(a: np.ndarray, lam: float) -> np.ndarray:
    """``a + lam I`` (a new array)."""
    out = np.array(a)
    out.flat[:: out.shape[0] + 1] += lam
    return out


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """``a^-1`` of a symmetric positive definite ``a`` (F-ordered), by its Cholesky factor
    (a third of the work of a general inverse); by LU when ``a`` is not positive definite in
    floating point."""
    factor, info = lapack.dpotrf(a, lower=1, clean=1)  # the upper triangle zeroed
    if info == 0:
        inv, info = lapack.dpotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        return np.asfortranarray(np.linalg.inv(a))
    inv += np.tril(inv, -1).T  # potri fills the lower triangle only
    return inv


def _ridge(g: np.ndarray, rel: float) -> float:
    return rel * max(float(np.trace(g)) / max(g.shape[0], 1), 1e-12)


def _features(units: Sequence[int], unit: int) -> np.ndarray:
    u = np.asarray(units, dtype=np.int64)
    return (u[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)


def _factor(datas: Sequence[ConsumerData], weights: Sequence[float]) -> np.ndarray:
    """``L`` with ``L L^T = sum_c w_c M_c``: the consumers' own factors side by side when
    they are narrower than ``F`` together, else from the eigendecomposition of the sum."""
    features = datas[0].gram.shape[0]
    if all(x.factor is not None for x in datas):
        if sum(x.factor.shape[1] for x in datas) <= features:
            return np.hstack([np.sqrt(w) * x.factor for w, x in zip(weights, datas)])
    vals, vecs = np.linalg.eigh(sum(w * x.gram for w, x in zip(weights, datas)))
    live = vals > vals[-1] * 1e-12 if vals.size else vals > 0
    return vecs[:, live] * np.sqrt(vals[live])


class _State:
    """``H`` and ``Q = P P^T`` over the features of the consumers that read one set of
    moments (see module docstring), with ``P = H C L`` for ``M = L L^T``.

    Consumers of the same features (the Q, K and V projections of one input) share ``H``;
    the removal cost ``tr(H_UU^-1 Q_UU)`` and the downdate of ``Q`` are linear in ``Q``, so
    one state with ``M = sum_c M_c / tr(M_c D)`` holds all of them. Removing ``U`` downdates
    ``H <- H - H_:U H_UU^-1 H_U:`` and ``P <- P - H_:U H_UU^-1 P_U`` (then ``P P^T`` is the
    downdated ``Q``). Both are updated in place; the rows and columns of removed features
    become zero and are never read again, and once a quarter of the rows held are such,
    both are compacted to the live ones (each downdate streams all of ``H``: on a long path
    most steps then touch a fraction of it).
    """

    COMPACT = 0.75  # compact when fewer than this share of the rows held are live

    def __init__(self, datas: Sequence[ConsumerData], ridge: float):
        _, _, g, c, d = datas[0].all.stats()
        weights = [1.0 / x.energy(d) for x in datas]
        # F-ordered, so BLAS updates them in place (H is symmetric: H^T is H)
        self.h = _spd_inverse(_plus_diagonal(g, _ridge(g, ridge)))
        if datas[0].projected:  # C L itself (projected moments are one consumer's own)
            cl = np.sqrt(weights[0]) * c
        else:
            cl = c @ _factor(datas, weights)
        self.p = np.asfortranarray(self.h @ cl)
        # tr(H C M C^T) = tr(L^T C^T H C L) = sum((C L) o P)
        self.base = float(len(datas)) - float(np.sum(cl * self.p))
        self.at = np.arange(g.shape[0])  # row of each feature in h and p; -1: removed

    def costs(self, alive: np.ndarray, unit: int) -> np.ndarray:
        """``tr(H_uu^-1 Q_uu)`` of every alive unit (position ``alive[i]`` in the full
        features)."""
        feats = self.at[_features(alive, unit)]
        if unit == 1:
            q = np.einsum("ij,ij->i", self.p, self.p)[feats]
            return q / np.maximum(self.h[feats, feats], 1e-300)
        pb = self.p[feats].reshape(alive.size, unit, -1)
        qb = np.einsum("nur,nvr->nuv", pb, pb)
        fu = feats.reshape(alive.size, unit)
        hb = self.h[fu[:, :, None], fu[:, None, :]]  # the diagonal blocks H_uu
        return np.trace(np.linalg.solve(hb, qb), axis1=1, axis2=2)

    def remove(self, features: np.ndarray) -> float:
        """Drop the features ``features``; return the weighted loss increase."""
        idx = self.at[features]
        h_u = np.ascontiguousarray(self.h[:, idx].T)  # H_U: (|U|, F); H is symmetric
        p_u = self.p[idx]
        h_uu = h_u[:, idx]
        rise = float(np.trace(np.linalg.solve(h_uu, p_u @ p_u.T)))
        a_t = np.linalg.solve(h_uu, h_u)  # (H_:U H_UU^-1)^T
        self.h = blas.dgemm(-1.0, a_t, h_u, 1.0, self.h, trans_a=1, overwrite_c=1)
        self.p = blas.dgemm(-1.0, a_t, p_u, 1.0, self.p, trans_a=1, overwrite_c=1)
        self.at[features] = -1
        live = np.flatnonzero(self.at >= 0)
        if live.size < self.COMPACT * self.h.shape[0]:
            rows = self.at[live]
            self.h = np.asfortranarray(self.h[np.ix_(rows, rows)])
            self.p = np.asfortranarray(self.p[rows])
            self.at[live] = np.arange(live.size)
        return max(rise, 0.0)


def select_units(
    consumers: Sequence[ConsumerData],
    unit: int,
    keep: int,
    *,
    ridge: float = SELECTION_RIDGE,
    batch_fraction: float = 0.1,
) -> tuple[list[int], list[tuple[int, float]]]:
    """Keep ``keep`` units minimizing the consumers' summed relative output loss.

    Greedy backward elimination: each step removes the ``max(1, batch_fraction * left)``
    cheapest units by their single-unit cost, as one block (the downdate is exact for the
    block). Returns the kept units (sorted) and the loss curve ``[(removed units, loss)]``,
    loss = ``sum_c L_c / tr(M_c D_c)``, starting at zero removed (the loss of upstream drift
    alone).
    """
    kept, curve = select_path(consumers, unit, [keep], ridge=ridge, batch_fraction=batch_fraction)
    return kept[0], curve


def select_path(
    consumers: Sequence[ConsumerData],
    unit: int,
    keeps: Sequence[int],
    *,
    ridge: float = SELECTION_RIDGE,
    batch_fraction: float = 0.1,
) -> tuple[list[list[int]], list[tuple[int, float]]]:
    """:func:`select_units` for several ``keeps`` at once: one elimination path (nested
    kept sets), stopping exactly at each count; the kept units per count, in ``keeps`` order."""
    features = consumers[0].gram.shape[0]
    units = features // unit
    if any(not 0 <= k <= units for k in keeps):
        raise ValueError(f"keep counts {list(keeps)} must lie in [0, {units}]")
    shared: dict[tuple[int, int], list[ConsumerData]] = {}  # consumers by their moments
    for c in consumers:
        shared.setdefault((id(c.fit), id(c.held)), []).append(c)
    states = [_State(datas, ridge) for datas in shared.values()]
    alive = np.arange(units)
    loss = float(sum(s.base for s in states))
    curve = [(0, loss)]
    found: dict[int, list[int]] = {}
    for keep in sorted(set(keeps), reverse=True):
        while alive.size > keep:
            costs = sum(s.costs(alive, unit) for s in states)
            left = alive.size - keep
            take = max(1, min(left, int(batch_fraction * left)))
            drop = np.zeros(alive.size, bool)
            drop[np.argsort(costs, kind="stable")[:take]] = True
            idx = _features(alive[drop], unit)
            loss += sum(s.remove(idx) for s in states)
            alive = alive[~drop]
            curve.append((units - alive.size, loss))
        found[keep] = alive.tolist()
    return [found[k] for k in keeps], curve


class _HeldOutLoss:
    """``E||W (x - R x~_K - mu)||^2 / tr(M D)`` on the samples of ``m`` (moments of
    ``data``), for any ``(R, mu)`` over the kept features ``kept`` (the terms that do not
    depend on them computed once).

    ``tr(M cov)`` without forming ``cov = D - R C_K - C_K^T R^T + R G_KK R^T``; with a
    narrow factor (``M = L L^T``, fewer columns than rows) through ``L^T R``; with
    projected moments ``(R, mu)`` are given as ``(L^T R, L^T mu)``."""

    def __init__(self, m: Moments, data: ConsumerData, kept: np.ndarray):
        self.mx, self.my, g, c, d = m.stats()
        self.gram, self.kept, self.projected = data.gram, kept, data.projected
        self.energy = data.energy(d)
        self.g_kk = g[np.ix_(kept, kept)]
        self.c_k = c[kept]  # (K, F), projected: (K, r)
        factor = data.factor
        narrow = factor is not None and factor.shape[1] < data.gram.shape[0]
        self.factor = factor if narrow and not self.projected else None
        if self.projected:
            self.lc = self.c_k.T
        else:
            self.lc = None if self.factor is None else self.factor.T @ self.c_k.T

    def __call__(self, r: np.ndarray, mu: np.ndarray) -> float:
        mean = self.my - r @ self.mx[self.kept] - mu
        if self.lc is not None:
            lr = r if self.projected else self.factor.T @ r
            cross = float(np.sum(lr * self.lc))
            quad = float(np.sum((lr @ self.g_kk) * lr))
            lm = mean if self.projected else self.factor.T @ mean
            return (self.energy - 2.0 * cross + quad + float(lm @ lm)) / self.energy
        mr = self.gram @ r
        cross = float(np.sum(mr * self.c_k.T))
        quad = float(np.sum((r.T @ mr) * self.g_kk))
        return (self.energy - 2.0 * cross + quad + float(mean @ self.gram @ mean)) / self.energy


def _loss(m: Moments, data: ConsumerData, kept: np.ndarray, r: np.ndarray, mu: np.ndarray):
    """``E||W (x - R x~_K - mu)||^2 / tr(M D)`` on the samples of ``m`` (see _HeldOutLoss)."""
    return _HeldOutLoss(m, data, kept)(r, mu)


def _ridge_fits(m: Moments, kept: np.ndarray, rels: Sequence[float], factor=None):
    """``(rel, R, mu)`` per relative ridge: ``R = (C_K^T + lam I_K) (G_KK + lam I)^-1`` (the
    kept rows of ``R`` pulled towards the identity), ``mu = mean x - R mean x~_K``; one
    Cholesky factorization per ridge. With projected moments (``factor`` ``L`` given) the
    same for ``(L^T R, L^T mu)``: ``C_K L + lam L_K`` on the right."""
    mx, my, g, c, _ = m.stats()
    g_kk = g[np.ix_(kept, kept)]
    lam_unit = _ridge(g_kk, 1.0)
    rows = np.arange(kept.size)
    for rel in rels:
        lam = rel * lam_unit
        rhs = c[kept]  # a copy: (K, F), C_K + lam I_K, R^T solves (G_KK + lam I) R^T = rhs
        if factor is None:
            rhs[rows, kept] += lam
        else:
            rhs += lam * factor[kept]
        a = _plus_diagonal(g_kk, lam)
        try:
            r = linalg.cho_solve(linalg.cho_factor(a, check_finite=False), rhs).T
        except linalg.LinAlgError:  # not positive definite in floating point: the minimum-norm
            # least squares (QR with column pivoting: about twice as fast as by the SVD)
            r = linalg.lstsq(a, rhs, lapack_driver="gelsy", check_finite=False)[0].T
        yield rel, r, my - r @ mx[kept]


def reconstruct(
    data: ConsumerData,
    kept: np.ndarray,
    ridges: Sequence[float] = RIDGES,
    *,
    refit_all: bool = True,
) -> Reconstruction:
    """The refit of one consumer on the kept features ``kept``.

    Each ridge of ``ridges`` (relative to the mean kept-feature variance) is fit on
    ``data.fit`` and scored on ``data.held``; the best is refit on all samples, or on
    ``data.fit`` alone unless ``refit_all`` (the held-out samples then stay unseen by every
    refit, to score whole plans on). Without held-out samples (or with one candidate) the
    first ridge is used.
    """
    kept = np.asarray(kept, dtype=np.int64)
    best_rel, best_loss = ridges[0], float("nan")
    proj = data.factor if data.projected else None
    if data.held.n > 0 and data.fit.n > 0 and len(ridges) > 1:
        loss = _HeldOutLoss(data.held, data, kept)
        fits = _ridge_fits(data.fit, kept, ridges, proj)
        best_loss, best_rel = min((loss(r, mu), rel) for rel, r, mu in fits)
    m = data.all if refit_all or data.fit.n == 0 else data.fit
    _, r, mu = next(_ridge_fits(m, kept, [best_rel], proj))
    if proj is not None:
        r, mu = _lift(proj, r, mu)
    return Reconstruction(data.name, r, mu, best_rel, best_loss)


def _lift(factor: np.ndarray, b: np.ndarray, nu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R, mu) = (L^T)^+ (B, nu)``: a refit fitted through the factor ``L``, lifted back to
    the features. ``L^T (L^T)^+`` projects onto the range of ``L^T``, which holds ``B`` and
    ``nu`` (they are ``L^T`` times something), so ``L^T R = B`` and ``L^T mu = nu``."""
    both = np.column_stack([b, nu])
    lt = factor.T
    try:  # L^T of full row rank (the common case): (L^T)^+ = L (L^T L)^-1
        out = factor @ linalg.cho_solve(linalg.cho_factor(lt @ factor, check_finite=False), both)
        ok = np.linalg.norm(lt @ out - both) <= 1e-8 * max(np.linalg.norm(both), 1e-300)
    except linalg.LinAlgError:
        ok = False
    if not ok:  # rank-deficient or ill-conditioned: the pseudo-inverse itself
        out = np.linalg.pinv(lt) @ both
    return out[:, :-1], out[:, -1]


def allocate(
    curves: Sequence[Sequence[tuple[float, float]]],
    units: Sequence[int],
    flops,
    target: float,
    mins: Sequence[int],
    steps: Sequence[int],
    chunk: float = 0.02,
    fixed: Mapping[int, int] | None = None,
) -> list[int]:
    """Kept units per group that reach ``target`` FLOPs reduction at the least summed loss.

    ``curves[g]`` is the measured loss of pruning group ``g`` alone as ``[(fraction of units
    removed, loss)]`` (made non-decreasing and interpolated linearly, zero at zero);
    ``flops`` is a :class:`~tvm_qmfrg.selection.FlopsModel`. Greedy on the marginal loss per
    FLOP removed, in chunks of ``chunk`` of a group's units (at least its ``steps``); no
    group goes past its last measured fraction unless the target cannot be reached otherwise.
    Then units go back (one step of a group at a time, the largest loss saved first) while
    the target still holds, so a coarse last step does not overshoot it.
    ``fixed[g]``: group ``g`` keeps that many units whatever its curve (one without a curve).
    """
    n = len(units)
    fixed = dict(fixed or {})
    keep = [fixed.get(g, u) for g, u in enumerate(units)]
    total = flops.total
    if total <= 0:
        return keep
    ops_of = flops.ops_of(n)
    fr, err = [], []
    for curve in curves:
        pts = sorted([(0.0, 0.0), *[(float(a), float(b)) for a, b in curve]])
        fr.append(np.array([p[0] for p in pts]))
        err.append(np.maximum.accumulate(np.maximum([p[1] for p in pts], 0.0)))

    def loss(g: int, k: int) -> float:
        x = 1.0 - k / units[g]
        if x <= fr[g][-1]:
            return float(np.interp(x, fr[g], err[g]))
        # past the last measured fraction: four times the last slope (losses grow fast there)
        slope = (
            (err[g][-1] - err[g][-2]) / max(fr[g][-1] - fr[g][-2], 1e-9) if fr[g].size > 1 else 0
        )
        return float(err[g][-1] + 4 * max(slope, 0.0) * (x - fr[g][-1]))

    def group_flops(g: int, kk: list[int]) -> float:
        return sum(flops.op_flops(i, kk) for i in ops_of[g])

    current = flops.flops(keep)
    capped = True  # first only within the measured fractions; past them if the target needs
    while 1.0 - current / total < target:
        fine = target - (1.0 - current / total) < chunk  # close to the target: one step
        best = None
        for g in range(n):
            if g in fixed:
                continue
            step = steps[g] if fine else max(steps[g], int(chunk * units[g]) // steps[g] * steps[g])
            new = keep[g] - step
            new -= new % steps[g]
            low = -(-mins[g] // steps[g]) * steps[g]
            new = max(new, low)
            if capped and 1.0 - new / units[g] > fr[g][-1] + 1e-9:
                continue
            if new >= keep[g]:
                continue
            trial = keep.copy()
            trial[g] = new
            saved = group_flops(g, keep) - group_flops(g, trial)
            if saved <= 0:
                continue
            score = (loss(g, new) - loss(g, keep[g])) / saved
            if best is None or score < best[0]:
                best = (score, g, new, saved)
        if best is None and capped:
            capped = False
            continue
        if best is None:
            log.warning("sensitivity allocation: every group is at its minimum")
            break
        _, g, new, saved = best
        keep[g] = new
        current -= saved
    # the last step can pass the target by a whole coarse unit (an attention head): give
    # units back, the largest loss saved first, while the target still holds
    while True:
        best = None
        for g in range(n):
            if g in fixed or keep[g] >= units[g]:
                continue
            trial = keep.copy()
            trial[g] = min(units[g], keep[g] + steps[g])
            added = group_flops(g, trial) - group_flops(g, keep)
            if 1.0 - (current + added) / total < target:
                continue
            gain = loss(g, keep[g]) - loss(g, trial[g])
            if best is None or gain > best[0]:
                best = (gain, g, trial[g], added)
        if best is None:
            return keep
        _, g, keep[g], added = best
        current += added
