"""Identities of the spectral geometry (DESIGN.md, "The mathematics"), checked numerically."""

import numpy as np
import ot
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import ortho_group

from tvm_qmfrg import WeightError
from tvm_qmfrg.metrics import (
    fidelity,
    fubini_study,
    merge_error_bound,
    pairwise_fidelity,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    rank_for_angle,
    spectral_gap,
    truncation_angle,
    unexplained_variance,
    wasserstein2,
)
from tvm_qmfrg.spectral import normalize, operator_spectrum, singular_values

settings.register_profile("ci", deadline=None, max_examples=60)
settings.load_profile("ci")

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


def vectors(n: int):
    return arrays(np.float64, n, elements=finite).filter(lambda v: np.linalg.norm(v) > 1e-3)


SMALL_SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 6))


def matrices(shapes=SMALL_SHAPES):
    return shapes.flatmap(
        lambda s: arrays(np.float64, s, elements=finite).filter(lambda m: np.linalg.norm(m) > 1e-3)
    )


@st.composite
def triples(draw):
    n = draw(st.integers(1, 8))
    return draw(vectors(n)), draw(vectors(n)), draw(vectors(n))


@given(triples())
def test_fubini_study_is_a_metric_on_the_projective_sphere(xyz):
    x, y, z = xyz
    dxy, dyx = fubini_study(x, y), fubini_study(y, x)
    assert dxy == pytest.approx(dyx, abs=1e-12)
    assert 0.0 <= dxy <= np.pi / 2
    assert fubini_study(x, x) == pytest.approx(0.0, abs=1e-7)
    assert fubini_study(x, -3.5 * x) == pytest.approx(0.0, abs=1e-7)
    assert dxy <= fubini_study(x, z) + fubini_study(z, y) + 1e-9


@given(triples())
def test_fidelity_is_squared_cosine_of_fs(xyz):
    x, y, _ = xyz
    assert fidelity(x, y) == pytest.approx(np.cos(fubini_study(x, y)) ** 2, abs=1e-9)


def test_fubini_study_is_accurate_for_nearly_parallel_vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50)
    x /= np.linalg.norm(x)
    t = rng.standard_normal(50)
    t -= (t @ x) * x
    t /= np.linalg.norm(t)
    for angle in (1e-9, 1e-6, 1e-3, 0.5, 1.5):
        y = np.cos(angle) * x + np.sin(angle) * t
        assert fubini_study(x, y) == pytest.approx(angle, rel=1e-6)


@given(matrices(), st.integers(0, 2**31 - 1), st.floats(0.01, 100))
def test_spectrum_invariant_under_orthogonal_maps_and_scaling(w, seed, scale):
    m, n = w.shape
    u = ortho_group.rvs(m, random_state=seed) if m > 1 else np.ones((1, 1))
    v = ortho_group.rvs(n, random_state=seed + 1) if n > 1 else np.ones((1, 1))
    psi = operator_spectrum(w, augmented=False)
    np.testing.assert_allclose(operator_spectrum(u @ w @ v.T, augmented=False), psi, atol=1e-9)
    np.testing.assert_allclose(operator_spectrum(scale * w, augmented=False), psi, atol=1e-9)
    # The augmented embedding is invariant when the bias turns with the output basis.
    b = np.linspace(-1, 1, m)
    np.testing.assert_allclose(
        operator_spectrum(u @ w @ v.T, u @ b), operator_spectrum(w, b), atol=1e-9
    )
    other = np.arange(m * n, dtype=float).reshape(m, n) + 1
    for metric in (fubini_study, wasserstein2):
        d = metric(operator_spectrum(w, augmented=False), operator_spectrum(other, augmented=False))
        d_rot = metric(
            operator_spectrum(u @ w @ v.T, augmented=False),
            operator_spectrum(3.0 * other, augmented=False),
        )
        assert d_rot == pytest.approx(d, abs=1e-7)


@given(
    st.tuples(st.integers(1, 6), st.integers(1, 6)).flatmap(
        lambda s: st.tuples(
            arrays(np.float64, s, elements=finite), arrays(np.float64, s, elements=finite)
        )
    )
)
def test_mirsky_inequality(pair):
    w1, w2 = pair
    assert spectral_gap(w1, w2) <= np.linalg.norm(w1 - w2) + 1e-9


def test_mirsky_is_attained_at_the_best_orthogonal_alignment():
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((2, 5, 4))
    u1, _, v1t = np.linalg.svd(w1, full_matrices=False)
    u2, _, v2t = np.linalg.svd(w2, full_matrices=False)
    aligned = u1 @ u2.T @ w2 @ v2t.T @ v1t  # U W2 V^T with the singular vectors of W1
    assert np.linalg.norm(w1 - aligned) == pytest.approx(spectral_gap(w1, w2), rel=1e-9)


