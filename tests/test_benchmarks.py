"""The benchmarks that explain a step's time: they run, and replay the products the layers compute."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks import bench_gemm_floor, bench_layers
from tinyunet.conv import shifted_conv, tap_groups, tap_offsets
from tinyunet.layers import Conv2D, Conv2DTranspose
from tinyunet.unet import UNet


@pytest.mark.parametrize("block", ["double", "residual"])
def test_the_replay_holds_one_forward_product_per_tap_group_and_up_conv(block):
    model = UNet(features=8, depth=2, block=block, seed=0)  # C >= 8 past the image: one tap a product
    model.forward(np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32), train=True)
    products = bench_gemm_floor.shard_products(model, np.random.default_rng(1))
    convs = [layer for _, layer in model.named_layers() if isinstance(layer, Conv2D)]
    ups = [layer for _, layer in model.named_layers() if isinstance(layer, Conv2DTranspose)]
    taps = [layer.kernel_size[0] * layer.kernel_size[1] for layer in convs]
    first_groups = len(tap_groups(taps[0], 1))  # the first conv's taps over 1 channel: (L, 8) and (L, 1)
    assert first_groups == 2
    assert len(products["forward"]) == sum(taps) - taps[0] + first_groups + len(ups)
    # no input gradient where the input is the image (the first conv, and the residual's first shortcut)
    image_convs = [layer for layer in convs if layer.params["W"].shape[2] == 1]
    assert len(products["input gradient"]) == sum(taps) - sum(
        layer.kernel_size[0] * layer.kernel_size[1] for layer in image_convs) + len(ups)
    biased = [layer for layer in convs if "b" in layer.params]  # none before a BatchNorm
    assert len(biased) < len(convs) if block == "residual" else len(biased) == len(convs)
    assert len(products["weight gradient"]) == len(products["forward"]) + len(biased) + len(ups)  # + bias GEMVs


def test_the_forward_products_are_the_conv_s_own():
    conv = Conv2D(4, 3, 3, rng=0)
    x = np.random.default_rng(0).random((2, 6, 7, 4), dtype=np.float32)
    conv.forward(x, train=True)
    _, _, wp, _, _ = conv.grid
    offsets = tap_offsets(3, 3, wp)
    length = len(conv.x_rows) - offsets[-1]
    expected = shifted_conv(conv.x_rows, conv.params["W"], offsets)[:length]
    forward = bench_gemm_floor.conv_products(conv, np.random.default_rng(1))["forward"]
    total = sum(product().copy() for product in forward)  # each product writes one shared buffer
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module, flags", [(bench_gemm_floor, ["--block", "residual"]), (bench_layers, [])])
def test_the_benchmarks_run_on_a_small_network(module, flags, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--features", "2", "--size", "16", "--batch-size", "2",
                                      "--repeats", "1", "--threads", "2", *flags])
    module.main()
    out = capsys.readouterr().out
    assert "2 shard(s)" in out
    assert ("every product" in out) if module is bench_gemm_floor else ("by kind:" in out and "Conv2D" in out)
