"""float32 stays float32 at batches of more than 65535 pixels, under every promotion rule tinyunet meets.

Value-based promotion (NumPy 1.x, CuPy 13) types a Python int by its value: up to 65535 it fits a
uint16, which float32 absorbs; above, it is a uint32, and float32 with uint32 gives float64. A loss
divided by its pixel count as a Python int would then hand the whole backward a float64 gradient.
Each layer, the loss, the U-Net and Adam are run here under the installed NumPy's own rules, under
CuPy 13's (the stand-in's "legacy", which NumPy 2 cannot switch to), under CuPy 14's (NEP 50) and,
on a GPU, under the installed CuPy's.
"""

from __future__ import annotations

import numpy as np
import pytest

import cupy_standin
from conftest import REAL_GPU, _CUPY_SKIP, cupy_under_test
from tinyunet.backend import as_array
from tinyunet.layers import Concatenate, Conv2D, Conv2DTranspose, Dropout, MaxPooling2D, ReLU, Sigmoid
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.unet import UNet

BIG = (2, 192, 192)  # 73,728 pixels: past 65535, where an int's value-based type becomes uint32


@pytest.fixture(params=["numpy", "cupy13", "cupy14", "gpu"])
def xp(request, monkeypatch):
    if request.param == "numpy":
        return np
    if request.param == "gpu":  # the installed CuPy, on the device
        if _CUPY_SKIP is not None and not REAL_GPU:
            pytest.skip("no GPU here: cupy13 and cupy14 check both rules through the stand-in")
        return cupy_under_test(monkeypatch)
    return cupy_standin.install(monkeypatch, promotion="legacy" if request.param == "cupy13" else "weak")


def float32s(xp, rng, *shape):
    return as_array(rng.standard_normal(shape).astype(np.float32), xp)


def test_every_layer_keeps_float32(xp):
    rng = np.random.default_rng(0)
    x = float32s(xp, rng, *BIG, 2)
    layers = [Conv2D(2, 3, 3, rng=0, xp=xp), Conv2D(2, 3, 1, rng=0, xp=xp), Conv2DTranspose(2, 3, 2, 2, rng=0, xp=xp),
              MaxPooling2D(2), ReLU(), Sigmoid(), Dropout(0.3, seed=0, xp=xp)]
    for layer in layers:
        out = layer.forward(x, train=True)
        dx = layer.backward(float32s(xp, rng, *out.shape))
        name = type(layer).__name__
        assert (out.dtype, dx.dtype) == (np.float32, np.float32), name
        assert all(g.dtype == np.float32 for g in layer.grads.values()), name
    concat = Concatenate()
    out = concat.forward(x, x)
    assert out.dtype == np.float32 and {d.dtype for d in concat.backward(out)} == {np.dtype(np.float32)}


def test_loss_network_and_adam_keep_float32(xp):
    rng = np.random.default_rng(1)
    y = as_array((rng.random(BIG + (1,)) > 0.5).astype(np.float32), xp)
    loss, dlogits = binary_crossentropy(float32s(xp, rng, *BIG, 1), y)
    assert (loss.dtype, dlogits.dtype) == (np.float32, np.float32)

    model = UNet(features=2, depth=2, dropout=(0.25, 0.3), gpu=xp is not np)
    _, dlogits = binary_crossentropy(model.forward(as_array(rng.random(BIG + (1,), dtype=np.float32), xp),
                                                   train=True), y)
    dx = model.backward(dlogits)
    assert dx.dtype == np.float32 and {g.dtype for g in model.grads.values()} == {np.dtype(np.float32)}
    opt = Adam(model.params)
    opt.step(model.grads)
    assert {a.dtype for a in (*model.params.values(), *opt.m.values(), *opt.v.values())} == {np.dtype(np.float32)}
