"""The geometry the convolution layers share: output sizes, padding, shifted rows and blocks.

Notation (used in shape comments throughout tinyunet):

    N   images in the batch          H, W    input height and width
    C   input channels               OH, OW  output height and width
    F   output channels ("filters")  KH, KW  kernel height and width
    Hp, Wp  height and width after zero padding

A KH x KW convolution is a sum of KH*KW 1x1 convolutions, one per kernel tap (i, j), each reading
the input shifted by (i, j):

    out[n, y, x, :] = sum_(i, j) x_pad[n, y + i, x + j, :] @ W[i, j] + b          (C) @ (C, F)

Flatten the padded input to rows, ``(N*Hp*Wp, C)``: the pixel (n, y + i, x + j) is then row
``(n*Hp + y)*Wp + x + i*Wp + j``, i.e. the pixel (n, y, x) moved by the constant offset ``i*Wp + j``.
So each tap is one matrix product on a contiguous slice of rows, ``rows[off : off + L] @ W[i, j]``,
with no im2col copy at all. Output rows whose window runs past the right or bottom border (or into
the next image) hold garbage and are dropped; they are the ``Hp*Wp - OH*OW`` rows per image that
:func:`valid` slices away.
"""

from __future__ import annotations

from tinyunet.backend import get_array_module


