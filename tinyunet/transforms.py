"""Array work on image stacks, NumPy or CuPy alike: bilinear resize, pad and crop, flips, channels,
sets of mixed sizes, minibatches.

Every function takes (N, H, W) or (N, H, W, C) arrays and starts with ``xp = get_array_module(x)``;
nothing here reads files, so this module needs NumPy alone (no Pillow). A set whose images differ in
size is a list of (H, W[, C]) arrays instead of one stack (:func:`as_stack`, :func:`take`).

Notation: N images, H x W pixels, C channels, OH x OW the output size of a resize.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tinyunet.backend import get_array_module

MAX_CHANNELS = 16  # the most image channels tinyunet takes: an .npy image's and a checkpoint's in_channels


# --------------------------------------------------------------------------------------------
# Resizing, padding, flips
# --------------------------------------------------------------------------------------------

def _resize_axis(x, axis: int, out: int):
    """Bilinear resize of one axis of ``x`` to length ``out`` (half-pixel centres)."""
    xp = get_array_module(x)
    n_in = x.shape[axis]
    # source coordinate of each output pixel centre; clamped, so the edges repeat (no zero padding)
    src = xp.clip((xp.arange(out, dtype=xp.float64) + 0.5) * (n_in / out) - 0.5, 0, n_in - 1)
    i0 = xp.floor(src).astype(xp.int64)  # (out,)
    i1 = xp.minimum(i0 + 1, n_in - 1)  # (out,)
    shape = [1] * x.ndim
    shape[axis] = out
    w = (src - i0).astype(x.dtype).reshape(shape)  # weight of i1
    lo = xp.take(x, i0, axis=axis)
    hi = xp.take(x, i1, axis=axis)
    return lo + (hi - lo) * w


def resize(x, size: int | tuple[int, int]):
    """Bilinear resize of (N, H, W) or (N, H, W, C) to (N, OH, OW[, C]); NumPy or CuPy.

    Pixel centres sit at half-integers (``align_corners=False``, as PIL, skimage and TF2 do) and
    the edges repeat. Upsampling matches PIL's bilinear filter (to float32 rounding). Downsampling
    does no antialiasing (like TF2's default and OpenCV): PIL widens its filter, so 128 -> 101
    differs from PIL by about 0.005 on smooth images but up to 0.3 on pixel noise. Floating dtypes
    are kept; other dtypes become float32. Always returns a new array.
    """
    xp = get_array_module(x)
    oh, ow = (size, size) if isinstance(size, int) else size
    if x.dtype.kind != "f":
        x = x.astype(xp.float32)
    out = x if oh == x.shape[1] else _resize_axis(x, 1, oh)  # (N, OH, W[, C])
    out = out if ow == x.shape[2] else _resize_axis(out, 2, ow)  # (N, OH, OW[, C])
    return out.copy() if out is x else out


def pad_to_multiple(x, multiple: int, mode: str = "reflect"):
    """Pad H and W of (N, H, W[, C]) up to multiples of ``multiple`` (e.g. 2**depth).

    Returns ``(padded, box)`` with ``box = (top, left, H, W)`` for :func:`crop`; the padding is
    split evenly, the odd pixel going to the bottom / right. ``mode`` is any of ``xp.pad``'s.
    """
    h, w = x.shape[1:3]
    return pad_to(x, (h + -h % multiple, w + -w % multiple), mode)


def pad_to(x, size: tuple[int, int], mode: str = "reflect"):
    """Pad H and W of (N, H, W[, C]) up to ``size`` (OH, OW), as :func:`pad_to_multiple` does."""
    xp = get_array_module(x)
    h, w = x.shape[1:3]
    ph, pw = size[0] - h, size[1] - w
    top, left = ph // 2, pw // 2
    widths = [(0, 0), (top, ph - top), (left, pw - left)] + [(0, 0)] * (x.ndim - 3)
    return xp.pad(x, widths, mode=mode), (top, left, h, w)


def crop(x, box: tuple[int, int, int, int]):
    """Undo :func:`pad_to_multiple`: (N, H', W'[, C]) -> (N, H, W[, C]) with box (top, left, H, W)."""
    top, left, h, w = box
    return x[:, top: top + h, left: left + w]


def hflip(x):
    """Mirror (N, H, W) or (N, H, W, C) left to right (a new contiguous array)."""
    xp = get_array_module(x)
    return xp.ascontiguousarray(x[:, :, ::-1])


def augment_hflip(images, masks):
    """The seed's augmentation: the originals followed by their mirror images (2N of each)."""
    xp = get_array_module(images)
    return (xp.concatenate([images, hflip(images)]),
            xp.concatenate([masks, hflip(masks)]))


# --------------------------------------------------------------------------------------------
# Channels, and sets of mixed sizes
# --------------------------------------------------------------------------------------------

def channels(images) -> int:
    """The channel count of (N, H, W) gray images (1), (N, H, W, C) ones (C), or a list of either."""
    first = images[0]  # (H, W) or (H, W, C)
    return 1 if first.ndim == 2 else first.shape[-1]


def luma(images):
    """ITU-R 601-2 luma (the weights of PIL's convert("L")) of colour images (..., 3) -> (...)."""
    xp = get_array_module(images)
    weights = xp.asarray([0.299, 0.587, 0.114], dtype=xp.float64)
    return (images.astype(xp.float64) @ weights).astype(images.dtype)


def for_display(image):
    """One image (H, W) or (H, W, C) as a picture shows it: gray and RGB as they are, any other channel
    count (an .npy image's bands) as the mean of its channels, (H, W)."""
    return image if image.ndim == 2 or image.shape[2] == 3 else image.mean(axis=2)


def as_stack(arrays: list):
    """One (N, H, W[, C]) array when every array has one shape, else the list itself (a set of mixed
    sizes: each image keeps its own)."""
    xp = get_array_module(*arrays) if arrays else np
    return xp.stack(arrays) if len({a.shape for a in arrays}) == 1 else list(arrays)


def take(images, idx):
    """The images at indices ``idx`` of a stack or a list (then stacked when they share one size)."""
    if isinstance(images, list):
        return as_stack([images[int(i)] for i in idx])
    return images[idx]


def size_groups(images) -> list[np.ndarray]:
    """Indices of the images of each size (H, W), in order of first appearance; a stack is one group."""
    if not isinstance(images, list):
        return [np.arange(len(images))]
    sizes = [a.shape[:2] for a in images]
    return [np.flatnonzero([s == size for s in sizes]) for size in dict.fromkeys(sizes)]


def canvas(arrays, fill=0):
    """A list of (H, W[, C]) arrays of mixed sizes on one (N, max H, max W[, C]) canvas, each at the top left and
    the rest ``fill``: scores that count pixels per image (IoU, Dice, the competition score) are the same
    on it when ``fill`` is background. A stack is returned as it is."""
    if not isinstance(arrays, list):
        return arrays
    xp = get_array_module(*arrays)
    h, w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    out = xp.full((len(arrays), h, w) + arrays[0].shape[2:], fill, dtype=arrays[0].dtype)  # (N, H, W[, C])
    for i, a in enumerate(arrays):
        out[i, :a.shape[0], :a.shape[1]] = a
    return out


def to_channels(images, count: int):
    """Images (N, H, W) gray / (N, H, W, C), or a list of them, with ``count`` channels: gray as 1 channel
    (N, H, W), colour to gray by its luma, gray repeated into 3 channels. ValueError for any other
    change (the message says which)."""
    if isinstance(images, list):
        return [to_channels(image[None], count)[0] for image in images]
    have = 1 if images.ndim == 3 else images.shape[-1]
    if have == count:
        return images
    xp = get_array_module(images)
    if have == 3 and count == 1:
        return luma(images)
    if have == 1 and count == 3:
        return xp.repeat(images[..., None], 3, axis=3)
    raise ValueError(f"the images have {have} channel(s) and the model takes {count}: only gray <-> RGB "
                     f"converts; give images of {count} channel(s) (an .npy array holds any count)")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def minibatches(n: int, batch_size: int, rng: np.random.Generator | None = None,
                shuffle: bool = True) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering ``range(n)`` once, shuffled by ``rng`` when ``shuffle``.

    The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("minibatches(shuffle=True) needs an rng (np.random.default_rng(seed))")
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start: start + batch_size]
