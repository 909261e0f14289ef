"""Selection across groups, without TVM: the uniform and global FLOPs allocations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_qmfrg.criteria import ChannelGroup, get
from tvm_qmfrg.errors import OptionError
from tvm_qmfrg.selection import AxisCost, FlopsModel, select


def chain(widths: list[int], seed: int):
    """Groups of a conv chain: op k reads group k-1 and writes group k (op 0 reads the input)."""
    rng = np.random.default_rng(seed)
    groups = [
        ChannelGroup(f"g{k}", rng.standard_normal((w, 6)), rng.random(w) + 0.1, np.ones((w, 1)))
        for k, w in enumerate(widths)
    ]
    ops = []
    for k, w in enumerate(widths):
        out = AxisCost(0, w, ((k, 1.0),))
        axes = (out,) if k == 0 else (AxisCost(0, widths[k - 1], ((k - 1, 1.0),)), out)
        ops.append((float(9 * w * (3 if k == 0 else widths[k - 1])), axes))
    return groups, FlopsModel(tuple(ops))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(4, 48), min_size=2, max_size=6),
    st.floats(0.05, 0.8),
    st.sampled_from(["qmfrg", "magnitude", "random"]),
    st.integers(0, 3),
)
def test_uniform_allocation_reaches_the_target_with_one_fraction(widths, target, name, seed):
    groups, model = chain(widths, seed)
    scorers = [get(name)(g, np.random.default_rng(seed)) for g in groups]
    sels = select(groups, scorers, [1] * len(groups), flops_reduction=target, flops_model=model)
    kept = [s.kept for s in sels]
    achieved = 1 - model.flops(kept) / model.total
    assert achieved >= target - 1e-12  # never short of the target
    # no group loses more than one unit beyond the smallest common fraction that reaches
    # the target (single-unit swaps land small models closer to it)
    common = next(
        c
        for c in sorted({k / w for w in widths for k in range(w)})
        if 1 - model.flops([w - int(np.floor(c * w + 1e-9)) for w in widths]) / model.total
        >= target
    )
    assert all(w - k <= np.floor(common * w + 1e-9) + 1 for k, w in zip(kept, widths))
    # giving back any one more unit would miss the target: the result is tight
    for g, w in enumerate(widths):
        if kept[g] < w:
            more = list(kept)
            more[g] += 1
            assert 1 - model.flops(more) / model.total < target


def test_allocations_differ_and_unknown_is_rejected():
    groups, model = chain([32, 8, 32], 0)
    scorers = [get("magnitude")(g, np.random.default_rng(0)) for g in groups]
    kw = dict(flops_reduction=0.4, flops_model=model)
    uniform = [s.kept for s in select(groups, scorers, [1] * 3, allocation="uniform", **kw)]
    global_ = [s.kept for s in select(groups, scorers, [1] * 3, allocation="global", **kw)]
    assert uniform != global_
    with pytest.raises(OptionError, match="unknown allocation 'greedy'"):
        select(groups, scorers, [1] * 3, allocation="greedy", **kw)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 40),
    st.sampled_from(["homogeneous", "linear", "odd"]),
    st.integers(0, 5),
    st.integers(0, 3),
)
def test_a_scorers_best_of_every_unit_at_once_is_its_best_of_each(units, merge, seed, dead):
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((units, 5))
    states[rng.choice(units, min(dead, units - 1), replace=False)] = 0.0  # dead units
    states[1] = 2.5 * states[0]  # an exact merge pair
    alive = rng.random(units) < 0.7
    group = ChannelGroup("g", states, rng.random(units) + 0.1, np.ones((units, 1)), merge)
    scorer = get("qmfrg")(group, rng)
    at_once = scorer.best_all(alive)
    for j in range(units):
        want = scorer.best(j, alive)
        assert at_once[j][1] == want[1]
        np.testing.assert_allclose(at_once[j][0], want[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(at_once[j][2], want[2], rtol=1e-12, atol=1e-15)
