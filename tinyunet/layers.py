"""The U-Net's layers, each a small class with its forward and backward pass side by side.

Every layer follows one interface:

* ``forward(x, train=False)`` returns the output and keeps only what ``backward`` needs;
* ``backward(dout)`` takes dL/d(output), returns dL/d(input) and fills ``grads``;
* ``params`` and ``grads`` are dicts with the same keys (``"W"``, ``"b"``); empty without parameters;
* ``buffers`` holds state that is not trained (BatchNormalization's moving statistics): saved in
  checkpoints beside the parameters, never touched by the optimizer; empty for every other layer.

Arrays are channels-last, ``(N, H, W, C)``, as in Keras; see :mod:`tinyunet.conv` for the notation.
Every op takes its array module from its input (``xp = get_array_module(x)``), so the same code runs
on NumPy and on CuPy. Nothing edits ``dout`` in place.
"""

from __future__ import annotations

import numpy as np

from tinyunet.backend import as_array, get_array_module, make_rng
from tinyunet.conv import (blocks_to_space, column_sums, conv_outsize, padded_rows, same_pads, shifted_conv,
                           shifted_conv_transpose, shifted_conv_weight_grad, space_to_blocks, tap_offsets, valid)


def glorot_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator,
                   dtype) -> np.ndarray:
    """Keras's default kernel initialiser: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Conv2D:
    """A 2-D convolution with 'same' padding, stride 1 and a bias (``use_bias=False``: none, as
    where a BatchNormalization follows, whose beta would only duplicate it).

        out[n, y, x, f] = sum_(i, j, c) x_pad[n, y + i, x + j, c] * W[i, j, c, f] + b[f]

    computed on shifted rows of the padded input (:mod:`tinyunet.conv`), with ``d_rows`` the output
    gradient laid on the same padded grid (zero at the dropped rows):

        out_rows[:L]            = sum_(i, j) x_rows[off : off + L] @ W[i, j]     conv.shifted_conv
        dx_rows[off : off + L] += d_rows[:L] @ W[i, j]^T   for every tap         conv.shifted_conv_transpose
        dW[i, j]                = x_rows[off : off + L]^T @ d_rows[:L]           conv.shifted_conv_weight_grad
        db                      = sum of dout over N, H, W                       (F,)

    The input gradient scatters each output's gradient back to the KH*KW inputs it read: it is
    the *transposed* convolution of ``dout`` by ``W``, i.e. a convolution by the kernel flipped
    (rot180) with its in and out channels swapped.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, *, use_bias: bool = True, rng=None,
                 dtype=np.float32, xp=np):
        kh = kw = kernel_size
        self.kernel_size = (kh, kw)
        self.pads = same_pads(kh, kw)  # (top, bottom, left, right)
        rng = np.random.default_rng(rng)
        W = glorot_uniform((kh, kw, c_in, c_out), kh * kw * c_in, kh * kw * c_out, rng, dtype)
        self.params = {"W": as_array(W, xp)}  # (KH, KW, C, F)
        if use_bias:
            self.params["b"] = xp.zeros(c_out, dtype=dtype)  # (F,)
        self.grads = {key: xp.zeros_like(value) for key, value in self.params.items()}
        self.buffers = {}
        self.x_rows = None  # (N*Hp*Wp, C) the zero-padded input as rows, for dW
        self.grid = None  # (N, Hp, Wp, H, W): the padded grid and the output size on it

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        n, h, w, _ = x.shape
        x_rows, (hp, wp) = padded_rows(x, self.pads)  # (N*Hp*Wp, C)
        out = shifted_conv(x_rows, self.params["W"], tap_offsets(*self.kernel_size, wp))  # (N*Hp*Wp, F)
        if "b" in self.params:
            # out += b, with each padded image line (Wp pixels) as one row: NumPy is ~4x slower adding a
            # vector as short as F = 8 to every row than adding it tiled Wp times to rows of Wp*F values
            lines = out.reshape(n * hp, wp * out.shape[1])  # (N*Hp, Wp*F), a view
            lines += xp.tile(self.params["b"], wp)
        self.x_rows, self.grid = x_rows, (n, hp, wp, h, w)
        return valid(out, n, hp, wp, h, w)  # (N, H, W, F)

    def backward(self, dout, input_grad: bool = True):
        """dL/dx (None when ``input_grad`` is false: a first layer's input is the image itself)."""
        xp = get_array_module(dout)
        n, hp, wp, h, w = self.grid
        top, _, left, _ = self.pads
        d_grid = xp.zeros((n, hp, wp, dout.shape[3]), dtype=dout.dtype)
        d_grid[:, :h, :w] = dout  # the dropped rows get no gradient
        d_rows = d_grid.reshape(-1, dout.shape[3])  # (N*Hp*Wp, F)
        offsets = tap_offsets(*self.kernel_size, wp)
        shifted_conv_weight_grad(self.x_rows, d_rows, offsets, self.grads["W"])
        if "b" in self.grads:
            self.grads["b"][...] = column_sums(d_rows)  # sum of dout over N, H, W (d_rows: zeros elsewhere)
        if not input_grad:
            return None
        dx_rows = shifted_conv_transpose(d_rows, self.params["W"], offsets)  # (N*Hp*Wp, C)
        return valid(dx_rows, n, hp, wp, top + h, left + w)[:, top:, left:]  # (N, H, W, C)

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, H, W, C) -> (N, H, W, F): 'same' padding and stride 1 keep H and W."""
        n, h, w, _ = input_shape
        return (n, h, w, self.params["W"].shape[3])

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """2*N*H*W*KH*KW*C*F: a multiply and an add per weight per output pixel (the bias is not
        counted, nor the padded rows that :func:`valid` drops)."""
        n, h, w, c = input_shape
        kh, kw, _, f = self.params["W"].shape
        return 2 * n * h * w * kh * kw * c * f


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
        self.buffers = {}
        self.x2d = None  # (N*H*W, C) the input as rows, for dW

    def _w_rows(self):
        """The kernel as a (C, KH*KW*F) matrix: one row of output-block weights per input channel."""
        W = self.params["W"]
        k, f, c = self.k, W.shape[2], W.shape[3]
        return W.transpose(3, 0, 1, 2).reshape(c, k * k * f)  # (C, KH*KW*F)

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        n, h, w, c = x.shape
        x2d = x.reshape(n * h * w, c)  # (N*H*W, C)
        rows = x2d @ self._w_rows()  # (N*H*W, KH*KW*F): one output block per input pixel
        rows += xp.tile(self.params["b"], self.k * self.k)  # + b at each of a block's k*k pixels
        self.x2d = x2d
        return blocks_to_space(rows, n, h, w, self.k)  # (N, k*H, k*W, F)

    def backward(self, dout):
        W = self.params["W"]
        k, f, c = self.k, W.shape[2], W.shape[3]
        n, oh, ow, _ = dout.shape
        drows = space_to_blocks(dout, k)  # (N*H*W, KH*KW*F): stride-k patches of dout
        dW_rows = self.x2d.T @ drows  # (C, KH*KW*F)
        self.grads["W"][...] = dW_rows.reshape(c, k, k, f).transpose(1, 2, 3, 0)  # (KH, KW, F, C)
        self.grads["b"][...] = column_sums(drows).reshape(k * k, f).sum(axis=0)  # sum of dout over N, H, W
        dx = drows @ self._w_rows().T  # (N*H*W, C): a stride-k conv of dout by W
        return dx.reshape(n, oh // k, ow // k, c)

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, H, W, C) -> (N, k*H, k*W, F): every input pixel paints a k x k block."""
        n, h, w, _ = input_shape
        return (n, self.k * h, self.k * w, self.params["W"].shape[2])

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """2*N*H*W*C*k*k*F: the GEMM (N*H*W, C) @ (C, k*k*F), a multiply and an add per term."""
        n, h, w, c = input_shape
        return 2 * n * h * w * c * self.k * self.k * self.params["W"].shape[2]


