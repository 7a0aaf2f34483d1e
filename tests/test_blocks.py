"""BatchNormalization, Add, bias-free convs, the blocks (DoubleConv, ResidualBlock, Block itself), the U-Net
kinds built from them, and data parallelism with BatchNorm's per-shard statistics."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import as_array, as_numpy
from tinyunet.blocks import BLOCKS, Block, DoubleConv, ResidualBlock, Sequence
from tinyunet.gradcheck import assert_gradients_close, check_layer, numerical_gradient
from tinyunet.layers import Add, BatchNormalization, Conv2D, Dropout, ReLU
from tinyunet.losses import binary_crossentropy
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet

from helpers import check_whole_network


def random_bn(channels: int, rng, dtype=np.float64, xp=np) -> BatchNormalization:
    """A BatchNormalization whose gamma, beta and moving statistics are random (none trivially 1 or 0)."""
    layer = BatchNormalization(channels, dtype=dtype, xp=xp)
    layer.params["gamma"][...] = as_array(rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels), xp)
    layer.params["beta"][...] = as_array(rng.standard_normal(channels), xp)
    layer.buffers["moving_mean"][...] = as_array(rng.standard_normal(channels), xp)
    layer.buffers["moving_variance"][...] = as_array(rng.uniform(0.5, 2.0, channels), xp)
    return layer


def channel_data(rng, shape):
    """Random values with a different mean and spread per channel, as a conv's output has."""
    c = shape[-1]
    return rng.standard_normal(shape) * rng.uniform(0.5, 2.0, c) + rng.uniform(-1.0, 1.0, c)


def randomise_vectors(block, rng, scale: float = 0.5, xp=np) -> None:
    """Random biases, gammas and betas: their gradients are then tested for more than a trivial value."""
    for p in block.params.values():
        if p.ndim == 1:
            p[...] = as_array(rng.standard_normal(p.shape) * scale, xp)
    for layer in block.layers_of(BatchNormalization):
        layer.params["gamma"][...] = as_array(rng.uniform(0.5, 1.5, layer.params["gamma"].shape), xp)


# --- BatchNormalization -----------------------------------------------------------------------------

def bn_reference(x, gamma, beta, epsilon=1e-3):
    """Keras's training-mode formula, written plainly: mean and biased variance over N, H, W."""
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    return gamma * (x - mean) / np.sqrt(var + epsilon) + beta, mean, var


def test_batchnorm_gradients_in_training_mode(xp, rng):
    layer = random_bn(3, rng, xp=xp)
    x = as_array(channel_data(rng, (2, 3, 4, 3)), xp)
    assert set(check_layer(layer, [x], rng)) == {"input0", "gamma", "beta"}


def test_batchnorm_gradients_in_inference_mode(xp, rng):
    """Study mode's backward after a train=False forward: the affine map with the moving statistics."""
    layer = random_bn(3, rng, xp=xp)
    x = as_array(channel_data(rng, (2, 3, 4, 3)), xp)
    G = as_array(rng.standard_normal(x.shape), xp)  # random upstream gradient

    def loss() -> float:
        return float((layer.forward(x, train=False) * G).sum())

    layer.forward(x, train=False)
    analytic = {"input": layer.backward(G)} | {key: g.copy() for key, g in layer.grads.items()}
    for name, array in ({"input": x} | layer.params).items():
        assert_gradients_close(name, analytic[name], numerical_gradient(loss, array))


def test_batchnorm_forward_and_moving_statistics_follow_keras(rng):
    layer = random_bn(4, rng)
    x = channel_data(rng, (3, 5, 2, 4))
    old_mean, old_var = (layer.buffers[k].copy() for k in ("moving_mean", "moving_variance"))
    out = layer.forward(x, train=True)
    expected, mean, var = bn_reference(x, layer.params["gamma"], layer.params["beta"])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.buffers["moving_mean"], 0.99 * old_mean + 0.01 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.buffers["moving_variance"], 0.99 * old_var + 0.01 * var, rtol=1e-13)
    unbiased = x.reshape(-1, 4).var(axis=0, ddof=1)  # not this one: Keras normalises with the biased variance
    assert not np.allclose(layer.buffers["moving_variance"], 0.99 * old_var + 0.01 * unbiased, rtol=1e-6)


