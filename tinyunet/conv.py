"""The patch extraction and size helpers the convolution layers share.

Notation (used in shape comments throughout tinyunet):

    N   images in the batch          H, W    input height and width
    C   input channels               OH, OW  output height and width
    F   output channels ("filters")  KH, KW  kernel height and width

A convolution is a matrix product once every output pixel's receptive field is laid out as a row:

    cols[n, oh, ow, (i, j, c)] = x_padded[n, oh + i, ow + j, c]          # im2col
    out[n, oh, ow, f]          = sum_(i, j, c) cols[n, oh, ow, (i, j, c)] * W[i, j, c, f] + b[f]

so ``out = cols @ W.reshape(KH*KW*C, F)``: one GEMM does the whole layer.
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


def flip_pads(pads: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The padding of the conv that computes a 'same' conv's input gradient: each side swapped."""
    top, bottom, left, right = pads
    return bottom, top, right, left


def im2col(x, kh: int, kw: int, pads: tuple[int, int, int, int]):
    """Stride-1 patches of ``x`` as rows: (N, H, W, C) -> (N*OH*OW, KH*KW*C).

    Row ``(n, oh, ow)`` holds the KH x KW x C window whose top-left corner is at ``(oh, ow)`` of
    the zero-padded input, in (i, j, c) order to match a ``(KH, KW, C, F)`` kernel reshaped to
    ``(KH*KW*C, F)``.
    """
    xp = get_array_module(x)
    n, h, w, c = x.shape
    top, bottom, left, right = pads
    oh = conv_outsize(h, kh, pad=top + bottom)
    ow = conv_outsize(w, kw, pad=left + right)
    xpad = xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # (N, H+pad, W+pad, C)
    cols = xp.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xpad[:, i:i + oh, j:j + ow, :]
    return cols.reshape(n * oh * ow, kh * kw * c)  # (N*OH*OW, KH*KW*C)


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
