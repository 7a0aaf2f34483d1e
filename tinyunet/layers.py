"""The U-Net's layers, each a small class with its forward and backward pass side by side.

Every layer follows one interface:

* ``forward(x, train=False)`` returns the output and keeps only what ``backward`` needs;
* ``backward(dout)`` takes dL/d(output), returns dL/d(input) and fills ``grads``;
* ``params`` and ``grads`` are dicts with the same keys (``"W"``, ``"b"``); empty without parameters.

Arrays are channels-last, ``(N, H, W, C)``, as in Keras; see :mod:`tinyunet.conv` for the notation.
Every op takes its array module from its input (``xp = get_array_module(x)``), so the same code runs
on NumPy and on CuPy. Nothing edits ``dout`` in place.
"""

from __future__ import annotations

import numpy as np

from tinyunet.backend import as_array, get_array_module, make_rng
from tinyunet.conv import blocks_to_space, conv_outsize, flip_pads, im2col, same_pads, space_to_blocks


def glorot_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator,
                   dtype) -> np.ndarray:
    """Keras's default kernel initialiser: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Conv2D:
    """A 2-D convolution with 'same' padding, stride 1 and a bias.

        out[n, y, x, f] = sum_(i, j, c) x_pad[n, y + i, x + j, c] * W[i, j, c, f] + b[f]

    Forward is one GEMM on the im2col matrix. Backward:

        dW = cols^T @ dout                         (KH*KW*C, F)
        db = sum of dout over N, H, W              (F,)
        dx = conv(dout, W flipped in i and j, with C and F swapped)

    The input gradient is the *transposed* convolution of ``dout`` by ``W``; at stride 1 that is an
    ordinary convolution with the kernel rotated by 180 degrees, so it reuses :func:`im2col` instead
    of scattering patches back (col2im).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, *, rng=None,
                 dtype=np.float32, xp=np):
        kh = kw = kernel_size
        self.kernel_size = (kh, kw)
        self.pads = same_pads(kh, kw)  # (top, bottom, left, right)
        rng = np.random.default_rng(rng)
        W = glorot_uniform((kh, kw, c_in, c_out), kh * kw * c_in, kh * kw * c_out, rng, dtype)
        self.params = {
            "W": as_array(W, xp),  # (KH, KW, C, F)
            "b": xp.zeros(c_out, dtype=dtype),  # (F,)
        }
        self.grads = {"W": xp.zeros_like(self.params["W"]), "b": xp.zeros_like(self.params["b"])}
        self.cols = None  # (N*H*W, KH*KW*C) the im2col matrix of the input, for dW
        self.x_shape = None  # (N, H, W, C)

    def forward(self, x, train: bool = False):
        kh, kw = self.kernel_size
        W, b = self.params["W"], self.params["b"]
        n, h, w, _ = x.shape
        cols = im2col(x, kh, kw, self.pads)  # (N*H*W, KH*KW*C)
        out = cols @ W.reshape(-1, W.shape[3]) + b  # (N*H*W, F)
        self.cols, self.x_shape = cols, x.shape
        return out.reshape(n, h, w, W.shape[3])  # (N, H, W, F)

    def backward(self, dout):
        kh, kw = self.kernel_size
        W = self.params["W"]
        n, h, w, c = self.x_shape
        dout2d = dout.reshape(-1, dout.shape[3])  # (N*H*W, F)
        self.grads["W"][...] = (self.cols.T @ dout2d).reshape(W.shape)  # (KH, KW, C, F)
        self.grads["b"][...] = dout2d.sum(axis=0)
        # dx = conv(dout, rot180(W) with C <-> F): a transposed conv of dout, written as a conv.
        W_rot = W[::-1, ::-1].transpose(0, 1, 3, 2)  # (KH, KW, F, C)
        dcols = im2col(dout, kh, kw, flip_pads(self.pads))  # (N*H*W, KH*KW*F)
        dx = dcols @ W_rot.reshape(-1, c)  # (N*H*W, C)
        return dx.reshape(n, h, w, c)