class MaxPooling2D:
    """Max over non-overlapping pool x pool windows ('valid': an odd last row/column is dropped).

        out[n, y, x, c] = max_(i, j) x[n, p*y + i, p*x + j, c]

    The window's p*p positions are p*p strided views of ``x`` (every p-th pixel from (i, j)), so
    the max is p*p - 1 elementwise maxima. Backward sends each output gradient to the one input that
    won its window (the first, on ties) and zero to the rest, including any dropped row/column.
    Forward keeps references to its input and output, not the winners: they are found only when a
    backward needs them, so inference pays for the maxima alone.
    """

    def __init__(self, pool_size: int = 2):
        self.pool_size = pool_size
        self.params, self.grads, self.buffers = {}, {}, {}
        self.x = None  # (N, H, W, C) the input (in the U-Net, the skip the decoder keeps anyway)
        self.out = None  # (N, OH, OW, C) the maxima

    def _positions(self, x, oh: int, ow: int):
        """The p*p views x[:, i::p, j::p] cut to (N, OH, OW, C), in k = i*p + j order."""
        p = self.pool_size
        return [x[:, i:oh * p:p, j:ow * p:p, :] for i in range(p) for j in range(p)]

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        p = self.pool_size
        oh, ow = conv_outsize(x.shape[1], p, stride=p), conv_outsize(x.shape[2], p, stride=p)
        positions = self._positions(x, oh, ow)
        out = positions[0].copy()  # (N, OH, OW, C)
        for view in positions[1:]:
            xp.maximum(out, view, out=out)
        self.x, self.out = x, out
        return out

    def backward(self, dout):
        xp = get_array_module(dout)
        _, oh, ow, _ = dout.shape
        dx = xp.zeros(self.x.shape, dtype=dout.dtype)  # (N, H, W, C)
        taken = xp.zeros(self.out.shape, dtype=bool)  # windows whose winner is already found
        for view, dview in zip(self._positions(self.x, oh, ow), self._positions(dx, oh, ow)):
            wins = (view == self.out) & ~taken  # the first position holding the max wins its window
            dview[...] = dout * wins
            taken |= wins
        return dx

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, H, W, C) -> (N, H // p, W // p, C) ('valid': an odd last row/column is dropped)."""
        n, h, w, c = input_shape
        p = self.pool_size
        return (n, conv_outsize(h, p, stride=p), conv_outsize(w, p, stride=p), c)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: comparisons, no multiply-adds (FLOPs here count multiply-adds x 2, as
        :meth:`tinyunet.unet.UNet.layer_table` and the benchmarks do)."""
        return 0


class ReLU:
    """out = max(x, 0);  dx = dout where x > 0, else 0 (the same pixels as out > 0).

    Forward keeps a reference to its output, not a mask: the comparison runs only when a
    backward needs it, so inference makes one pass over the activations instead of two.
    """

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self.out = None  # (N, H, W, C) the forward output; out > 0 exactly where x > 0

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        self.out = xp.maximum(x, 0)
        return self.out

    def backward(self, dout):
        return dout * (self.out > 0)

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Elementwise: the shape is kept."""
        return tuple(input_shape)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: one comparison per value, no multiply-adds."""
        return 0


class Sigmoid:
    """out = 1 / (1 + exp(-x));  dx = dout * out * (1 - out)."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self.out = None  # the forward output, all backward needs

    def forward(self, x, train: bool = False):
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout):
        return dout * self.out * (1 - self.out)

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Elementwise: the shape is kept."""
        return tuple(input_shape)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: an exp and a division per value, no multiply-adds."""
        return 0


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

    ``keep`` drops ``round(rate * 2**16)`` of 2**16 equally likely draws, so the rate is applied to
    within 2**-17; :meth:`_keep` draws them the cheaper way on each backend.

    ``mask`` stays inspectable after a training forward. With ``frozen = True`` a training forward
    reuses the last mask instead of drawing a new one (gradient checks need the same mask twice).
    """

    def __init__(self, rate: float, *, seed=None, xp=np):
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.params, self.grads, self.buffers = {}, {}, {}
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
            dropped = round(self.rate * 2 ** 16)  # of 2**16 equally likely draws
            self.mask = self._keep(x.shape, dropped) * x.dtype.type(2 ** 16 / (2 ** 16 - dropped))
        return x * self.mask

    def _keep(self, shape: tuple[int, ...], dropped: int):
        """keep ~ Bernoulli(1 - dropped / 2**16), as a bool array of ``shape``.

        NumPy draws 16-bit integers: half the random bits of a float32, and faster. CuPy draws integers
        as 32 random bits and then casts them in a second kernel, so there one kernel of float32
        uniforms, compared with the same fraction ``dropped / 2**16`` (exact in float32), is cheaper.
        """
        if self.xp is np:
            return self.rng.integers(0, 2 ** 16, size=shape, dtype=np.uint16) >= dropped
        return self.rng.random(shape, dtype=np.float32) >= np.float32(dropped / 2 ** 16)

    def backward(self, dout):
        return dout * self.mask if self.train else dout

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Elementwise: the shape is kept."""
        return tuple(input_shape)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: a multiply per value in training (none at inference), no multiply-adds."""
        return 0


class Concatenate:
    """Join two inputs on the channel axis: out = [a, b];  da, db = the matching slices of dout."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self.split = None  # channels of the first input

    def forward(self, a, b, train: bool = False):
        xp = get_array_module(a)
        if a.shape[:3] != b.shape[:3]:
            raise ValueError(f"Concatenate needs equal (N, H, W); got {a.shape} and {b.shape}")
        self.split = a.shape[3]
        return xp.concatenate([a, b], axis=3)  # (N, H, W, Ca + Cb)

    def backward(self, dout):
        return dout[..., :self.split], dout[..., self.split:]

    # --- study mode: shape and cost from the input shapes alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(N, H, W, Ca) and (N, H, W, Cb) -> (N, H, W, Ca + Cb)."""
        if tuple(a_shape[:3]) != tuple(b_shape[:3]):
            raise ValueError(f"Concatenate needs equal (N, H, W); got {a_shape} and {b_shape}")
        return (*a_shape[:3], a_shape[3] + b_shape[3])

    def flops(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
        """0: a copy, no arithmetic."""
        return 0


class BatchNormalization:
    """Batch normalisation over N, H and W for each channel, as Keras computes it.

    Training, with M = N*H*W values per channel and the batch's mean and *biased* variance:

        mean = sum x / M     var = sum (x - mean)^2 / M     xhat = (x - mean) / sqrt(var + epsilon)
        out  = gamma * xhat + beta
        moving = momentum * moving + (1 - momentum) * batch      (for the mean and the variance)

    Inference uses the moving statistics instead: ``out = x * scale + shift`` with
    ``scale = gamma / sqrt(moving_variance + epsilon)``, ``shift = beta - moving_mean * scale``.

    Backward (training), the compact form of the chain rule through mean and var:

        dgamma = sum dout * xhat      dbeta = sum dout
        dx     = gamma / sqrt(var + epsilon) * (dout - (dbeta + xhat * dgamma) / M)

    Every op with a per-channel vector runs on image lines, (N*H, W*C) with the vector tiled W times:
    NumPy applies a vector as short as C = 16 to every one of M rows about 2x slower (0.43 against
    0.22 ms on a 4-image 112x112x16 shard); the values are the same, element for element.

    ``updates_moving = False`` normalises with the batch but leaves the moving statistics alone: the
    data-parallel replicas (:mod:`tinyunet.parallel`) share the model's buffers and only the model
    itself, shard 0, updates them, as PyTorch's DataParallel keeps device 0's.
    """

    def __init__(self, channels: int, momentum: float = 0.99, epsilon: float = 1e-3, *,
                 dtype=np.float32, xp=np):
        self.momentum, self.epsilon = momentum, epsilon
        self.params = {"gamma": xp.ones(channels, dtype=dtype), "beta": xp.zeros(channels, dtype=dtype)}  # (C,)
        self.grads = {key: xp.zeros_like(value) for key, value in self.params.items()}
        self.buffers = {"moving_mean": xp.zeros(channels, dtype=dtype),  # (C,)
                        "moving_variance": xp.ones(channels, dtype=dtype)}  # (C,)
        self.updates_moving = True  # a training forward updates the moving statistics
        self.train = False  # whether the last forward normalised with the batch's statistics
        self.x = None  # (N, H, W, C) the last inference forward's input (study mode's backward)
        self.xhat = None  # (N*H*W, C) the normalised input of the last training forward
        self.inv_std = None  # (C,) 1 / sqrt(var + epsilon) of that batch

    def forward(self, x, train: bool = False):
        xp = get_array_module(x)
        gamma, beta = self.params["gamma"], self.params["beta"]
        n, h, w, c = x.shape
        rows = x.reshape(-1, c)  # (M, C), M = N*H*W
        lines = rows.reshape(-1, w * c)  # (N*H, W*C), a view: every op with a (C,) vector runs on these
        one = x.dtype.type(1)
        self.train = train
        if not train:
            self.x = x
            scale, shift = self.inference_affine()  # (C,) each
            return (lines * xp.tile(scale, w) + xp.tile(shift, w)).reshape(x.shape)
        inv_m = one / x.dtype.type(len(rows))
        mean = column_sums(rows) * inv_m  # (C,)
        centred = lines - xp.tile(mean, w)  # (N*H, W*C)
        out = centred * centred  # (N*H, W*C): the squares, then (below) the output
        var = column_sums(out.reshape(-1, c)) * inv_m  # (C,) biased, as Keras normalises
        self.inv_std = one / xp.sqrt(var + x.dtype.type(self.epsilon))
        centred *= xp.tile(self.inv_std, w)  # in place: the centred values become xhat
        self.xhat = centred.reshape(-1, c)  # (M, C)
        if self.updates_moving:
            m = x.dtype.type(self.momentum)
            for name, batch in (("moving_mean", mean), ("moving_variance", var)):
                moving = self.buffers[name]
                moving *= m
                moving += (one - m) * batch
        xp.multiply(centred, xp.tile(gamma, w), out=out)
        out += xp.tile(beta, w)  # gamma * xhat + beta, in the squares' buffer
        return out.reshape(x.shape)

    def inference_affine(self):
        """(scale, shift), each (C,): inference computes ``x * scale + shift`` (what tinyunet.fold puts
        into the conv before)."""
        scale = self.params["gamma"] * self._moving_inv_std()
        return scale, self.params["beta"] - self.buffers["moving_mean"] * scale

    def _moving_inv_std(self):
        variance = self.buffers["moving_variance"]
        return variance.dtype.type(1) / get_array_module(variance).sqrt(variance + variance.dtype.type(self.epsilon))

    def backward(self, dout):
        xp = get_array_module(dout)
        w, c = dout.shape[2], dout.shape[3]
        drows = dout.reshape(-1, c)  # (M, C)
        if not self.train:  # after an inference forward (study mode): an affine map, statistics fixed
            inv_std = self._moving_inv_std()
            xhat = (self.x.reshape(drows.shape) - self.buffers["moving_mean"]) * inv_std
            self.grads["beta"][...] = column_sums(drows)
            self.grads["gamma"][...] = column_sums(drows * xhat)
            return dout * (self.params["gamma"] * inv_std)
        inv_m = dout.dtype.type(1) / dout.dtype.type(len(drows))
        dbeta = column_sums(drows)  # (C,)
        dx = drows * self.xhat  # (M, C): one buffer for every pass below
        dgamma = column_sums(dx)  # (C,)
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        lines = dx.reshape(-1, w * c)  # (N*H, W*C) views, as in the forward
        xp.multiply(self.xhat.reshape(lines.shape), xp.tile(dgamma * inv_m, w), out=lines)
        lines += xp.tile(dbeta * inv_m, w)
        xp.subtract(drows.reshape(lines.shape), lines, out=lines)  # dout - (xhat * dgamma + dbeta) / M
        lines *= xp.tile(self.params["gamma"] * self.inv_std, w)
        return dx.reshape(dout.shape)

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per channel: the shape is kept."""
        return tuple(input_shape)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: a scale and a shift per value at inference (and could be folded into the conv before it),
        no multiply-adds of a convolution."""
        return 0


class Add:
    """The sum of two inputs of one shape (a residual block's shortcut): out = a + b;  da = db = dout."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}

    def forward(self, a, b, train: bool = False):
        if a.shape != b.shape:
            raise ValueError(f"Add needs two inputs of one shape; got {a.shape} and {b.shape}")
        return a + b

    def backward(self, dout):
        return dout, dout

    # --- study mode: shape and cost from the input shapes alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Two equal shapes -> the same shape."""
        if tuple(a_shape) != tuple(b_shape):
            raise ValueError(f"Add needs two inputs of one shape; got {a_shape} and {b_shape}")
        return tuple(a_shape)

    def flops(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
        """0: one addition per value, no multiply-adds."""
        return 0


class Identity:
    """out = x;  dx = dout: the place of a layer whose work another took over (a BatchNormalization
    folded into the convolution before it, :mod:`tinyunet.fold`)."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}

    def forward(self, x, train: bool = False):
        return x

    def backward(self, dout):
        return dout

    # --- study mode: shape and cost from the input shape alone (UNet.summary, tinyunet.inspect) ---

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape is kept."""
        return tuple(input_shape)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """0: nothing is computed."""
        return 0
