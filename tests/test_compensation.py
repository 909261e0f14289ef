"""The compensation mathematics: closed-form E[ReLU], offsets of pruned units, the refit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.stats import norm

from tvm_qmfrg.compensation import pruned_offsets, relu_mean


@settings(max_examples=40, deadline=None)
@given(st.floats(-5, 5), st.floats(0.05, 4))
def test_relu_mean_is_the_expectation_of_the_rectified_gaussian(m, s):
    lo, hi = max(0.0, m - 12 * s), max(0.0, m + 12 * s)  # where the density lives
    want = integrate.quad(lambda z: z * norm.pdf(z, m, s), lo, hi, limit=200)[0] if hi else 0.0
    got = relu_mean(np.array([m]), np.array([s]))[0]
    assert np.isclose(got, want, rtol=1e-7, atol=1e-9)


def test_offsets_subtract_the_scaled_partner_mean_for_merges_and_the_mean_for_removals():
    means = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # 3 units of 2 features
    out = pruned_offsets(means, 2, pruned=[1, 2], merges={1: (0, 0.5)})
    assert out == {2: 3.0 - 0.5 * 1.0, 3: 4.0 - 0.5 * 2.0, 4: 5.0, 5: 6.0}