class Conv2DTranspose:
    """A transposed ("up-") convolution whose kernel equals its stride: each input pixel paints
    its own k x k block of the output, so the blocks never overlap.

        out[n, k*y + i, k*x + j, f] = sum_c x[n, y, x, c] * W[i, j, f, c] + b[f]

    The kernel is stored as Keras stores it, ``(KH, KW, F, C)``. Forward is one GEMM
    ``(N*H*W, C) @ (C, KH*KW*F)`` followed by laying the blocks out in space. Backward is the
    matching stride-k convolution of ``dout``, which is why a transposed conv is the backward
    of a conv and the other way round:

        dx = conv_stride_k(dout, W)     dW = x^T @ blocks(dout)     db = sum of dout
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 2, strides: int = 2, *, rng=None,
                 dtype=np.float32, xp=np):
        if kernel_size != strides:
            raise ValueError(
                f"Conv2DTranspose supports kernel_size == strides (non-overlapping blocks, as the "
                f"U-Net uses); got kernel_size={kernel_size}, strides={strides}"
            )
        k = kernel_size
        self.k = k
        rng = np.random.default_rng(rng)
        W = glorot_uniform((k, k, c_out, c_in), k * k * c_out, k * k * c_in, rng, dtype)
        self.params = {
            "W": as_array(W, xp),  # (KH, KW, F, C)
            "b": xp.zeros(c_out, dtype=dtype),  # (F,)
        }
        self.grads = {"W": xp.zeros_like(self.params["W"]), "b": xp.zeros_like(self.params["b"])}
        self.x2d = None  # (N*H*W, C) the input as rows, for dW

    def _w_rows(self):
        """The kernel as a (C, KH*KW*F) matrix: one row of output-block weights per input channel."""
        W = self.params["W"]
        k, f, c = self.k, W.shape[2], W.shape[3]
        return W.transpose(3, 0, 1, 2).reshape(c, k * k * f)  # (C, KH*KW*F)

    def forward(self, x, train: bool = False):
        n, h, w, c = x.shape
        f = self.params["W"].shape[2]
        x2d = x.reshape(n * h * w, c)  # (N*H*W, C)
        rows = x2d @ self._w_rows()  # (N*H*W, KH*KW*F): one output block per input pixel
        self.x2d = x2d
        return blocks_to_space(rows, n, h, w, self.k) + self.params["b"].reshape(1, 1, 1, f)

    def backward(self, dout):
        W = self.params["W"]
        k, f, c = self.k, W.shape[2], W.shape[3]
        n, oh, ow, _ = dout.shape
        drows = space_to_blocks(dout, k)  # (N*H*W, KH*KW*F): stride-k patches of dout
        dW_rows = self.x2d.T @ drows  # (C, KH*KW*F)
        self.grads["W"][...] = dW_rows.reshape(c, k, k, f).transpose(1, 2, 3, 0)  # (KH, KW, F, C)
        self.grads["b"][...] = dout.sum(axis=(0, 1, 2))
        dx = drows @ self._w_rows().T  # (N*H*W, C): a stride-k conv of dout by W
        return dx.reshape(n, oh // k, ow // k, c)


class MaxPooling2D:
    """Max over non-overlapping pool x pool windows ('valid': an odd last row/column is dropped).

        out[n, y, x, c] = max_(i, j) x[n, p*y + i, p*x + j, c]

    Backward sends each output gradient to the one input that won its window (the first, on ties)
    and zero to the rest, including any dropped row/column.
    """

    def __init__(self, pool_size: int = 2):
        self.pool_size = pool_size
        self.params, self.grads = {}, {}
        self.argmax = None  # (N, OH, OW, C) index 0..p*p-1 of the winner inside each window
        self.x_shape = None  # (N, H, W, C)

    def _windows(self, x):
        p = self.pool_size
        n, h, w, c = x.shape
        oh, ow = conv_outsize(h, p, stride=p), conv_outsize(w, p, stride=p)
        x = x[:, :oh * p, :ow * p, :]
        win = x.reshape(n, oh, p, ow, p, c).transpose(0, 1, 3, 5, 2, 4)  # (N, OH, OW, C, P, P)
        return win.reshape(n, oh, ow, c, p * p)  # (N, OH, OW, C, P*P)

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        win = self._windows(x)
        self.argmax = win.argmax(axis=-1).astype(xp.uint8)  # (N, OH, OW, C)
        self.x_shape = x.shape
        return xp.take_along_axis(win, self.argmax[..., None].astype(xp.intp), axis=-1)[..., 0]

    def backward(self, dout):
        xp = get_array_module(dout)
        p = self.pool_size
        n, h, w, c = self.x_shape
        _, oh, ow, _ = dout.shape
        hits = self.argmax[..., None] == xp.arange(p * p, dtype=xp.uint8)  # (N, OH, OW, C, P*P)
        dwin = hits * dout[..., None]  # (N, OH, OW, C, P*P)
        dwin = dwin.reshape(n, oh, ow, c, p, p).transpose(0, 1, 4, 2, 5, 3)  # (N, OH, P, OW, P, C)
        dx = xp.zeros(self.x_shape, dtype=dout.dtype)
        dx[:, :oh * p, :ow * p, :] = dwin.reshape(n, oh * p, ow * p, c)
        return dx


class ReLU:
    """out = max(x, 0);  dx = dout where x > 0, else 0."""

    def __init__(self):
        self.params, self.grads = {}, {}
        self.mask = None  # (N, H, W, C) bool, x > 0

    def forward(self, x, train: bool = False):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dout):
        return dout * self.mask


class Sigmoid:
    """out = 1 / (1 + exp(-x));  dx = dout * out * (1 - out)."""

    def __init__(self):
        self.params, self.grads = {}, {}
        self.out = None  # the forward output, all backward needs

    def forward(self, x, train: bool = False):
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout):
        return dout * self.out * (1 - self.out)


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp is only ever taken of -|x|."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Dropout:
    """Inverted dropout: in training each value is kept with probability 1 - rate and scaled by
    1 / (1 - rate), so nothing changes at inference, where the layer is the identity.

        out = x * mask,   mask = keep / (1 - rate),   keep ~ Bernoulli(1 - rate)
        dx  = dout * mask

    ``mask`` stays inspectable after a training forward. With ``frozen = True`` a training forward
    reuses the last mask instead of drawing a new one (gradient checks need the same mask twice).
    """

    def __init__(self, rate: float, *, seed=None, xp=np):
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.params, self.grads = {}, {}
        self.xp = xp  # the array module the masks are drawn on
        self.rng = make_rng(xp, seed)  # draws the masks
        self.frozen = False  # reuse the current mask in training forwards
        self.mask = None  # (N, H, W, C) 0 or 1 / (1 - rate), from the last training forward
        self.train = False  # whether the last forward applied the mask

    def reseed(self, seed) -> None:
        """Restart the mask stream from ``seed`` (an int or a sequence of ints)."""
        self.rng = make_rng(self.xp, seed)

    def forward(self, x, train: bool = False):
        self.train = train and self.rate > 0
        if not self.train:
            return x
        if not (self.frozen and self.mask is not None and self.mask.shape == x.shape):
            keep = self.rng.random(x.shape, dtype=x.dtype) >= self.rate
            self.mask = keep * x.dtype.type(1 / (1 - self.rate))
        return x * self.mask

    def backward(self, dout):
        return dout * self.mask if self.train else dout


class Concatenate:
    """Join two inputs on the channel axis: out = [a, b];  da, db = the matching slices of dout."""

    def __init__(self):
        self.params, self.grads = {}, {}
        self.split = None  # channels of the first input

    def forward(self, a, b, train: bool = False):
        xp = get_array_module(a)
        if a.shape[:3] != b.shape[:3]:
            raise ValueError(f"Concatenate needs equal (N, H, W); got {a.shape} and {b.shape}")
        self.split = a.shape[3]
        return xp.concatenate([a, b], axis=3)  # (N, H, W, Ca + Cb)

    def backward(self, dout):
        return dout[..., :self.split], dout[..., self.split:]
