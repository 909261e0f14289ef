"""The mathematics of calibrated pruning (tvm_qmfrg.reconstruction), on plain numpy data."""

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tvm_qmfrg import reconstruction as rec
from tvm_qmfrg.selection import AxisCost, FlopsModel


def consumer(current, dense, weight, name="c", held_every=0):
    m_fit, m_held = rec.Moments.empty(current.shape[1]), rec.Moments.empty(current.shape[1])
    rows = np.arange(current.shape[0])
    held = (rows % held_every == held_every - 1) if held_every else np.zeros_like(rows, bool)
    m_fit.add(current[~held], dense[~held])
    if held.any():
        m_held.add(current[held], dense[held])
    return rec.ConsumerData(name, weight.T @ weight, m_fit, m_held)


def direct_loss(current, dense, weight, kept):
    """min over (B, b) of mean ||W x - (B x~_K + b)||^2 / Var(W x), by least squares."""
    z = dense @ weight.T
    a = np.concatenate([current[:, kept], np.ones((current.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(a, z, rcond=None)
    resid = z - a @ coef
    return float(np.mean(np.sum(resid**2, axis=1)) / np.mean(np.sum((z - z.mean(0)) ** 2, 1)))


def same_selection(a, b, unit: int) -> np.ndarray:
    """Assert that two sets of consumers select alike (kept units and loss curve, at two
    counts); the kept features at the half-way count."""
    units = a[0].gram.shape[0] // unit
    keeps = [units - 1, max(1, units // 2)]
    kept_a, curve_a = rec.select_path(a, unit, keeps)
    kept_b, curve_b = rec.select_path(b, unit, keeps)
    assert kept_a == kept_b
    np.testing.assert_allclose(
        [v for _, v in curve_a], [v for _, v in curve_b], rtol=1e-7, atol=1e-9
    )
    return np.array([f for k in kept_b[1] for f in range(k * unit, (k + 1) * unit)])


def correlated(rng, n, f):
    mix = rng.standard_normal((f, f)) * rng.uniform(0.2, 2.0, size=f)
    return rng.standard_normal((n, f)) @ mix + rng.standard_normal(f)


def test_moments_of_two_halves_add_up_to_the_moments_of_all_rows():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    a, b, whole = rec.Moments.empty(3), rec.Moments.empty(3), rec.Moments.empty(3)
    a.add(x[:20], y[:20])
    b.add(x[20:], y[20:])
    whole.add(x, y)
    for got, want in zip((a + b).stats(), whole.stats()):
        np.testing.assert_allclose(got, want, atol=1e-12)
    _, _, g, c, _ = whole.stats()
    np.testing.assert_allclose(g, np.cov(x.T, bias=True), atol=1e-12)
    np.testing.assert_allclose(c, (x - x.mean(0)).T @ (y - y.mean(0)) / 50, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=12),
    same=st.booleans(),
)
def test_moments_gathered_in_blocks_equal_the_moments_of_all_rows_at_once(seed, cuts, same):
    rng = np.random.default_rng(seed)
    n = sum(cuts)
    x = rng.standard_normal((n, 4)) + 3.0
    y = x if same else rng.standard_normal((n, 4))
    blocks, edges = rec.Moments.empty(4), np.cumsum([0, *cuts])
    for lo, hi in zip(edges[:-1], edges[1:]):
        blocks.add(x[lo:hi], x[lo:hi] if same else y[lo:hi])
        assert blocks.n == hi  # gathered rows count before they are summed
    assert sum(len(c) for c, _ in blocks.pending) < rec.BLOCK_ROWS  # full blocks are summed
    mx, my, g, c, d = blocks.stats()
    assert not blocks.pending
    np.testing.assert_allclose(mx, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(my, y.mean(0), atol=1e-12)
    np.testing.assert_allclose(g, np.cov(x.T, bias=True), atol=1e-10)
    np.testing.assert_allclose(c, (x - x.mean(0)).T @ (y - y.mean(0)) / n, atol=1e-10)
    np.testing.assert_allclose(d, np.cov(y.T, bias=True), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), features=st.integers(3, 7), keep=st.integers(1, 3))
def test_the_loss_curve_ends_at_the_least_squares_loss_of_the_kept_features(seed, features, keep):
    rng = np.random.default_rng(seed)
    x = correlated(rng, 400, features)
    w = rng.standard_normal((4, features))
    data = consumer(x, x, w)
    kept, curve = rec.select_units([data], 1, keep, ridge=1e-9, batch_fraction=0.0)
    assert len(kept) == keep and curve[0] == (0, pytest.approx(0.0, abs=1e-6))
    assert curve[-1][0] == features - keep
    assert curve[-1][1] == pytest.approx(direct_loss(x, x, w, kept), rel=1e-4, abs=1e-7)
    assert all(b[1] >= a[1] - 1e-9 for a, b in zip(curve, curve[1:]))  # removing never helps


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), features=st.integers(3, 6))
def test_removing_one_unit_picks_the_best_single_removal(seed, features):
    rng = np.random.default_rng(seed)
    x = correlated(rng, 300, features)
    w = rng.standard_normal((3, features))
    kept, _ = rec.select_units([consumer(x, x, w)], 1, features - 1, ridge=1e-9)
    losses = {
        p: direct_loss(x, x, w, [f for f in range(features) if f != p]) for p in range(features)
    }
    (gone,) = set(range(features)) - set(kept)
    assert losses[gone] == pytest.approx(min(losses.values()), rel=1e-4, abs=1e-8)


def test_units_of_several_features_go_together_and_the_best_pair_is_found():
    rng = np.random.default_rng(3)
    x = correlated(rng, 500, 8)  # 4 units of 2 features
    w = rng.standard_normal((5, 8))
    kept, curve = rec.select_units([consumer(x, x, w)], 2, 3, ridge=1e-9)
    losses = {}
    for u in range(4):
        feats = [f for f in range(8) if f // 2 != u]
        losses[u] = direct_loss(x, x, w, feats)
    (gone,) = set(range(4)) - set(kept)
    assert losses[gone] == pytest.approx(min(losses.values()), rel=1e-4)
    assert curve[-1][1] == pytest.approx(losses[gone], rel=1e-4)


def test_a_redundant_feature_is_removed_first_at_no_cost():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 4))
    x = np.concatenate([base, base[:, :1] * 2 - base[:, 1:2] + 0.5], axis=1)  # f4 = 2 f0 - f1 + .5
    w = rng.standard_normal((3, 5))
    kept, curve = rec.select_units([consumer(x, x, w)], 1, 4, ridge=1e-9)
    assert curve[-1][1] < 1e-6
    assert len(kept) == 4
    fit = rec.reconstruct(consumer(x, x, w), np.array(kept), ridges=(1e-9,))
    np.testing.assert_allclose(x[:, kept] @ fit.r.T + fit.mu, x, atol=1e-5)


def test_the_refit_targets_the_dense_features_and_undoes_upstream_drift():
    rng = np.random.default_rng(2)
    dense = correlated(rng, 400, 5)
    current = dense * 0.5 + 1.0  # what the pruned network upstream now delivers
    w = rng.standard_normal((3, 5))
    fit = rec.reconstruct(consumer(current, dense, w), np.arange(5), ridges=(1e-9,))
    np.testing.assert_allclose(fit.r, 2 * np.eye(5), atol=1e-6)
    np.testing.assert_allclose(current @ fit.r.T + fit.mu, dense, atol=1e-6)


def test_the_ridge_is_the_candidate_with_the_least_held_out_loss():
    rng = np.random.default_rng(4)
    signal = rng.standard_normal((60, 1))
    x = np.concatenate([signal + 0.1 * rng.standard_normal((60, 1)) for _ in range(12)], axis=1)
    w = rng.standard_normal((2, 12))
    data = consumer(x, x, w, held_every=3)
    kept = np.arange(6)
    fit = rec.reconstruct(data, kept)
    scores = []
    for rel in rec.RIDGES:
        one = rec.reconstruct(
            rec.ConsumerData("c", data.gram, data.fit, rec.Moments.empty(12)), kept, (rel,)
        )
        scores.append(rec._loss(data.held, data, kept, one.r, one.mu))
    assert fit.ridge == rec.RIDGES[int(np.argmin(scores))]
    assert fit.held_out_loss == pytest.approx(min(scores))


def two_group_flops():
    # group 0 and group 1 each own the output axis of one op of equal FLOPs
    return FlopsModel(
        ((100.0, (AxisCost(0, 10, ((0, 1.0),)),)), (100.0, (AxisCost(0, 10, ((1, 1.0),)),)))
    )


def test_sensitivity_allocation_prunes_the_insensitive_group_first():
    cheap = [(0.25, 0.001), (0.5, 0.002), (0.75, 0.004)]
    dear = [(0.25, 0.1), (0.5, 0.3), (0.75, 0.9)]
    keep = rec.allocate([cheap, dear], [10, 10], two_group_flops(), 0.3, [1, 1], [1, 1])
    assert keep[0] < keep[1]
    assert 1 - (keep[0] + keep[1]) * 10 / 200 >= 0.3


@pytest.mark.parametrize("step", [1, 2, 4])
def test_sensitivity_allocation_respects_minimum_and_multiples(step):
    flat = [(0.5, 0.0), (0.9, 0.0)]
    keep = rec.allocate([flat, flat], [10, 10], two_group_flops(), 0.8, [3, 3], [step, step])
    assert all(k >= 3 for k in keep)
    assert all(k % step == 0 or k == 10 for k in keep)


def test_every_brute_force_pair_is_no_better_than_greedy_on_a_block_diagonal_model():
    # independent features: the greedy order is exact, so it matches brute force
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 5)) * np.array([3.0, 0.1, 1.0, 0.5, 2.0])
    w = np.eye(5)
    kept, curve = rec.select_units([consumer(x, x, w)], 1, 3, ridge=1e-9, batch_fraction=0.0)
    best = min(itertools.combinations(range(5), 3), key=lambda k: direct_loss(x, x, w, list(k)))
    assert sorted(kept) == sorted(best)


