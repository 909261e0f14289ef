"""Matrix views, augmented embedding and channel states."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_qmfrg import OptionError, WeightError
from tvm_qmfrg.spectral import (
    attention_head_circuits,
    augmented_matrix,
    batchnorm_affine,
    channel_states,
    conv_group_matrices,
    effective_rank,
    operator_spectrum,
    pad_spectra,
    stable_rank,
)


def test_augmented_matrix_layout():
    w = np.arange(6.0).reshape(2, 3)
    a = augmented_matrix(w, np.array([7.0, 8.0]))
    np.testing.assert_array_equal(a, [[0, 1, 2, 7], [3, 4, 5, 8], [0, 0, 0, 1]])
    x = np.array([1.0, -1.0, 2.0])
    np.testing.assert_allclose(a @ np.append(x, 1.0), np.append(w @ x + [7, 8], 1.0))


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1000))
def test_grouped_conv_spectrum_is_union_of_group_spectra(groups, per_group, cin_g, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((groups * per_group, cin_g, 3, 3))
    blocks = conv_group_matrices(k, groups)
    assert blocks.shape == (groups, per_group, cin_g * 9)
    union = np.sort(np.concatenate([np.linalg.svd(b, compute_uv=False) for b in blocks]))[::-1]
    np.testing.assert_allclose(
        operator_spectrum(k, groups=groups, augmented=False), union / np.linalg.norm(union)
    )
    # the full block-diagonal operator has the same spectrum
    full = np.zeros((groups * per_group, groups * cin_g * 9))
    for g in range(groups):
        full[g * per_group : (g + 1) * per_group, g * cin_g * 9 : (g + 1) * cin_g * 9] = blocks[g]
    bias = rng.standard_normal(groups * per_group)
    s = np.linalg.svd(augmented_matrix(full, bias), compute_uv=False)
    np.testing.assert_allclose(operator_spectrum(k, bias, groups=groups), s / np.linalg.norm(s))


def test_attention_circuits_match_per_head_products():
    rng = np.random.default_rng(0)
    d_model, heads, dh = 8, 2, 4
    q, k, v = rng.standard_normal((3, heads * dh, d_model))
    o = rng.standard_normal((d_model, heads * dh))
    ov, qk = attention_head_circuits(q, k, v, o, heads)
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        np.testing.assert_allclose(ov[h], o[:, rows] @ v[rows])
        np.testing.assert_allclose(qk[h], q[rows].T @ k[rows])
    # the OV circuits sum to the full value-output map
    np.testing.assert_allclose(ov.sum(0), o @ v)


def test_channel_states_fold_batchnorm_exactly():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 3, 3, 3))
    b = rng.standard_normal(5)
    gamma, beta, mean = rng.standard_normal((3, 5))
    var = rng.random(5) + 0.1
    scale, shift = batchnorm_affine(gamma, beta, mean, var, 1e-5)
    states = channel_states(w, b, scale, shift)
    x = rng.standard_normal(27)
    pre = w.reshape(5, -1) @ x + b
    bn = gamma * (pre - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(states @ np.append(x, 1.0), bn)


def test_rank_measures():
    psi = np.array([1.0, 1.0, 1.0, 1.0]) / 2
    assert effective_rank(psi) == pytest.approx(4.0)
    assert stable_rank(psi) == pytest.approx(4.0)
    assert effective_rank(np.array([1.0, 0.0])) == pytest.approx(1.0)


def test_pad_spectra():
    out = pad_spectra([np.array([1.0]), np.array([0.6, 0.8])])
    np.testing.assert_array_equal(out, [[1.0, 0.0], [0.6, 0.8]])


@pytest.mark.parametrize(
    "weight, match",
    [
        (np.array([[1.0, np.nan]]), "NaN/Inf"),
        (np.array([[np.inf, 1.0]]), "NaN/Inf"),
        (np.zeros((3, 4)), "all zero"),
        (np.zeros((0, 4)), "empty"),
        (np.ones(4), "at least 2 dims"),
    ],
)
def test_operator_spectrum_rejects_bad_weights(weight, match):
    with pytest.raises(WeightError, match=match):
        operator_spectrum(weight, name="layer1.conv")


def test_bad_groups_and_shapes_are_option_errors():
    with pytest.raises(OptionError, match="divisible"):
        conv_group_matrices(np.ones((6, 1, 3, 3)), groups=4)
    with pytest.raises(OptionError, match="bias of length"):
        augmented_matrix(np.ones((2, 2)), np.ones(3))
