"""Channel criteria: who goes first when a group of channels shrinks, and where it merges.

A criterion maps one :class:`ChannelGroup` (numpy data only) to a :class:`Scorer`, which
answers, for unit ``j`` given the set of units still alive, ``(cost, partner, scale)``: the
cost of removing ``j`` now and, for merging criteria, the kept unit it folds into with
``a_j ~= scale * a_i``. Costs are comparable across groups: each is divided by the group's
mean *removal* cost, so 1.0 means "an average unit of this layer".

Registered criteria (choose by name; add one with the :func:`register` decorator, which
records its traits):

- ``qmfrg`` (default): merge-compensated. Unit ``j`` folds into the alive unit ``i`` with the
  smallest Fubini–Study angle ``theta_ij`` between their states ``[w; b]``, scale
  ``c = <w_j, w_i> / ||w_i||^2``; cost ``||V[:, j]|| * ||w_j|| * sin(theta_ij)``, the bound of
  DESIGN.md. Under ReLU-like activations only ``c > 0`` merges are valid (signed cosine);
  on linear paths ``|cos|``. With no valid partner the cost is the removal bound (sin = 1),
  so the criterion is never worse than magnitude pruning under the bound.
- ``spectral``: the paper's filter-level version. Each unit's own filter matrix gets its
  normalized spectrum; cost is the FS angle to the nearest spectrum of a larger-norm unit
  (the largest unit of a cluster stays). Dense neurons have one-row filters whose spectra
  all coincide: there it degenerates to keeping the larger norm.
- ``magnitude``: ``||w_j||_2`` of the unit state (filters with folded BatchNorm, all coupled
  producers).
- ``random``: seeded uniform costs.
- ``fpgm``: He et al. 2019, sum of Euclidean distances of the unit state to all others in the
  group: units nearest the geometric median go first.

Only ``qmfrg`` merges; the others remove.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import OptionError
from .graph import build_graph
from .metrics import pairwise_fubini_study, unit_rows

# merge classes, in the order of how strongly a merge survives the activation
LINEAR, HOMOGENEOUS, ODD, APPROXIMATE = "linear", "homogeneous", "odd", "approximate"
EXACT_MERGES = (LINEAR, HOMOGENEOUS)
DENSE_LIMIT = 4096  # above this many units a group's candidate partners come from a kNN graph
KNN_CANDIDATES = 32


@dataclass(frozen=True)
class ChannelGroup:
    """What a criterion may look at for one group of coupled channels.

    ``states`` is ``(units, D)``: unit ``j``'s rows ``[w; b]`` of every producer, with the
    per-channel affine chain (bias, BatchNorm) folded in. ``consumer_norms[j]`` is
    ``||V[:, j]||`` over every consumer. ``filter_spectra`` is ``(units, r)``: the singular
    values of each unit's producer filter as a matrix (a conv filter as ``I x kh*kw``;
    coupled producers contribute the union), zero-padded (for ``spectral``). ``merge`` says
    how merges pass the nonlinearities between producers and consumers.
    """

    name: str
    states: np.ndarray
    consumer_norms: np.ndarray
    filter_spectra: np.ndarray
    merge: str = HOMOGENEOUS

    @property
    def units(self) -> int:
        return int(self.states.shape[0])

    def removal_costs(self) -> np.ndarray:
        return self.consumer_norms * np.linalg.norm(self.states, axis=1)


class Scorer:
    """Fixed per-unit costs, no merges (the removal criteria)."""

    def __init__(self, costs: np.ndarray, scale: float):
        self.costs = np.asarray(costs, dtype=np.float64)
        self.scale = scale if scale > 0 else 1.0

    def best(self, j: int, alive: np.ndarray) -> tuple[float, int, float]:
        return float(self.costs[j] / self.scale), -1, 0.0

    def best_all(self, alive: np.ndarray) -> list[tuple[float, int, float]]:
        """:meth:`best` of every unit (alive or not) against ``alive``."""
        return [self.best(j, alive) for j in range(alive.size)]


class MergeScorer(Scorer):
    """qmfrg: cost of merging ``j`` into its nearest valid alive unit (DESIGN.md bound)."""

    def __init__(self, group: ChannelGroup):
        removal = group.removal_costs()
        super().__init__(removal, float(np.mean(removal)))
        self.signed = group.merge in (HOMOGENEOUS, APPROXIMATE)
        norms = np.linalg.norm(group.states, axis=1)
        self.norms = np.where(norms > 0, norms, 1.0)
        nonzero = norms > 0
        units = group.units
        if units <= DENSE_LIMIT:
            # float32 ranks the candidates; the chosen pair is recomputed in float64 (best())
            if nonzero.all():  # the common case: no gather and scatter of the states
                unit = unit_rows(group.states, np.float32)
            else:
                unit = np.zeros(group.states.shape, dtype=np.float32)
                unit[nonzero] = unit_rows(group.states[nonzero], np.float32)
            self.cos = unit @ unit.T
            np.fill_diagonal(self.cos, -np.inf)
            self.cos[~nonzero, :] = -np.inf
            self.cos[:, ~nonzero] = -np.inf
            self.candidates = None
        else:
            graph = build_graph(group.states, k=KNN_CANDIDATES, dtype=np.float32)
            self.candidates = _neighbour_lists(graph, units)
        self.states = group.states

    def exact_cosine(self, j: int, i: np.ndarray) -> np.ndarray:
        return (self.states[i] @ self.states[j]) / (self.norms[i] * self.norms[j])

    def _exact(self, j: slice | np.ndarray, i: np.ndarray) -> np.ndarray:
        """The float64 cosines of the pairs ``(j[k], i[k])``: one expression (a row-wise
        pairwise sum, the same bits for one pair or many) for :meth:`best` and
        :meth:`best_all`, since near an exact merge ``sin`` amplifies the last bits."""
        dots = np.multiply(self.states[j], self.states[i]).sum(axis=1)
        return dots / (self.norms[i] * self.norms[j])

    def best(self, j: int, alive: np.ndarray) -> tuple[float, int, float]:
        cand = np.flatnonzero(alive) if self.candidates is None else self.candidates[j]
        cand = cand[(cand != j) & alive[cand]]
        removal = float(self.costs[j] / self.scale)
        if cand.size == 0 or self.costs[j] == 0:
            return removal, -1, 0.0
        cos = self.cos[j, cand] if self.candidates is None else self.exact_cosine(j, cand)
        score = cos if self.signed else np.abs(cos)
        k = int(np.argmax(score))
        if not np.isfinite(score[k]) or score[k] <= 0:
            return removal, -1, 0.0
        i = int(cand[k])
        exact = float(self._exact(slice(j, j + 1), np.array([i]))[0])
        score_i = exact if self.signed else abs(exact)
        if score_i <= 0:
            return removal, -1, 0.0
        sin = float(np.sqrt(max(0.0, 1.0 - min(1.0, score_i) ** 2)))
        return removal * sin, i, exact * self.norms[j] / self.norms[i]

    def best_all(self, alive: np.ndarray) -> list[tuple[float, int, float]]:
        """:meth:`best` of every unit at once (the dense candidate matrix: one argmax per
        row instead of one call per unit; the same partners and costs)."""
        if self.candidates is not None:
            return super().best_all(alive)
        score = self.cos if self.signed else np.abs(self.cos)
        score = np.where(alive[None, :], score, -np.inf)
        np.fill_diagonal(score, -np.inf)
        partner = np.argmax(score, axis=1)
        top = score[np.arange(partner.size), partner]
        removal = self.costs / self.scale
        exact = self._exact(slice(None), partner)
        exact_score = exact if self.signed else np.abs(exact)
        others = int(alive.sum()) - alive.astype(int)  # alive candidates besides the unit
        merge = (others > 0) & (self.costs != 0) & np.isfinite(top) & (top > 0) & (exact_score > 0)
        sin = np.sqrt(np.maximum(0.0, 1.0 - np.minimum(1.0, exact_score) ** 2))
        cost = np.where(merge, removal * sin, removal)
        scale = np.where(merge, exact * self.norms / self.norms[partner], 0.0)
        return list(zip(cost.tolist(), np.where(merge, partner, -1).tolist(), scale.tolist()))


Factory = Callable[[ChannelGroup, np.random.Generator], Scorer]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion and its traits.

    ``merges``: folds removed units into kept ones (needed by the lossless ``epsilon``
    mode). ``compensates``: data-free bias compensation is on by default with it.
    ``seeded``: results depend on the seed (evaluations average several).
    ``filter_spectra``: reads :attr:`ChannelGroup.filter_spectra` (a per-unit SVD each,
    computed only for criteria that need it).
    """

    name: str
    factory: Factory
    merges: bool = False
    compensates: bool = False
    seeded: bool = False
    filter_spectra: bool = False