def test_batchnorm_inference_uses_the_moving_statistics(xp, rng):
    layer = random_bn(3, rng, xp=xp)
    x = channel_data(rng, (2, 4, 4, 3))
    before = {k: as_numpy(v).copy() for k, v in layer.buffers.items()}
    out = as_numpy(layer.forward(as_array(x, xp), train=False))
    gamma, beta = as_numpy(layer.params["gamma"]), as_numpy(layer.params["beta"])
    expected = gamma * (x - before["moving_mean"]) / np.sqrt(before["moving_variance"] + 1e-3) + beta
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    for key, value in layer.buffers.items():  # inference never updates them
        np.testing.assert_array_equal(as_numpy(value), before[key])


def test_batchnorm_without_updates_normalises_but_keeps_the_buffers(rng):
    layer = random_bn(3, rng)
    layer.updates_moving = False
    x = channel_data(rng, (2, 4, 4, 3))
    before = {k: v.copy() for k, v in layer.buffers.items()}
    out = layer.forward(x, train=True)
    np.testing.assert_allclose(out, bn_reference(x, layer.params["gamma"], layer.params["beta"])[0], rtol=1e-12,
                               atol=1e-12)
    for key, value in layer.buffers.items():
        np.testing.assert_array_equal(value, before[key])


def test_batchnorm_float32_stays_float32(xp, rng):
    layer = BatchNormalization(3, xp=xp)
    assert all(a.dtype == np.float32 for a in (*layer.params.values(), *layer.buffers.values()))
    x = as_array(channel_data(rng, (2, 4, 4, 3)).astype(np.float32), xp)
    for train in (True, False):
        out = layer.forward(x, train=train)
        assert out.dtype == np.float32
        assert layer.backward(xp.ones_like(out)).dtype == np.float32
        assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert all(a.dtype == np.float32 for a in layer.buffers.values())  # updated in place, not promoted


def test_batchnorm_keras_defaults_and_state():
    layer = BatchNormalization(5)
    assert (layer.momentum, layer.epsilon) == (0.99, 1e-3)
    assert list(layer.params) == list(layer.grads) == ["gamma", "beta"]
    assert list(layer.buffers) == ["moving_mean", "moving_variance"]
    np.testing.assert_array_equal(layer.params["gamma"], np.ones(5))
    np.testing.assert_array_equal(layer.buffers["moving_variance"], np.ones(5))
    assert not layer.params["beta"].any() and not layer.buffers["moving_mean"].any()
    assert layer.updates_moving


# --- Add, Conv2D without bias ------------------------------------------------------------------------

def test_add_gradients_for_both_inputs(xp, rng):
    a = as_array(rng.standard_normal((2, 3, 3, 2)), xp)
    b = as_array(rng.standard_normal((2, 3, 3, 2)), xp)
    assert set(check_layer(Add(), [a, b], rng)) == {"input0", "input1"}
    with pytest.raises(ValueError, match="one shape"):
        Add().forward(a, b[..., :1])


def test_conv2d_without_bias(xp, rng):
    layer = Conv2D(3, 2, 3, use_bias=False, rng=rng, dtype=np.float64, xp=xp)
    assert list(layer.params) == list(layer.grads) == ["W"] and layer.buffers == {}
    x = as_array(rng.standard_normal((2, 4, 5, 3)), xp)
    assert set(check_layer(layer, [x], rng)) == {"input0", "W"}
    with_bias = Conv2D(3, 2, 3, rng=np.random.default_rng(0), dtype=np.float64, xp=xp)
    without = Conv2D(3, 2, 3, use_bias=False, rng=np.random.default_rng(0), dtype=np.float64, xp=xp)
    np.testing.assert_array_equal(as_numpy(without.forward(x)), as_numpy(with_bias.forward(x)))  # b = 0


def test_every_layer_has_buffers():
    from tinyunet.layers import Concatenate, Conv2DTranspose, MaxPooling2D, Sigmoid

    for layer in (Conv2D(1, 1), Conv2DTranspose(1, 1), MaxPooling2D(), ReLU(), Sigmoid(), Dropout(0.1),
                  Concatenate(), Add()):
        assert layer.buffers == {}, type(layer).__name__


# --- the conv units as whole blocks ------------------------------------------------------------------

@pytest.mark.parametrize("c_in, c_out", [(3, 3), (2, 3)], ids=["identity-shortcut", "1x1-shortcut"])
def test_residual_block_gradients(xp, rng, c_in, c_out):
    block = ResidualBlock(c_in, c_out, rng, np.float64, xp)
    assert ("shortcut" in block.children) == (c_in != c_out)
    randomise_vectors(block, rng, xp=xp)
    x = as_array(channel_data(rng, (2, 4, 4, c_in)), xp)
    expected = {"input0", "conv1.W", "bn1.gamma", "bn1.beta", "conv2.W", "bn2.gamma", "bn2.beta"}
    assert set(check_layer(block, [x], rng)) == expected | ({"shortcut.W"} if c_in != c_out else set())


