"""Every layer: float64 gradient checks, forward against plain loops, and the interface contract."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import as_array, as_numpy
from tinyunet.gradcheck import GradientMismatch, check_layer
from tinyunet.layers import (Concatenate, Conv2D, Conv2DTranspose, Dropout, MaxPooling2D, ReLU,
                             Sigmoid)


def f64(layer, xp):
    """Turn a freshly built layer's parameters into float64 (gradient checks need the precision)."""
    for key, value in layer.params.items():
        layer.params[key] = value.astype(xp.float64)
        layer.grads[key] = layer.grads[key].astype(xp.float64)
    return layer


def with_random_bias(layer, rng, xp):
    """Biases start at zero; a random one makes the check see the bias's contribution."""
    layer.params["b"][...] = as_array(rng.standard_normal(layer.params["b"].shape), xp)
    return layer


def away_from_zero(rng, shape, xp):
    """Random values with |x| >= 0.1, so a ±1e-6 perturbation never crosses ReLU's kink."""
    x = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return as_array(x, xp)


def distinct(rng, shape, xp):
    """Values spaced 0.01 apart in random order: no ties, so max-pool's winner is unambiguous."""
    x = rng.permutation(np.prod(shape)).reshape(shape) * 0.01
    return as_array(x, xp)


# --- gradient checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,c_in,c_out,hw", [(3, 3, 4, (5, 6)), (1, 4, 2, (4, 3)),
                                                  (2, 2, 3, (4, 5)), (5, 1, 2, (6, 6))])
def test_conv2d_gradients(xp, rng, kernel, c_in, c_out, hw):
    layer = with_random_bias(f64(Conv2D(c_in, c_out, kernel, rng=rng, xp=xp), xp), rng, xp)
    x = as_array(rng.standard_normal((2, *hw, c_in)), xp)
    errors = check_layer(layer, [x], rng)
    assert set(errors) == {"input0", "W", "b"}


def test_conv2d_transpose_gradients(xp, rng):
    layer = with_random_bias(f64(Conv2DTranspose(3, 2, 2, 2, rng=rng, xp=xp), xp), rng, xp)
    x = as_array(rng.standard_normal((2, 3, 4, 3)), xp)
    assert set(check_layer(layer, [x], rng)) == {"input0", "W", "b"}


@pytest.mark.parametrize("kernel", [1, 3, 5])  # odd: 'same' pads both sides alike, so the flip keeps the grid
def test_conv2d_input_gradient_is_the_conv_of_dout_by_the_flipped_transposed_kernel(xp, rng, kernel):
    """Conv and transposed conv are each other's backward: dL/dx = conv(dout, rot180(W) with C and F swapped)."""
    layer = f64(Conv2D(3, 4, kernel, rng=rng, xp=xp), xp)
    x = as_array(rng.standard_normal((2, 6, 7, 3)), xp)
    layer.forward(x, train=True)
    dout = as_array(rng.standard_normal((2, 6, 7, 4)), xp)
    dx = layer.backward(dout)
    dual = Conv2D(4, 3, kernel, use_bias=False, xp=xp)
    dual.params["W"] = layer.params["W"][::-1, ::-1].transpose(0, 1, 3, 2)  # (KH, KW, F, C), flipped
    np.testing.assert_allclose(as_numpy(dx), as_numpy(dual.forward(dout)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])  # even, and odd sizes whose last row/col is dropped
def test_maxpool_gradients(xp, rng, hw):
    check_layer(MaxPooling2D(2), [distinct(rng, (2, *hw, 3), xp)], rng)


def test_relu_gradients(xp, rng):
    check_layer(ReLU(), [away_from_zero(rng, (2, 3, 4, 5), xp)], rng)


def test_sigmoid_gradients(xp, rng):
    check_layer(Sigmoid(), [as_array(rng.standard_normal((2, 3, 4, 2)) * 3, xp)], rng)


def test_dropout_gradients_with_frozen_mask(xp, rng):
    layer = Dropout(0.4, seed=3, xp=xp)
    x = as_array(rng.standard_normal((2, 4, 4, 3)), xp)
    layer.forward(x, train=True)
    layer.frozen = True
    check_layer(layer, [x], rng)
    assert 0 < float((layer.mask == 0).mean()) < 1


def test_concatenate_gradients_for_both_inputs(xp, rng):
    a = as_array(rng.standard_normal((2, 3, 3, 2)), xp)
    b = as_array(rng.standard_normal((2, 3, 3, 4)), xp)
    assert set(check_layer(Concatenate(), [a, b], rng)) == {"input0", "input1"}


# --- the checker has teeth -------------------------------------------------------------------------

class ConvWithUnflippedKernel(Conv2D):
    """A classic mistake: the input gradient computed with W instead of rot180(W)."""

    def backward(self, dout):
        saved = self.params["W"]
        # backward's scatter (conv.shifted_conv_transpose) applies rot180 of the kernel it is given
        # without flipping anything; given rot180(W), it convolves dout with W itself, unflipped
        self.params["W"] = saved[::-1, ::-1].copy()
        try:
            return super().backward(dout)
        finally:
            self.params["W"] = saved


