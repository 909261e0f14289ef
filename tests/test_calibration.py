"""Data-aware mode: least-squares refits from calibration activations."""

import numpy as np
import pytest
from helpers import compiled, load
from tvm_qmfrg.passes.calibrate import refit
from tvm_qmfrg.passes.prune import QMFRGPrune

from tvm_qmfrg import OptionError, synthetic
from tvm_qmfrg.synthetic import GraphBuilder


def low_rank_linear_net(rank: int = 5, width: int = 16, seed: int = 0):
    """dense(8 -> width) of rank `rank` -> (linear path) -> dense(width -> 4)."""
    g = GraphBuilder("low_rank", seed)
    basis = g.rng.standard_normal((8, rank))
    w1 = (basis @ g.rng.standard_normal((rank, width))).astype(np.float32)
    h = g.node("MatMul", ["input", g.const(w1, "fc_w")], "matmul")
    y = g.dense(h, width, 4)
    g.rename_output(y, "output")
    return g.model({"input": [1, 8]}, {"output": [1, 4]})


def samples(n, shape, seed):
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


def test_refit_recovers_an_exact_linear_dependence():
    rng = np.random.default_rng(0)
    kept = rng.standard_normal((500, 4))
    r_true = rng.standard_normal((2, 4))
    acts = np.concatenate([kept, kept @ r_true.T + np.array([0.5, -1.0])], axis=1)
    r, mu = refit(acts, np.arange(4), np.array([4, 5]))
    np.testing.assert_allclose(r, r_true, atol=1e-3)
    np.testing.assert_allclose(mu, [0.5, -1.0], atol=1e-3)


def test_calibrated_pruning_is_exact_when_pruned_channels_are_linear_combinations():
    model = low_rank_linear_net()
    mod = load(model)
    calib = samples(64, (1, 8), seed=1)
    prune = QMFRGPrune(criterion="magnitude", sparsity=0.6, calibration=calib)
    pruned = prune(mod)
    assert prune.plan.groups[0].kept_channels == 7 and prune.plan.groups[0].refit
    f_pruned, f_dense = compiled(pruned), compiled(mod)
    for x in samples(5, (1, 8), seed=2):
        np.testing.assert_allclose(f_pruned(x[None]), f_dense(x[None]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["vgg", "resnet_cifar"])
def test_calibration_lowers_the_output_error(family):
    model = getattr(synthetic, family)(seed=6)
    mod = load(model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib, test = samples(48, shape, 3), samples(8, shape, 4)
    plain = QMFRGPrune(sparsity=0.4)(mod)
    fitted = QMFRGPrune(sparsity=0.4, calibration=calib)(mod)

    dense = compiled(mod)
    ref = [dense(x[None]) for x in test]

    def err(m):
        f = compiled(m)
        return np.mean([np.sum((f(x[None]) - r) ** 2) for x, r in zip(test, ref)])

    assert err(fitted) < err(plain)


def test_calibration_shape_mismatch_is_a_clear_error():
    mod = load(synthetic.mlp(seed=0))
    with pytest.raises(OptionError, match="calibration input for 'input' has shape"):
        QMFRGPrune(sparsity=0.3, calibration=np.zeros((4, 7), np.float32))(mod)