def test_double_conv_with_batchnorm_gradients(xp, rng):
    block = DoubleConv(2, 3, True, rng, np.float64, xp)
    randomise_vectors(block, rng, xp=xp)
    x = as_array(channel_data(rng, (2, 4, 4, 2)), xp)
    assert set(check_layer(block, [x], rng)) == {"input0", "conv1.W", "bn1.gamma", "bn1.beta", "conv2.W",
                                                 "bn2.gamma", "bn2.beta"}


def test_residual_block_forward_is_its_formula(rng):
    block = ResidualBlock(2, 3, rng, np.float64, np)
    x = channel_data(rng, (2, 4, 4, 2))
    h = np.maximum(block.bn1.forward(block.conv1.forward(x), train=True), 0)
    h = block.bn2.forward(block.conv2.forward(h), train=True)
    expected = np.maximum(h + block.shortcut.forward(x), 0)
    np.testing.assert_allclose(block.forward(x, train=True), expected, rtol=1e-12, atol=1e-12)


# --- Block itself -----------------------------------------------------------------------------------

def test_block_rejects_a_duplicate_child_name():
    unit = DoubleConv(1, 2, False, 0, np.float32, np)  # inline: lends the names conv1, relu1, conv2, relu2
    with pytest.raises(ValueError, match="share a name"):
        Sequence({"conv1": Conv2D(1, 1), "unit": unit})
    Sequence({"conv1": Conv2D(1, 1), "unit": DoubleConv(1, 2, False, 0, np.float32, np, inline=False)})


def test_inline_children_lend_their_names_to_the_parent():
    def build(inline):
        return Sequence({"pre": Conv2D(1, 1, 1, rng=0), "unit": DoubleConv(1, 2, True, 0, np.float32, np,
                                                                            inline=inline)})

    inline, nested = build(True), build(False)
    assert list(inline.params) == ["pre.W", "pre.b", "conv1.W", "bn1.gamma", "bn1.beta", "conv2.W", "bn2.gamma",
                                   "bn2.beta"]
    assert list(nested.params) == ["pre.W", "pre.b", "unit.conv1.W", "unit.bn1.gamma", "unit.bn1.beta",
                                   "unit.conv2.W", "unit.bn2.gamma", "unit.bn2.beta"]
    assert list(inline.buffers) == ["bn1.moving_mean", "bn1.moving_variance", "bn2.moving_mean",
                                    "bn2.moving_variance"]
    assert [name for name, _ in nested.named_layers()] == ["pre", "unit.conv1", "unit.bn1", "unit.relu1",
                                                          "unit.conv2", "unit.bn2", "unit.relu2"]
    trace = []
    nested.walk(lambda name, layer, x: trace.append(name) or name, "input")
    assert trace == [name for name, _ in nested.named_layers()]
    assert inline.unit.conv1 is inline.named_layers()[1][1]  # children by attribute
    with pytest.raises(AttributeError, match="no attribute or child 'conv9'"):
        _ = inline.unit.conv9


def test_layers_of_finds_every_layer_of_a_kind_in_forward_order():
    model = UNet(features=2, depth=2, block="double_bn", dropout=(0.1, 0.2))
    names = {id(layer): name for name, layer in model.named_layers()}
    assert [names[id(layer)] for layer in model.layers_of(Dropout)] == ["enc1.dropout", "enc2.dropout",
                                                                         "dec2.dropout", "dec1.dropout"]
    bns = [names[id(layer)] for layer in model.layers_of(BatchNormalization)]
    assert bns[:3] == ["enc1.bn1", "enc1.bn2", "enc2.bn1"] and bns[-1] == "dec1.bn2" and len(bns) == 10
    assert UNet(features=2, depth=1).layers_of(BatchNormalization) == []


def test_a_block_without_wiring_says_so():
    with pytest.raises(NotImplementedError, match="must state its wiring"):
        Block({"relu": ReLU()}).forward(np.zeros((1, 2, 2, 1)))


# --- the U-Net kinds ---------------------------------------------------------------------------------

SEED_NAMES_DEPTH_1 = ["enc1.conv1.W", "enc1.conv1.b", "enc1.conv2.W", "enc1.conv2.b",
                      "bridge.conv1.W", "bridge.conv1.b", "bridge.conv2.W", "bridge.conv2.b",
                      "dec1.up.W", "dec1.up.b", "dec1.conv1.W", "dec1.conv1.b", "dec1.conv2.W", "dec1.conv2.b",
                      "head.W", "head.b"]


