"""The whole U-Net: its shape and parameters, a whole-network gradient check, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import as_array, as_numpy
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.unet import UNet

from helpers import check_whole_network


def test_seed_architecture_has_485673_parameters():
    model = UNet(features=8, depth=4)
    assert model.count_params() == 485_673


def test_parameters_in_forward_order_with_keras_shapes():
    model = UNet(features=8, depth=4)
    names = list(model.params)
    assert names[:4] == ["enc1.conv1.W", "enc1.conv1.b", "enc1.conv2.W", "enc1.conv2.b"]
    assert names[8:10] == ["enc3.conv1.W", "enc3.conv1.b"]
    assert names[16:20] == ["bridge.conv1.W", "bridge.conv1.b", "bridge.conv2.W", "bridge.conv2.b"]
    assert names[20:22] == ["dec4.up.W", "dec4.up.b"]
    assert names[-2:] == ["head.W", "head.b"]
    shapes = {name: p.shape for name, p in model.params.items()}
    assert shapes["enc1.conv1.W"] == (3, 3, 1, 8)
    assert shapes["bridge.conv2.W"] == (3, 3, 128, 128)
    assert shapes["dec4.up.W"] == (2, 2, 64, 128)  # (KH, KW, C_out, C_in) as Keras stores it
    assert shapes["dec4.conv1.W"] == (3, 3, 128, 64)  # concat of 64 upsampled + 64 skip
    assert shapes["head.W"] == (1, 1, 8, 1)
    assert list(model.grads) == names
    assert all(model.grads[n].shape == shapes[n] for n in names)


def test_params_are_the_layers_own_arrays():
    model = UNet(features=2, depth=1, dropout=(0.0,))
    model.params["head.b"][...] = 3.0
    assert float(model.head.params["b"][0]) == 3.0


def test_keras_initialisation_reproducible_from_seed():
    a, b, c = UNet(seed=5), UNet(seed=5), UNet(seed=6)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.params["enc2.conv1.W"], c.params["enc2.conv1.W"])
    W = a.params["bridge.conv1.W"]  # glorot: limit = sqrt(6 / (9*64 + 9*128))
    limit = np.sqrt(6 / (9 * 64 + 9 * 128))
    assert W.max() <= limit and W.min() >= -limit and W.max() > 0.9 * limit
    assert all(not p.any() for n, p in a.params.items() if n.endswith(".b"))


@pytest.mark.parametrize("depth,size", [(1, 6), (2, 12), (3, 8), (4, 128), (4, 32)])
def test_any_depth_and_size_divisible_by_2_to_the_depth(xp, depth, size):
    model = UNet(features=2, depth=depth, dropout=(0.1,) * depth, gpu=xp is not np)
    x = xp.zeros((2, size, size + 2 ** depth, 1), dtype=xp.float32)
    assert model.forward(x, train=True).shape == (2, size, size + 2 ** depth, 1)
    probs = as_numpy(model.predict(x))
    assert probs.shape == (2, size, size + 2 ** depth, 1) and (0 <= probs).all() and (probs <= 1).all()


def test_size_not_divisible_says_what_to_do():
    with pytest.raises(ValueError, match="divisible by 16.*resize or pad"):
        UNet().forward(np.zeros((1, 101, 101, 1), dtype=np.float32))


def test_wrong_number_of_dropout_rates():
    with pytest.raises(ValueError, match="one dropout rate per level"):
        UNet(depth=3, dropout=(0.1, 0.2))


@pytest.mark.parametrize("depth", [1, 3, 5, 6])
def test_any_depth_builds_with_the_recipe_dropout(depth):
    """No dropout given: the recipe's rates cut to the depth, or extended with its last (0.5)."""
    model = UNet(features=2, depth=depth)
    assert model.config["dropout"] == [0.25, 0.3, 0.4, 0.5, 0.5, 0.5][:depth]
    x = np.zeros((1, 2 ** depth, 2 ** depth, 1), dtype=np.float32)
    assert model.forward(x).shape == (1, 2 ** depth, 2 ** depth, 1)


def test_whole_network_gradient_check(xp):
    """loss -> logits -> input and every parameter, float64, dropout active with frozen masks."""
    model = UNet(features=2, depth=2, dropout=(0.25, 0.5), seed=3, dtype=np.float64,
                 gpu=xp is not np)
    rng = np.random.default_rng(0)
    for p in model.params.values():  # random biases, so their gradients are not trivially tested
        if p.ndim == 1:
            p[...] = as_array(rng.standard_normal(p.shape) * 0.1, xp)
    x = as_array(rng.standard_normal((2, 16, 16, 1)), xp)
    y = as_array((rng.random((2, 16, 16, 1)) > 0.6).astype(np.float64), xp)

    assert len(check_whole_network(model, x, y)) == 1 + 26  # input + 13 layers with W and b


def test_overfits_a_handful_of_images(xp):
    """A small U-Net drives its training loss down by more than 90 % on four images."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    masks = np.stack([((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)
                      for cy, cx, r in [(10, 12, 6), (20, 20, 9), (16, 5, 4), (25, 8, 7)]])
    images = masks * 0.6 + rng.normal(0.2, 0.1, masks.shape)  # bright discs on noise
    x = as_array(images[..., None].astype(np.float32), xp)
    y = as_array(masks[..., None].astype(np.float32), xp)
    model = UNet(features=4, depth=2, dropout=(0.0, 0.0), seed=1, gpu=xp is not np)
    opt = Adam(model.params, lr=1e-2)
    losses = []
    for _ in range(150):
        loss, dlogits = binary_crossentropy(model.forward(x, train=True), y)
        model.backward(dlogits)
        opt.step(model.grads)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_float64_model_gives_float64_everywhere():
    model = UNet(features=2, depth=2, dropout=(0.2, 0.2), dtype=np.float64)
    logits = model.forward(np.zeros((1, 8, 8, 1)), train=True)
    model.backward(np.ones_like(logits))
    assert logits.dtype == np.float64
    assert all(g.dtype == np.float64 for g in model.grads.values())


def test_reseeding_dropout_repeats_the_masks():
    model = UNet(features=2, depth=2, dropout=(0.5, 0.5))
    x = np.ones((1, 8, 8, 1), dtype=np.float32)
    model.reseed_dropout((1, 2))
    first = model.forward(x, train=True)
    model.reseed_dropout((1, 2))
    np.testing.assert_array_equal(model.forward(x, train=True), first)


def test_load_params_round_trip_and_mismatch():
    a, b = UNet(features=2, depth=2, dropout=(0, 0), seed=1), UNet(features=2, depth=2,
                                                                   dropout=(0, 0), seed=2)
    b.load_params({k: v.copy() for k, v in a.params.items()})
    x = np.random.default_rng(0).random((1, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    with pytest.raises(ValueError, match="names differ"):
        UNet(features=2, depth=1, dropout=(0,)).load_params(a.params)
