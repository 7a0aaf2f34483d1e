"""Folding BatchNorm into the convolution before it (tinyunet.fold): the same function, fewer passes."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.blocks import Block
from tinyunet.fold import fold_batchnorm
from tinyunet.layers import BatchNormalization, Conv2D, Identity, ReLU
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet


def trained_looking(model, rng) -> None:
    """Give every BN non-trivial parameters and statistics, as training leaves them."""
    for _, layer in model.named_layers():
        if isinstance(layer, BatchNormalization):
            c = layer.params["gamma"].shape[0]
            layer.params["gamma"][...] = rng.uniform(0.5, 2.0, c)
            layer.params["beta"][...] = rng.normal(0, 0.5, c)
            layer.buffers["moving_mean"][...] = rng.normal(0, 0.5, c)
            layer.buffers["moving_variance"][...] = rng.uniform(0.2, 3.0, c)


@pytest.mark.parametrize("block", ["double_bn", "residual"])
def test_a_folded_network_computes_the_same_function_without_batchnorm(block, rng):
    model = UNet(features=4, depth=2, block=block, dtype=np.float64, seed=3)
    trained_looking(model, rng)
    x = rng.random((3, 16, 16, 1))
    before = model.forward(x)
    bns = len(model.layers_of(BatchNormalization))
    assert fold_batchnorm(model) == bns > 0
    assert model.layers_of(BatchNormalization) == [] and len(model.layers_of(Identity)) == bns
    np.testing.assert_allclose(model.forward(x), before, rtol=1e-12, atol=1e-12)
    assert "enc1.conv1.b" in model.params and not any("gamma" in name for name in model.params)
    assert fold_batchnorm(model) == 0  # nothing left to fold


def test_the_folded_weights_are_the_formula(rng):
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + epsilon), channel by channel."""
    conv = Conv2D(2, 3, 3, use_bias=True, rng=0, dtype=np.float64)
    conv.params["b"][...] = rng.normal(size=3)
    bn = BatchNormalization(3, dtype=np.float64)
    W, b = conv.params["W"].copy(), conv.params["b"].copy()

    class Pair(Block):
        def wiring(self, run, x):
            return run("bn", run("conv", x))

    pair = Pair({"conv": conv, "bn": bn})
    trained_looking(pair, rng)
    gamma, beta = bn.params["gamma"], bn.params["beta"]
    mean, var = bn.buffers["moving_mean"], bn.buffers["moving_variance"]
    assert fold_batchnorm(pair) == 1
    for f in range(3):
        s = gamma[f] / np.sqrt(var[f] + bn.epsilon)
        np.testing.assert_allclose(conv.params["W"][..., f], W[..., f] * s, rtol=1e-15)
        np.testing.assert_allclose(conv.params["b"][f], (b[f] - mean[f]) * s + beta[f], rtol=1e-15)


def test_a_conv_output_read_elsewhere_too_is_not_folded(rng):
    class Fork(Block):  # conv -> bn, and the conv's output also goes on unnormalised
        def wiring(self, run, x):
            h = run("conv", x)
            return run("bn", h) + run("relu", h)

    fork = Fork({"conv": Conv2D(1, 2, 3, rng=0, dtype=np.float64), "bn": BatchNormalization(2, dtype=np.float64),
                 "relu": ReLU()})
    trained_looking(fork, rng)
    x = rng.random((1, 5, 5, 1))
    before = fork.forward(x)
    assert fold_batchnorm(fork) == 0
    np.testing.assert_array_equal(fork.forward(x), before)


def test_the_seed_network_has_nothing_to_fold_and_is_untouched(rng):
    model = UNet(features=2, depth=2, seed=0)
    x = rng.random((2, 8, 8, 1)).astype(np.float32)
    before = model.forward(x)
    assert fold_batchnorm(model) == 0 and not model.folded
    np.testing.assert_array_equal(model.forward(x), before)


def test_replicas_of_a_folded_network_share_its_folded_weights(rng):
    model = UNet(features=4, depth=2, block="residual", dtype=np.float64, seed=1)
    trained_looking(model, rng)
    x = rng.random((4, 16, 16, 1))
    before = model.forward(x)
    fold_batchnorm(model)
    net = DataParallel(model, threads=2)
    twin = net.replicas[1]
    assert twin.layers_of(BatchNormalization) == []
    assert all(twin.params[name] is array for name, array in model.params.items())
    np.testing.assert_allclose(net.forward(x), before, rtol=1e-12, atol=1e-12)