CRITERIA: dict[str, Criterion] = {}


def register(
    name: str,
    *,
    merges: bool = False,
    compensates: bool = False,
    seeded: bool = False,
    filter_spectra: bool = False,
) -> Callable[[Factory], Factory]:
    """Register ``factory(group, rng) -> Scorer`` as criterion ``name`` (a decorator).

    Registering a name twice is an error.
    """

    def add(factory: Factory) -> Factory:
        if name in CRITERIA:
            raise ValueError(f"criterion '{name}' is registered twice")
        CRITERIA[name] = Criterion(name, factory, merges, compensates, seeded, filter_spectra)
        return factory

    return add


def _neighbour_lists(graph, units: int) -> list[np.ndarray]:
    rows = np.concatenate([graph.rows, graph.cols])
    cols = np.concatenate([graph.cols, graph.rows])
    order = np.argsort(rows, kind="stable")
    splits = np.searchsorted(rows[order], np.arange(units + 1))
    return [cols[order][splits[u] : splits[u + 1]] for u in range(units)]


@register("magnitude")
def _magnitude(group: ChannelGroup, rng: np.random.Generator) -> Scorer:
    costs = np.linalg.norm(group.states, axis=1)
    return Scorer(costs, float(np.mean(costs)))


@register("random", seeded=True)
def _random(group: ChannelGroup, rng: np.random.Generator) -> Scorer:
    return Scorer(rng.random(group.units), 0.5)