def residual_names(unit: str) -> list[str]:
    return [f"{unit}.{name}" for name in ("conv1.W", "bn1.gamma", "bn1.beta", "conv2.W", "bn2.gamma", "bn2.beta",
                                          "shortcut.W")]


def test_seed_parameter_names_are_unchanged():
    model = UNet(features=2, depth=1)
    assert list(model.params) == SEED_NAMES_DEPTH_1
    assert model.buffers == {} and "block" not in model.config  # the seed's config, as its checkpoints hold it
    assert list(UNet(features=2, depth=1, block="double").params) == SEED_NAMES_DEPTH_1


def test_residual_parameter_and_buffer_names():
    model = UNet(features=2, depth=1, block="residual")
    assert list(model.params) == (residual_names("enc1") + residual_names("bridge") + ["dec1.up.W", "dec1.up.b"]
                                  + residual_names("dec1") + ["head.W", "head.b"])
    assert "enc1.conv1.b" not in model.params  # no conv bias before a BatchNorm
    assert list(model.buffers)[:4] == ["enc1.bn1.moving_mean", "enc1.bn1.moving_variance", "enc1.bn2.moving_mean",
                                       "enc1.bn2.moving_variance"]
    assert len(model.buffers) == 3 * 2 * 2 and model.config["block"] == "residual"
    assert model.params["enc1.shortcut.W"].shape == (1, 1, 1, 2)  # (KH, KW, C_in, C_out)
    assert model.params["dec1.shortcut.W"].shape == (1, 1, 4, 2)  # [upsampled, skip] -> features


def test_double_bn_parameter_names():
    model = UNet(features=2, depth=1, block="double_bn")
    unit = ("conv1.W", "bn1.gamma", "bn1.beta", "conv2.W", "bn2.gamma", "bn2.beta")
    assert list(model.params) == ([f"enc1.{n}" for n in unit] + [f"bridge.{n}" for n in unit]
                                  + ["dec1.up.W", "dec1.up.b"] + [f"dec1.{n}" for n in unit] + ["head.W", "head.b"])
    assert list(model.buffers)[-1] == "dec1.bn2.moving_variance"


def test_unknown_block_lists_the_choices():
    with pytest.raises(ValueError, match="double, double_bn, residual"):
        UNet(features=2, depth=1, block="dense")
    assert BLOCKS == ("double", "double_bn", "residual")


def test_residual_walk_traces_the_shortcut():
    def trace(model):
        seen = {}

        def visit(name, layer, *inputs):
            seen[name] = inputs
            return name

        model.walk(visit, "input")
        return seen

    seen = trace(UNet(features=2, depth=1, block="residual"))
    assert list(seen)[:10] == ["enc1.conv1", "enc1.bn1", "enc1.relu1", "enc1.conv2", "enc1.bn2", "enc1.shortcut",
                               "enc1.add", "enc1.relu2", "enc1.pool", "enc1.dropout"]
    assert seen["enc1.shortcut"] == ("input",) and seen["enc1.add"] == ("enc1.bn2", "enc1.shortcut")
    assert seen["dec1.concat"] == ("dec1.up", "enc1.relu2")  # [upsampled, skip]
    assert seen["dec1.shortcut"] == ("dec1.dropout",) and list(seen)[-1] == "head"
    identity = trace(UNet(features=2, depth=1, in_channels=2, block="residual"))  # enc1: 2 -> 2 channels
    assert "enc1.shortcut" not in identity and identity["enc1.add"] == ("enc1.bn2", "input")


def test_residual_summary_shapes_match_the_activations(rng):
    model = UNet(features=2, depth=2, block="residual")
    x = rng.standard_normal((3, 8, 12, 1)).astype(np.float32)
    shapes = {}

    def run(name, layer, *inputs):  # the wiring, with the layers actually called
        out = layer.forward(*inputs, train=False)
        shapes[name] = out.shape
        return out

    logits = model.walk(run, x)
    np.testing.assert_array_equal(logits, model.forward(x))
    rows = model.layer_table((8, 12), batch_size=3)
    assert [r["name"] for r in rows] == ["input", *shapes, "sigmoid"]
    assert {r["name"]: r["shape"] for r in rows[1:-1]} == shapes
    assert sum(r["params"] for r in rows) == model.count_params()
    assert "enc1.add (Add)" in model.summary((8, 12)) and "bridge.bn2 (BatchNormalization)" in model.summary(8)