@given(matrices(st.tuples(st.integers(2, 8), st.integers(2, 8))), st.data())
def test_eckart_young_identity(w, data):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = data.draw(st.integers(1, s.size))
    assume(np.linalg.norm(s[:k]) > 1e-6 * np.linalg.norm(s))
    w_k = (u[:, :k] * s[:k]) @ vt[:k]
    lhs = np.sin(fubini_study(singular_values(w), singular_values(w_k)))
    rhs = np.linalg.norm(w - w_k) / np.linalg.norm(w)
    assert lhs == pytest.approx(rhs, abs=1e-9)
    assert np.sin(truncation_angle(s, k)) == pytest.approx(rhs, abs=1e-9)


def test_rank_for_angle_is_the_smallest_certified_rank():
    s = np.array([10.0, 5.0, 1.0, 0.1, 0.01])
    for eps in (0.0, 0.001, 0.01, 0.1, 0.5, np.pi / 2):
        k = rank_for_angle(s, eps)
        assert truncation_angle(s, k) <= eps + 1e-12
        if k > 0:
            assert truncation_angle(s, k - 1) > eps
    assert rank_for_angle(s, 0.0) == 5
    assert rank_for_angle(s, np.pi / 2) == 0


@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_wasserstein2_matches_pot(n, m, seed):
    rng = np.random.default_rng(seed)
    u, v = rng.random(n), rng.random(m)
    reference = ot.wasserstein_1d(u, v, p=2) ** 0.5
    assert wasserstein2(u, v) == pytest.approx(reference, abs=1e-9)


def test_wasserstein2_equal_length_closed_form():
    u, v = np.array([0.3, 0.1, 0.2]), np.array([0.5, 0.0, 0.4])
    expected = np.linalg.norm(np.sort(u) - np.sort(v)) / np.sqrt(3)
    assert wasserstein2(u, v) == pytest.approx(expected)


@given(st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_pairwise_matrices_equal_scalar_functions(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[0] = 2.5 * x[-1]  # an exact duplicate direction
    fs = pairwise_fubini_study(x, chunk_bytes=64)  # force many chunks
    fid = pairwise_fidelity(x)
    for i in range(n):
        for j in range(n):
            assert fs[i, j] == pytest.approx(fubini_study(x[i], x[j]), abs=2e-7)
            assert fid[i, j] == pytest.approx(fidelity(x[i], x[j]), abs=1e-12)
    y = rng.standard_normal((3, d))
    cross = pairwise_fubini_study(x, y)
    assert cross.shape == (n, 3)
    assert cross[0, 1] == pytest.approx(fubini_study(x[0], y[1]), abs=2e-7)


def test_pairwise_wasserstein2_mixed_lengths_equal_scalar():
    rng = np.random.default_rng(3)
    specs = [rng.random(k) for k in (4, 4, 7, 3, 7)]
    w = pairwise_wasserstein2(specs)
    for i in range(5):
        for j in range(5):
            assert w[i, j] == pytest.approx(wasserstein2(specs[i], specs[j]), abs=1e-9)


def test_merge_error_bound_reduces_to_magnitude_at_right_angle():
    assert merge_error_bound(2.0, 3.0, np.pi / 2) == pytest.approx(6.0)
    assert merge_error_bound(2.0, 3.0, 0.0) == 0.0


def test_merge_bound_holds_for_best_scale():
    rng = np.random.default_rng(4)
    for _ in range(50):
        wi, wj = rng.standard_normal((2, 6))
        x = rng.standard_normal(6)
        c = (wj @ wi) / (wi @ wi)
        theta = fubini_study(wi, wj)
        lhs = abs(wj @ x - c * (wi @ x))
        assert lhs <= np.linalg.norm(x) * np.linalg.norm(wj) * np.sin(theta) + 1e-12


@pytest.mark.parametrize(
    "bad, reason",
    [
        (np.zeros(3), "zero vector"),
        (np.array([]), "empty"),
    ],
)
def test_distances_reject_degenerate_vectors(bad, reason):
    with pytest.raises(WeightError, match=reason):
        fubini_study(bad, np.ones(3))


def test_normalize_rejects_zero_rows():
    with pytest.raises(WeightError, match="zero vector"):
        normalize(np.array([[1.0, 0.0], [0.0, 0.0]]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), d=st.integers(1, 6))
def test_unexplained_variance_is_zero_when_exact_and_one_for_the_mean_output(seed, n, d):
    want = np.random.default_rng(seed).standard_normal((n, d))
    assert unexplained_variance(want, want) == 0.0
    mean = np.broadcast_to(want.mean(axis=0), want.shape)
    assert unexplained_variance(want, mean) == pytest.approx(1.0)
    # a constant offset is all error: ``n ||c||^2`` over the spread
    c = np.ones(d)
    spread = np.sum((want - want.mean(axis=0)) ** 2)
    assert unexplained_variance(want, want + c) == pytest.approx(n * d / spread)