class PoolToEveryInput(MaxPooling2D):
    """A classic mistake: max-pool's gradient sent to every input of the window."""

    def backward(self, dout):
        return dout.repeat(2, axis=1).repeat(2, axis=2)


class ReLUWithoutMask(ReLU):
    def backward(self, dout):
        return dout


class ConcatSwapped(Concatenate):
    def backward(self, dout):
        a, b = super().backward(dout)
        return b[..., :a.shape[-1]], a


@pytest.mark.parametrize("make_layer,make_inputs", [
    (lambda rng: f64(ConvWithUnflippedKernel(2, 3, 3, rng=rng), np),
     lambda rng: [rng.standard_normal((1, 4, 4, 2))]),
    (lambda rng: PoolToEveryInput(2), lambda rng: [distinct(rng, (1, 4, 4, 2), np)]),
    (lambda rng: ReLUWithoutMask(), lambda rng: [away_from_zero(rng, (1, 3, 3, 2), np)]),
    (lambda rng: ConcatSwapped(), lambda rng: [rng.standard_normal((1, 2, 2, 2)),
                                               rng.standard_normal((1, 2, 2, 2))]),
], ids=["conv-unflipped", "maxpool-to-all", "relu-no-mask", "concat-swapped"])
def test_wrong_backward_fails_the_same_checker(rng, make_layer, make_inputs):
    with pytest.raises(GradientMismatch, match="relative error"):
        check_layer(make_layer(rng), make_inputs(rng), rng)


# --- forward against plain loops -------------------------------------------------------------------

def conv2d_loop(x, W, b):
    """'same' stride-1 convolution, one output value at a time (TensorFlow's padding split)."""
    n, h, w, c = x.shape
    kh, kw, _, f = W.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xpad = np.zeros((n, h + kh - 1, w + kw - 1, c))
    xpad[:, top:top + h, left:left + w] = x
    out = np.zeros((n, h, w, f))
    for i_n in range(n):
        for y in range(h):
            for x_ in range(w):
                for o in range(f):
                    out[i_n, y, x_, o] = (xpad[i_n, y:y + kh, x_:x_ + kw, :] * W[..., o]).sum() + b[o]
    return out


def conv2d_transpose_loop(x, W, b, stride):
    """Each input pixel adds W[:, :, f, c] * x to the output block at (stride*y, stride*x)."""
    n, h, w, c = x.shape
    kh, kw, f, _ = W.shape
    out = np.zeros((n, h * stride, w * stride, f)) + b
    for i_n in range(n):
        for y in range(h):
            for x_ in range(w):
                for ch in range(c):
                    out[i_n, y * stride:y * stride + kh, x_ * stride:x_ * stride + kw, :] += \
                        x[i_n, y, x_, ch] * W[:, :, :, ch]
    return out