@register("fpgm")
def _fpgm(group: ChannelGroup, rng: np.random.Generator) -> Scorer:
    s = group.states
    sq = np.sum(s * s, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * s @ s.T, 0.0)
    costs = np.sqrt(d2).sum(axis=1)
    return Scorer(costs, float(np.mean(costs)))


@register("spectral", filter_spectra=True)
def _spectral(group: ChannelGroup, rng: np.random.Generator) -> Scorer:
    spectra = np.asarray(group.filter_spectra, dtype=np.float64)
    norms = np.linalg.norm(spectra, axis=1)  # ||s||_2 = ||filter||_F
    valid = norms > 0
    costs = np.where(valid, np.pi / 2, 0.0)  # dead units first, cluster leaders last
    if valid.sum() > 1:
        d = pairwise_fubini_study(spectra[valid])
        n = norms[valid]
        idx = np.arange(n.size)
        larger = (n[None, :] > n[:, None]) | (
            (n[None, :] == n[:, None]) & (idx[None] < idx[:, None])
        )
        nearest = np.where(larger, d, np.inf).min(axis=1)
        costs[valid] = np.where(np.isfinite(nearest), nearest, np.pi / 2)
    return Scorer(costs, float(np.mean(costs)))


@register("qmfrg", merges=True, compensates=True)
def _qmfrg(group: ChannelGroup, rng: np.random.Generator) -> Scorer:
    return MergeScorer(group)


def get(name: str) -> Factory:
    """The factory of criterion ``name``; :class:`OptionError` naming the choices if unknown."""
    return traits(name).factory


CALIBRATED = "+cal"  # suffix of an evaluation variant that runs with calibration data
# ``NAME+cal-X``: calibrated pruning with one of its parts switched off, to measure that part
ABLATIONS: dict[str, dict] = {
    "select": {"selection": "criterion"},  # the criterion picks, activations only refit
    "refit": {"reconstruct": False},  # activations pick, consumers are not refit
    "seq": {"sequential": False},  # every group from the dense network's activations
    "resid": {"residual": False},  # consumers ahead of a residual add ignore the stream's drift
    "sens": {"allocation": "uniform"},  # the same fraction of every group
    "ridge": {"ridge": 1e-6},  # a fixed, tiny ridge instead of one chosen on held-out data
}


def variant(name: str) -> tuple[str, bool]:
    """An evaluation variant ``NAME``, ``NAME+cal`` or ``NAME+cal-X``: ``(criterion,
    calibrated)`` (see :func:`variant_options` for ``-X``)."""
    base, sep, rest = name.partition(CALIBRATED)
    traits(base)
    if sep and rest and rest.removeprefix("-") not in ABLATIONS:
        raise OptionError(
            f"unknown ablation '{rest}' in '{name}' (choose from "
            f"{', '.join('-' + k for k in ABLATIONS)})"
        )
    return base, bool(sep)


def variant_options(name: str) -> dict:
    """Pruning options an evaluation variant overrides: those of its ablation, if any."""
    variant(name)
    rest = name.partition(CALIBRATED)[2]
    return dict(ABLATIONS[rest[1:]]) if rest else {}


def seeds_for(name: str, seeds: int) -> range:
    """Seeds an evaluation runs variant ``name`` with: all ``seeds`` when its criterion is
    seeded (``random``), else one."""
    return range(seeds if traits(variant(name)[0]).seeded else 1)


def traits(name: str) -> Criterion:
    """The registered :class:`Criterion` ``name``."""
    if name not in CRITERIA:
        raise OptionError(f"unknown criterion '{name}' (choose from {', '.join(CRITERIA)})")
    return CRITERIA[name]


def merge_is_exact(merge: str, scale: float, tol: float) -> bool:
    """Whether ``a_j = scale * a_i`` of the pre-activations survives the activation exactly."""
    if merge == LINEAR:
        return True
    if merge == HOMOGENEOUS:
        return scale > 0
    if merge == ODD:
        return abs(abs(scale) - 1.0) <= tol
    return abs(scale - 1.0) <= tol