@pytest.mark.parametrize("block", ["double_bn", "residual"])
def test_whole_network_gradient_check_with_batchnorm(block):
    """loss -> logits -> input and every parameter, float64, dropout with frozen masks, BN in training mode.

    About 2,000 weights: every array is checked, each at (up to) 24 random entries, to stay at a second or two.
    """
    model = UNet(features=2, depth=2, dropout=(0.25, 0.5), block=block, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    randomise_vectors(model, rng, scale=0.1)
    x = rng.standard_normal((2, 8, 8, 1))
    y = (rng.random((2, 8, 8, 1)) > 0.6).astype(np.float64)

    names = check_whole_network(model, x, y, sample=24)
    assert any(name.endswith(".gamma") for name in names) and len(model.buffers) > 0


def test_load_params_with_buffers(rng):
    a = UNet(features=2, depth=1, block="residual", seed=1)
    b = UNet(features=2, depth=1, block="residual", seed=2)
    for value in a.buffers.values():
        value[...] = rng.uniform(0.5, 1.5, value.shape)
    b.load_params({k: v.copy() for k, v in a.params.items()}, {k: v.copy() for k, v in a.buffers.items()})
    x = rng.random((2, 4, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    with pytest.raises(ValueError, match="has buffers"):
        b.load_params(a.params)
    with pytest.raises(ValueError, match="buffer names differ"):
        b.load_params(a.params, dict(list(a.buffers.items())[1:]))


# --- data parallelism with BatchNorm ----------------------------------------------------------------

def bn_model(block: str = "residual", seed: int = 3) -> UNet:
    model = UNet(features=2, depth=2, dropout=(0.0, 0.0), block=block, seed=seed, dtype=np.float64)
    randomise_vectors(model, np.random.default_rng(seed), scale=0.1)
    return model


@pytest.mark.parametrize("block", ["double_bn", "residual"])
def test_data_parallel_normalises_each_shard_with_its_own_statistics(block):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8, 8, 1))
    y = (rng.random((5, 8, 8, 1)) > 0.6).astype(np.float64)
    net = DataParallel(bn_model(block), 2)
    logits = net.forward(x, train=True)
    parts = [part for _, part in net.splits]
    assert len(parts) == 2
    _, dlogits = binary_crossentropy(logits, y)
    net.backward(dlogits)

    # the same two shards, one after the other through a single model in training mode
    alone = bn_model(block)
    expected, grads = [], {name: np.zeros_like(g) for name, g in alone.grads.items()}
    for part in parts:
        expected.append(alone.forward(x[part], train=True))
        alone.backward(dlogits[part])
        for name, g in alone.grads.items():
            grads[name] += g
    np.testing.assert_allclose(logits, np.concatenate(expected), rtol=1e-12, atol=1e-14)
    whole = bn_model(block).forward(x, train=True)  # one batch of 5: other statistics, other logits
    assert not np.allclose(logits, whole, rtol=1e-6)
    for name, g in grads.items():
        np.testing.assert_allclose(net.grads[name], g, rtol=1e-10, atol=1e-14, err_msg=name)

    # only shard 0 (the model) moves the statistics: as one forward of shard 0's images
    first = bn_model(block)
    first.forward(x[parts[0]], train=True)
    assert list(net.buffers) == list(first.buffers)
    for name, value in first.buffers.items():
        np.testing.assert_allclose(net.model.buffers[name], value, rtol=1e-13, err_msg=name)
    assert not np.allclose(net.model.buffers["enc1.bn1.moving_mean"], 0)


def test_replicas_share_the_buffers_and_leave_them_to_the_model():
    net = DataParallel(bn_model(), 3)
    model_bns = net.model.layers_of(BatchNormalization)
    assert model_bns and all(layer.updates_moving for layer in model_bns)
    for replica in net.replicas[1:]:
        for (_, mine), (_, its) in zip(net.model.named_layers(), replica.named_layers()):
            assert all(its.buffers[key] is mine.buffers[key] for key in mine.buffers)
            assert all(its.params[key] is mine.params[key] for key in mine.params)
            assert all(its.grads[key] is not mine.grads[key] for key in mine.grads)
        assert all(not layer.updates_moving for layer in replica.layers_of(BatchNormalization))
    loaded = {name: np.full_like(value, 0.5) for name, value in net.buffers.items()}
    net.load_params(net.params, loaded)  # in place: every replica sees it
    assert all((replica.buffers[name] == 0.5).all() for replica in net.replicas for name in loaded)