def maxpool_loop(x, p):
    n, h, w, c = x.shape
    out = np.zeros((n, h // p, w // p, c))
    for y in range(h // p):
        for x_ in range(w // p):
            out[:, y, x_, :] = x[:, y * p:(y + 1) * p, x_ * p:(x_ + 1) * p, :].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_conv2d_forward_matches_loop(xp, rng, kernel):
    layer = with_random_bias(Conv2D(3, 4, kernel, rng=rng, xp=xp), rng, xp)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    out = as_numpy(layer.forward(as_array(x, xp)))
    ref = conv2d_loop(x, as_numpy(layer.params["W"]), as_numpy(layer.params["b"]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_conv2d_transpose_forward_matches_loop(xp, rng):
    layer = with_random_bias(Conv2DTranspose(3, 2, 2, 2, rng=rng, xp=xp), rng, xp)
    x = rng.standard_normal((2, 3, 4, 3)).astype(np.float32)
    out = as_numpy(layer.forward(as_array(x, xp)))
    ref = conv2d_transpose_loop(x, as_numpy(layer.params["W"]), as_numpy(layer.params["b"]), 2)
    assert out.shape == (2, 6, 8, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (101, 101)])
def test_maxpool_forward_matches_loop_and_floors_odd_sizes(xp, rng, hw):
    x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    out = as_numpy(MaxPooling2D(2).forward(as_array(x, xp)))
    assert out.shape == (2, hw[0] // 2, hw[1] // 2, 3)
    np.testing.assert_array_equal(out, maxpool_loop(x, 2))


@pytest.mark.parametrize("make_layer, x_shape", [(lambda xp: Conv2D(3, 5, 3, rng=0, xp=xp), (4, 33, 40, 3)),
                                                  (lambda xp: Conv2DTranspose(4, 3, rng=0, xp=xp), (2, 8, 9, 4))])
def test_float32_bias_gradient_matches_a_plain_sum(xp, rng, make_layer, x_shape):
    """The bias gradient is computed as a GEMV (``ones @ rows``); it must equal the plain float64 sum."""
    layer = make_layer(xp)
    x = as_array(rng.standard_normal(x_shape).astype(np.float32), xp)
    out = layer.forward(x, train=True)
    dout = as_array(rng.standard_normal(out.shape).astype(np.float32), xp)
    layer.backward(dout)
    expected = as_numpy(dout).astype(np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(as_numpy(layer.grads["b"]), expected, rtol=1e-5, atol=1e-3)


def test_maxpool_sends_tied_gradient_to_one_input(xp):
    layer = MaxPooling2D(2)
    layer.forward(xp.ones((1, 2, 2, 1), dtype=xp.float32))
    dx = as_numpy(layer.backward(xp.full((1, 1, 1, 1), 5.0, dtype=xp.float32)))
    assert dx.sum() == 5.0 and (dx != 0).sum() == 1


# --- the interface contract ------------------------------------------------------------------------

def test_params_and_grads_share_keys_and_shapes(xp):
    for layer in [Conv2D(3, 5, 3, xp=xp), Conv2DTranspose(4, 2, xp=xp)]:
        assert list(layer.params) == list(layer.grads) == ["W", "b"]
        for key in layer.params:
            assert layer.params[key].shape == layer.grads[key].shape
    assert Conv2D(3, 5, 3, xp=xp).params["W"].shape == (3, 3, 3, 5)  # (KH, KW, C_in, C_out)
    assert Conv2DTranspose(4, 2, xp=xp).params["W"].shape == (2, 2, 2, 4)  # (KH, KW, C_out, C_in)
    for layer in [MaxPooling2D(), ReLU(), Sigmoid(), Dropout(0.5), Concatenate()]:
        assert layer.params == {} and layer.grads == {}


def test_overwriting_weights_changes_forward(xp):
    layer = Conv2D(1, 1, 3, xp=xp)
    layer.params["W"][...] = 0
    layer.params["W"][1, 1, 0, 0] = 2.0  # the centre tap: out = 2x + b
    layer.params["b"][...] = 0.5
    x = xp.arange(12, dtype=xp.float32).reshape(1, 3, 4, 1)
    np.testing.assert_allclose(as_numpy(layer.forward(x)), 2 * as_numpy(x) + 0.5)


def test_float32_by_default_and_float64_throughout(xp, rng):
    layers = [Conv2D(2, 2, 3, xp=xp), Conv2DTranspose(2, 2, xp=xp), MaxPooling2D(), ReLU(),
              Sigmoid(), Dropout(0.5, xp=xp)]
    for dtype in (np.float32, np.float64):
        for layer in layers:
            if dtype == np.float64:
                f64(layer, xp)
            else:
                assert all(p.dtype == np.float32 for p in layer.params.values())
            x = as_array(rng.standard_normal((1, 4, 4, 2)).astype(dtype), xp)
            out = layer.forward(x, train=True)
            assert out.dtype == dtype, type(layer).__name__
            assert layer.backward(xp.ones_like(out)).dtype == dtype, type(layer).__name__


def test_dropout_is_identity_at_inference_and_reproducible_by_seed(xp):
    x = xp.ones((4, 16, 16, 8), dtype=xp.float32)
    assert Dropout(0.5, xp=xp).forward(x, train=False) is x
    a = Dropout(0.25, seed=7, xp=xp)
    b = Dropout(0.25, seed=7, xp=xp)
    out_a, out_b = as_numpy(a.forward(x, train=True)), as_numpy(b.forward(x, train=True))
    np.testing.assert_array_equal(out_a, out_b)
    mask = as_numpy(a.mask)
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.75)}
    assert abs((mask == 0).mean() - 0.25) < 0.03  # 8192 draws
    assert abs(out_a.mean() - 1.0) < 0.05  # inverted dropout keeps the expectation
    second = as_numpy(a.forward(x, train=True))
    assert not np.array_equal(second, out_a)  # a fresh mask each step unless frozen


def test_dropout_rejects_rate_one():
    with pytest.raises(ValueError, match="rate"):
        Dropout(1.0)


def test_transpose_conv_rejects_overlapping_kernels():
    with pytest.raises(ValueError, match="kernel_size == strides"):
        Conv2DTranspose(2, 2, kernel_size=3, strides=2)


def test_concatenate_rejects_mismatched_sizes(xp):
    with pytest.raises(ValueError, match="equal"):
        Concatenate().forward(xp.zeros((1, 4, 4, 1)), xp.zeros((1, 5, 4, 1)))


def test_sigmoid_does_not_overflow(xp):
    out = as_numpy(Sigmoid().forward(xp.asarray([[-1000.0, 0.0, 1000.0]], dtype=xp.float32)))
    np.testing.assert_array_equal(out, [[0.0, 0.5, 1.0]])