def conv_outsize(size: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
    """Output length of a convolution along one axis: ``(size + pad - kernel) // stride + 1``.

    ``pad`` is the total padding on that axis (both sides together).
    """
    return (size + pad - kernel) // stride + 1


def same_pads(kh: int, kw: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that keeps H and W for a stride-1 conv ('same').

    As in Keras/TensorFlow, an even kernel puts the extra row/column at the bottom/right.
    """
    return (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2


def padded_rows(x, pads: tuple[int, int, int, int]):
    """Zero-pad (N, H, W, C) by ``pads`` and flatten to rows: (N*Hp*Wp, C), plus (Hp, Wp)."""
    xp = get_array_module(x)
    top, bottom, left, right = pads
    xpad = xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # (N, Hp, Wp, C)
    return xpad.reshape(-1, x.shape[3]), xpad.shape[1:3]


def tap_offsets(kh: int, kw: int, wp: int) -> list[int]:
    """Row offset ``i*Wp + j`` of every tap (i, j) of a KH x KW kernel, in (i, j) order."""
    return [i * wp + j for i in range(kh) for j in range(kw)]


def tap_groups(n_taps: int, c: int, min_width: int = 8) -> list[range]:
    """Consecutive taps in groups wide enough for an efficient GEMM: ``g*C >= min_width`` inputs.

    With C >= 8 every tap is its own group (its rows are a view, nothing is copied); the first
    layer's C = 1 puts 8 of the 3x3 kernel's 9 taps in one (L, 8) matrix and the ninth in a group of
    its own, since a GEMM with a single input column runs far below speed.
    """
    g = max(1, -(-min_width // c))  # ceil(min_width / C)
    return [range(t, min(t + g, n_taps)) for t in range(0, n_taps, g)]


def gather_taps(rows, offsets: list[int], length: int):
    """(L, g*C): ``rows`` shifted by each offset, side by side; a view for a single offset."""
    xp = get_array_module(rows)
    if len(offsets) == 1:
        return rows[offsets[0]:offsets[0] + length]
    return xp.concatenate([rows[off:off + length] for off in offsets], axis=1)


def shifted_conv(x_rows, W, offsets: list[int]):
    """The convolution on shifted rows: ``out[:L] = sum_t x_rows[off_t : off_t + L] @ W_t``.

    ``x_rows`` (R, C) is the zero-padded input as rows (:func:`padded_rows`), ``W`` (KH, KW, C, F),
    ``offsets`` the taps' (:func:`tap_offsets`). Returns (R, F) on the same padded grid; its last
    R - L rows, which no tap reaches, are zero. Taps are grouped (:func:`tap_groups`) so that
    each GEMM has at least 8 input columns. Its transpose is :func:`shifted_conv_transpose`.
    """
    xp = get_array_module(x_rows)
    c, f = W.shape[2], W.shape[3]
    length = len(x_rows) - offsets[-1]  # L: rows whose every tap stays inside the array
    W_rows = W.reshape(-1, f)  # (KH*KW*C, F): tap t's weights are rows t*C:(t+1)*C
    out = xp.empty((len(x_rows), f), dtype=xp.result_type(x_rows, W))  # (R, F)
    product = None  # (L, F): one buffer for every later group's product, not one array each
    for k, group in enumerate(tap_groups(len(offsets), c)):
        cols = gather_taps(x_rows, offsets[group.start:group.stop], length)  # (L, g*C)
        W_group = W_rows[group.start * c:group.stop * c]  # (g*C, F)
        if k == 0:
            xp.matmul(cols, W_group, out=out[:length])  # the first group writes, the rest add
        else:
            product = xp.matmul(cols, W_group, out=product)
            out[:length] += product
    out[length:] = 0  # border rows no tap reaches: zeros, so that adding a bias stays finite
    return out


def shifted_conv_transpose(d_rows, W, offsets: list[int]):
    """The transpose of :func:`shifted_conv`: ``dx[off_t : off_t + L] += d_rows[:L] @ W_t^T`` for every tap.

    Each output row's gradient ``d_rows`` (R, F) goes back to the C inputs of every row it read,
    which is the convolution of ``d_rows`` by the flipped kernel with its channels swapped (the
    input gradient of a conv is a transposed conv). Returns (R, C) on the padded grid.
    """
    xp = get_array_module(d_rows)
    c, f = W.shape[2], W.shape[3]
    length = len(d_rows) - offsets[-1]
    W_rows = W.reshape(-1, f)  # (KH*KW*C, F)
    dx_rows = xp.empty((len(d_rows), c), dtype=xp.result_type(d_rows, W))  # (R, C)
    dx_rows[length:] = 0  # only the taps at later offsets reach these rows
    product = None  # (L, C): one buffer for every later tap's product, not one array each
    for t, off in enumerate(offsets):
        W_t = W_rows[t * c:(t + 1) * c].T  # (F, C)
        if t == 0:  # offset 0: the first tap writes rows [0, L), the others add
            xp.matmul(d_rows[:length], W_t, out=dx_rows[:length])
        else:
            product = xp.matmul(d_rows[:length], W_t, out=product)
            dx_rows[off:off + length] += product
    return dx_rows


def shifted_conv_weight_grad(x_rows, d_rows, offsets: list[int], dW):
    """dL/dW of :func:`shifted_conv` into ``dW`` (KH, KW, C, F): ``dW_t = x_rows[off_t : off_t + L]^T @ d_rows[:L]``."""
    c, f = dW.shape[2], dW.shape[3]
    length = len(d_rows) - offsets[-1]
    dW_rows = dW.reshape(-1, f)  # (KH*KW*C, F), a view: writing it fills dW
    for group in tap_groups(len(offsets), c):  # the taps grouped as in the forward
        cols = gather_taps(x_rows, offsets[group.start:group.stop], length)  # (L, g*C)
        dW_rows[group.start * c:group.stop * c] = cols.T @ d_rows[:length]  # (g*C, F)


def column_sums(rows):
    """``rows.sum(axis=0)`` of a (R, F) array, as one matrix-vector product ``ones(R) @ rows``.

    The bias gradients use it: NumPy reduces a few long columns slowly (about 2 ms for 135,200 x 8
    float32 here), while the product streams the rows once (about 0.1 ms).
    """
    xp = get_array_module(rows)
    return xp.ones(len(rows), dtype=rows.dtype) @ rows


def valid(rows, n: int, hp: int, wp: int, oh: int, ow: int):
    """The (N, OH, OW, F) outputs inside per-pixel rows (N*Hp*Wp, F), dropping the border rows."""
    return rows.reshape(n, hp, wp, rows.shape[1])[:, :oh, :ow, :]


def space_to_blocks(x, k: int):
    """Non-overlapping k x k blocks of ``x`` as rows: (N, H, W, C) -> (N*H/k*W/k, k*k*C).

    The im2col of a stride-k, k x k convolution (no padding): each block is read exactly once, so
    this is a reshape and one transpose. ``H`` and ``W`` must be multiples of ``k``.
    """
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // k, k, w // k, k, c)  # (N, OH, KH, OW, KW, C)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5)  # (N, OH, OW, KH, KW, C)
    return blocks.reshape(n * (h // k) * (w // k), k * k * c)


def blocks_to_space(rows, n: int, oh: int, ow: int, k: int):
    """Inverse of :func:`space_to_blocks`: (N*OH*OW, k*k*C) -> (N, OH*k, OW*k, C)."""
    c = rows.shape[1] // (k * k)
    blocks = rows.reshape(n, oh, ow, k, k, c)  # (N, OH, OW, KH, KW, C)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5)  # (N, OH, KH, OW, KW, C)
    return blocks.reshape(n, oh * k, ow * k, c)