def test_sensitivity_allocation_stays_within_the_measured_fractions_when_it_can():
    cheap = [(0.25, 0.0), (0.5, 0.0)]  # measured up to half of the group
    dear = [(0.25, 0.1), (0.5, 0.2), (0.75, 0.3), (0.9, 0.4)]
    keep = rec.allocate([cheap, dear], [10, 10], two_group_flops(), 0.4, [1, 1], [1, 1])
    assert keep[0] == 5  # not past its measured 50 %, though its curve is flat
    assert 1 - (keep[0] + keep[1]) * 10 / 200 >= 0.4


def test_sensitivity_allocation_leaves_a_fixed_group_at_its_count():
    cheap = [(0.25, 0.001), (0.5, 0.002), (0.75, 0.004)]
    dear = [(0.25, 0.1), (0.5, 0.3), (0.75, 0.9)]
    keep = rec.allocate(
        [cheap, dear], [10, 10], two_group_flops(), 0.3, [1, 1], [1, 1], fixed={0: 9}
    )
    assert keep[0] == 9  # the cheap group would go first, but it is held
    assert 1 - (keep[0] + keep[1]) * 10 / 200 >= 0.3


def test_sensitivity_allocation_gives_back_what_a_coarse_last_step_overshoots():
    # group 0 prunes in whole heads of 5 units; group 1 is cheap for its first 2 units only
    heads = [(0.5, 0.05)]
    fine = [(0.2, 0.001), (0.5, 1.0)]
    keep = rec.allocate([heads, fine], [10, 10], two_group_flops(), 0.3, [1, 1], [5, 1])
    # greedy: two units of group 1 (10 %), then a head (25 %): 35 %; one unit goes back
    assert keep == [5, 9]
    assert 1 - sum(keep) * 10 / 200 == pytest.approx(0.3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    target=st.floats(0.05, 0.7),
    steps=st.lists(st.sampled_from([1, 2, 3, 5]), min_size=2, max_size=2),
)
def test_sensitivity_allocation_reaches_the_target_and_no_unit_could_go_back(seed, target, steps):
    rng = np.random.default_rng(seed)
    curves = [
        list(zip([0.25, 0.5, 0.75, 0.9], np.cumsum(rng.random(4)).tolist())) for _ in range(2)
    ]
    flops = two_group_flops()
    assume(target <= 1 - sum(steps) / 20)  # reachable: each group keeps one step at least
    keep = rec.allocate(curves, [10, 10], flops, target, [1, 1], steps)
    reduction = 1 - flops.flops(keep) / flops.total
    assert reduction >= target
    for g in range(2):  # one more step of any group would miss the target
        if keep[g] < 10:
            more = keep.copy()
            more[g] = min(10, keep[g] + steps[g])
            assert 1 - flops.flops(more) / flops.total < target


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), features=st.integers(4, 9), readers=st.integers(2, 4))
def test_consumers_sharing_their_moments_select_as_if_each_held_its_own(seed, features, readers):
    rng = np.random.default_rng(seed)
    x = correlated(rng, 300, features)
    weights = [rng.standard_normal((int(rng.integers(2, 6)), features)) for _ in range(readers)]
    apart = [consumer(x, x, w, f"c{i}") for i, w in enumerate(weights)]
    shared = [
        rec.ConsumerData(c.name, c.gram, apart[0].fit, apart[0].held) for c in apart
    ]  # one Moments object read by every consumer, as collect() makes them
    keeps = [features - 1, features // 2, 1]
    kept_apart, curve_apart = rec.select_path(apart, 1, keeps, batch_fraction=0.0)
    kept_shared, curve_shared = rec.select_path(shared, 1, keeps, batch_fraction=0.0)
    assert kept_shared == kept_apart
    np.testing.assert_allclose(
        [v for _, v in curve_shared], [v for _, v in curve_apart], rtol=1e-7, atol=1e-9
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    features=st.integers(5, 10),
    unit=st.sampled_from([1, 2]),
    drift=st.booleans(),
)
def test_selection_and_refit_through_a_narrow_weight_factor_equal_those_through_the_gram(
    seed, features, unit, drift
):
    rng = np.random.default_rng(seed)
    features -= features % unit
    dense = correlated(rng, 300, features)
    current = dense + 0.3 * rng.standard_normal(dense.shape) if drift else dense
    readers = [rng.standard_normal((int(rng.integers(1, features // 2 + 1)), features))]
    readers.append(rng.standard_normal((1, features)))
    by_gram = [consumer(current, dense, w, f"c{i}", held_every=4) for i, w in enumerate(readers)]
    by_factor = [  # the same moments; the consumers' weights W^T as their factor
        rec.ConsumerData(c.name, c.gram, c.fit, c.held, w.T) for c, w in zip(by_gram, readers)
    ]
    feats = same_selection(by_factor, by_gram, unit)
    fit_g, fit_f = rec.reconstruct(by_gram[0], feats), rec.reconstruct(by_factor[0], feats)
    assert fit_f.ridge == fit_g.ridge
    assert fit_f.held_out_loss == pytest.approx(fit_g.held_out_loss, rel=1e-7, abs=1e-10)
    np.testing.assert_allclose(fit_f.r, fit_g.r, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    features=st.integers(6, 12),
    unit=st.sampled_from([1, 2]),
    rank_deficient=st.booleans(),
)
def test_moments_projected_through_a_narrow_consumer_select_and_fold_as_full_ones(
    seed, features, unit, rank_deficient
):
    rng = np.random.default_rng(seed)
    features -= features % unit
    dense = correlated(rng, 400, features)
    current = dense + 0.3 * rng.standard_normal(dense.shape)
    w = rng.standard_normal((int(rng.integers(1, features // 2 + 1)), features))
    if rank_deficient and w.shape[0] > 1:
        w[-1] = 2.0 * w[0]  # two outputs the same up to scale: W^T is not of full rank
    full = consumer(current, dense, w, held_every=4)
    full = rec.ConsumerData(full.name, full.gram, full.fit, full.held, w.T)
    held = np.arange(dense.shape[0]) % 4 == 3
    fit_m, held_m = (rec.Moments.empty(features, True, w.shape[0]) for _ in range(2))
    fit_m.add(current[~held], dense[~held] @ w.T)
    held_m.add(current[held], dense[held] @ w.T)
    projected = rec.ConsumerData("c", full.gram, fit_m, held_m, w.T, projected=True)
    feats = same_selection([projected], [full], unit)
    got, want = rec.reconstruct(projected, feats), rec.reconstruct(full, feats)
    assert got.ridge == want.ridge
    assert got.held_out_loss == pytest.approx(want.held_out_loss, rel=1e-7, abs=1e-10)
    assert got.r.shape == want.r.shape and got.mu.shape == want.mu.shape
    # what the consumer computes after the fold: W R and W mu
    scale = np.abs(w @ want.r).max() + 1.0
    np.testing.assert_allclose(w @ got.r, w @ want.r, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(w @ got.mu, w @ want.mu, rtol=0, atol=1e-8 * scale)


def test_projected_moments_without_their_factor_are_refused():
    with pytest.raises(ValueError, match="factor"):
        rec.ConsumerData(
            "c", np.eye(4), rec.Moments.empty(4, True, 2), rec.Moments.empty(4), None, True
        )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 3000), min_size=1, max_size=4))
def test_unpaired_moments_equal_paired_ones_whose_target_is_the_rows_themselves(seed, cuts):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sum(cuts), 5)) + 2.0
    paired, unpaired, other = (
        rec.Moments.empty(5),
        rec.Moments.empty(5, False),
        rec.Moments.empty(5, False),
    )
    for lo, hi in zip(np.cumsum([0, *cuts])[:-1], np.cumsum(cuts)):
        rows = x[lo:hi]
        paired.add(rows, rows)
        unpaired.add(rows, rows)
    head = x[:3]
    other.add(head, head)
    assert paired.paired and not unpaired.paired
    for got, want in zip(unpaired.stats(), paired.stats()):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    both = unpaired + other
    assert not both.paired and both.n == x.shape[0] + head.shape[0]
    np.testing.assert_allclose(
        both.stats()[2], np.cov(np.vstack([x, head]).T, bias=True), atol=1e-10
    )
    with pytest.raises(ValueError, match="unpaired"):
        other.add(x[:2], x[:2] + 1.0)
        other.flush()
