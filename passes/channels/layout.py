"""Where channels live in a tensor, and how that moves through reshapes.

A tensor carries at most one channel axis, described by a :class:`Layout`: which positions
of that axis belong to which *space* (a set of coupled channels), and how many positions one
feature occupies (``ppf``: ``H*W`` after a flatten, ``1/d_head`` on the head axis of an
attention reshape). Pure bookkeeping on integers; no TVM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, start + features * ppf)`` of an axis hold features
    ``[first, first + features)`` of ``space`` (``first > 0`` after a split or slice)."""

    space: int
    start: int
    features: int
    ppf: Fraction  # positions per feature
    first: int = 0

    @property
    def stop(self) -> int:
        return self.start + int(self.features * self.ppf)

    def holds(self, features: np.ndarray) -> np.ndarray:
        """Mask of the ``features`` (of the space) this segment holds."""
        f = np.asarray(features, dtype=np.int64)
        return (f >= self.first) & (f < self.first + self.features)

    def with_start(self, start: int) -> Segment:
        return Segment(self.space, start, self.features, self.ppf, self.first)

    def positions(self, features: np.ndarray) -> np.ndarray:
        """Axis positions occupied by those ``features`` of the space that this segment holds
        (whole positions; needs unit alignment)."""
        f = np.asarray(features, dtype=np.int64)
        f = f[self.holds(f)] - self.first
        if self.ppf >= 1:
            k = int(self.ppf)
            return (self.start + f[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        fpp = int(1 / self.ppf)
        return np.unique(self.start + f // fpp)


@dataclass(frozen=True)
class Layout:
    """Where channels live in one tensor: ``segments`` on axis ``axis`` of length ``size``."""

    axis: int
    size: int
    segments: tuple[Segment, ...]

    def shifted(self, axis: int, offset: int = 0, size: int | None = None) -> Layout:
        segs = tuple(s.with_start(s.start + offset) for s in self.segments)
        return Layout(axis, self.size if size is None else size, segs)

    def window(self, begin: int, end: int) -> Layout | str:
        """The layout of positions ``[begin, end)`` of the axis, rebased to 0 (split, slice);
        a reason string when a window boundary cuts through one feature's positions."""
        segs = []
        for s in self.segments:
            lo, hi = max(begin, s.start), min(end, s.stop)
            if lo >= hi:
                continue
            if s.ppf < 1:
                if lo != s.start or hi != s.stop:
                    return "splits an axis that holds parts of features (heads)"
                segs.append(s.with_start(lo - begin))
                continue
            k = int(s.ppf)
            if (lo - s.start) % k or (hi - s.start) % k:
                return "splits the positions of one feature"
            first = s.first + (lo - s.start) // k
            segs.append(Segment(s.space, lo - begin, (hi - lo) // k, s.ppf, first))
        return Layout(self.axis, end - begin, tuple(segs))


def reshape_layout(old: list, new: list, lay: Layout) -> tuple[Layout, int] | str:
    """Map ``lay`` through a reshape ``old -> new``; a reason string when it cannot."""
    groups = _reshape_groups(old, new)
    if groups is None:
        return "reshape with symbolic dims that do not line up"
    for olds, news in groups:
        if lay.axis not in olds:
            continue
        sizes_old = [old[i] for i in olds]
        sizes_new = [new[i] for i in news]
        if len(olds) == 1 and len(news) == 1:
            return lay.shifted(news[0], size=sizes_new[0]), 1
        pos = olds.index(lay.axis)
        outer = _prod(sizes_old[:pos])
        inner = _prod(sizes_old[pos + 1 :])
        if len(news) == 1:  # merge: each channel position becomes a block of `inner`
            if outer != 1:
                return "reshape merges the channel axis with an outer axis"
            segs = tuple(
                Segment(s.space, s.start * inner, s.features, s.ppf * inner, s.first)
                for s in lay.segments
            )
            return Layout(news[0], lay.size * inner, segs), 1
        if len(olds) == 1:  # split: the first non-trivial new axis indexes blocks of `q`
            lead = next(i for i, n in enumerate(sizes_new) if n != 1)
            q = _prod(sizes_new[lead + 1 :])
            segs = []
            unit = 1
            for s in lay.segments:
                if s.start % q or int(s.features * s.ppf) % q:
                    return "reshape splits the channel axis across segment boundaries"
                ppf = s.ppf / q
                if ppf < 1:
                    unit = math.lcm(unit, int(1 / ppf))
                segs.append(Segment(s.space, s.start // q, s.features, ppf, s.first))
            return Layout(news[lead], sizes_new[lead], tuple(segs)), unit
        return "reshape regroups the channel axis with others"
    return "reshape lost the channel axis"


def _prod(values) -> int:
    return int(np.prod(values)) if values else 1


def _reshape_groups(old: list, new: list) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes into aligned runs of axes with equal products (None if impossible).

    Symbolic dims must stand alone on both sides; size-1 axes at the end join the last run.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        if not isinstance(old[i], int) or not isinstance(new[j], int):
            if isinstance(old[i], int) or isinstance(new[j], int) or not old[i].same_as(new[j]):
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        oi, nj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            side_old = po < pn
            seq, k = (old, i) if side_old else (new, j)
            if k >= len(seq) or not isinstance(seq[k], int):
                return None
            if side_old:
                po *= old[i]
                oi.append(i)
                i += 1
            else:
                pn *= new[j]
                nj.append(j)
                j += 1
        groups.append((oi, nj))
    rest_old, rest_new = list(range(i, len(old))), list(range(j, len(new)))
    if any(old[k] != 1 for k in rest_old) or any(new[k] != 1 for k in rest_new):
        return None
    if groups:
        groups[-1][0].extend(rest_old)
        groups[-1][1].extend(rest_new)
    return groups
