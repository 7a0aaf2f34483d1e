"""Augmentations beyond flips (``--augment``), on a training batch, NumPy or CuPy alike.

    aug = Augmentation(("shift", "scale", "brightness"), rng, n, (H, W), xp, np.float32)  # once per epoch
    xb, yb = aug(xb, yb, slice(start, stop))   # the batch that holds the epoch's images start..stop-1

* ``shift``: each image and its mask translated by the same whole number of pixels, up to :data:`AUG_SHIFT`
  of the side in each direction; the uncovered border is reflect-filled (as ``--fit pad`` pads);
* ``scale``: each image and its mask zoomed by a factor in [1, 1 + :data:`AUG_SCALE`] about a random centre: a
  smaller window cropped and resized back with the bilinear :func:`tinyunet.transforms.resize`, the mask
  re-binarised at 0.5;
* ``brightness``: brightness and contrast, ``x' = clip((x - mean) * c + mean + b, 0, 1)`` per image (``mean``
  over its pixels and channels), images only.

They apply in that order, whatever the order given, after the random mirrors. Every parameter of an epoch is
drawn on the host from the epoch's generator (``np.random.default_rng([seed, epoch])``, after its shuffle and
mirrors), so a resumed run draws the same ones; the few arrays an op reads go to the device once per epoch and
a step copies nothing between host and device. Validation images are never augmented.

Notation: N images in the epoch, B in a batch, H x W pixels, C channels; a mask is (B, H, W, 1).
"""

from __future__ import annotations

import numpy as np

from tinyunet.backend import as_array, get_array_module
from tinyunet.transforms import resize

AUGMENTATIONS = ("shift", "scale", "brightness")  # what --augment takes, in the order they apply

# The augmentations' ranges; every parameter is drawn uniformly, per image and epoch.
AUG_SHIFT = 0.08  # shift: up to floor(AUG_SHIFT * side) whole pixels in each direction (8 px of 112, 10 of 128)
AUG_SCALE = 0.15  # scale: a zoom by a factor in [1, 1 + AUG_SCALE]: a window of side / factor resized back
AUG_CONTRAST = 0.1  # brightness: the contrast factor c in [1 - AUG_CONTRAST, 1 + AUG_CONTRAST]
AUG_BRIGHT = 0.1  # brightness: the offset b in [-AUG_BRIGHT, AUG_BRIGHT], in the data's range [0, 1]


def max_shift(side: int) -> int:
    """The largest shift (whole pixels) along an axis of ``side`` pixels: floor(AUG_SHIFT * side)."""
    return int(AUG_SHIFT * side)


def describe(names: tuple[str, ...], size: tuple[int, int]) -> str:
    """The augmentations ``names`` at network size ``size`` (H, W) in words, for the run's header."""
    h, w = size
    words = {"shift": f"shift up to {max_shift(h)} x {max_shift(w)} px (reflect-filled)",
             "scale": f"zoom x1-{1 + AUG_SCALE:g} about a random centre",
             "brightness": f"brightness +-{AUG_BRIGHT:g} and contrast x{1 - AUG_CONTRAST:g}-{1 + AUG_CONTRAST:g}"}
    return ", ".join(words[name] for name in AUGMENTATIONS if name in names)


# --------------------------------------------------------------------------------------------
# The ops, on the device
# --------------------------------------------------------------------------------------------

def _reflect(i, n: int):
    """Indices ``i`` in [-(n-1), 2(n-1)] mirrored into [0, n-1] about the edge pixels, as np.pad's "reflect"
    (-1 -> 1, n -> n-2): (n-1) - |(n-1) - |i||."""
    xp = get_array_module(i)
    return (n - 1) - xp.abs((n - 1) - xp.abs(i))


def shift(x, moves):
    """Each image of ``x`` (B, H, W, C) moved by ``moves`` (B, 2) = (down, right) whole pixels (a device array),
    the uncovered border reflect-filled: out[b, r, c] = x[b, reflect(r - down_b), reflect(c - right_b)]."""
    xp = get_array_module(x)
    b, h, w = x.shape[:3]
    rows = _reflect(xp.arange(h)[None, :] - moves[:, :1], h)  # (B, H)
    cols = _reflect(xp.arange(w)[None, :] - moves[:, 1:], w)  # (B, W)
    return x[xp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def zoom_windows(factors: np.ndarray, where: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The windows (N, 4) = (top, left, height, width), host ints, that zoom images of ``size`` (H, W) by
    ``factors`` (N,) >= 1: sides round(H / factor) x round(W / factor), placed ``where`` (N, 2) in [0, 1)
    says within the room left (top = floor(where * (H - height + 1)), likewise left)."""
    h, w = size
    heights, widths = np.rint(h / factors).astype(np.int64), np.rint(w / factors).astype(np.int64)  # (N,) each
    tops = np.floor(where[:, 0] * (h - heights + 1)).astype(np.int64)
    lefts = np.floor(where[:, 1] * (w - widths + 1)).astype(np.int64)
    return np.stack([tops, lefts, heights, widths], axis=1)  # (N, 4)


def zoom(x, windows: np.ndarray):
    """Each image of ``x`` (B, H, W, C) cropped to its window of ``windows`` (B, 4) = (top, left, height,
    width) (host ints) and resized back to H x W, bilinear (:func:`tinyunet.transforms.resize`)."""
    xp = get_array_module(x)
    size = x.shape[1:3]
    # one resize per image: the windows differ in size, and resize takes one size per call
    return xp.concatenate([resize(x[i:i + 1, top:top + height, left:left + width], size)
                           for i, (top, left, height, width) in enumerate(windows.tolist())])  # (B, H, W, C)


def brightness_contrast(x, contrast, offset):
    """x' = clip((x - mean) * c + mean + b, 0, 1) for each image of ``x`` (B, H, W, C), ``mean`` over its pixels
    and channels, with c = ``contrast`` (B,) and b = ``offset`` (B,) (device arrays of x's dtype)."""
    xp = get_array_module(x)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # (B, 1, 1, 1)
    c, b = contrast[:, None, None, None], offset[:, None, None, None]  # (B, 1, 1, 1)
    return xp.clip((x - mean) * c + mean + b, 0, 1)


# --------------------------------------------------------------------------------------------
# One epoch's draws
# --------------------------------------------------------------------------------------------

class Augmentation:
    """The augmentations ``names`` of one epoch of ``n`` images of network size ``size`` (H, W).

    Every parameter is drawn at construction from ``rng`` (host), image by image in the epoch's batch order:
    shifts, then zoom windows, then brightness and contrast, each only when named. What the device ops read
    goes to ``xp`` once, here; the zoom windows stay on the host (they are slice bounds).
    """

    def __init__(self, names: tuple[str, ...], rng: np.random.Generator, n: int, size: tuple[int, int], xp,
                 dtype):
        h, w = size  # names: some of AUGMENTATIONS, checked by config.validate
        self.moves = None  # (n, 2) int64 on the device: (down, right) pixels
        self.windows = None  # (n, 4) int64 on the host: (top, left, height, width)
        self.gains = None  # (n, 2) of dtype on the device: (contrast c, offset b)
        if "shift" in names:
            limit = np.array([max_shift(h), max_shift(w)])
            self.moves = as_array(rng.integers(-limit, limit, size=(n, 2), endpoint=True), xp)
        if "scale" in names:
            self.windows = zoom_windows(rng.uniform(1, 1 + AUG_SCALE, n), rng.random((n, 2)), size)
        if "brightness" in names:
            contrast = rng.uniform(1 - AUG_CONTRAST, 1 + AUG_CONTRAST, n)
            offset = rng.uniform(-AUG_BRIGHT, AUG_BRIGHT, n)
            self.gains = as_array(np.stack([contrast, offset], axis=1).astype(dtype), xp)

    def __call__(self, x, y, part: slice):
        """The batch ``x`` (B, H, W, C), ``y`` (B, H, W, 1), holding the epoch's images ``part``, augmented:
        new arrays of the same shapes and dtypes."""
        xp = get_array_module(x)
        if self.moves is not None or self.windows is not None:  # geometry: image and mask as one array
            both = xp.concatenate([x, y], axis=3)  # (B, H, W, C + 1)
            if self.moves is not None:
                both = shift(both, self.moves[part])
            if self.windows is not None:
                both = zoom(both, self.windows[part])
            channels = x.shape[3]
            x, y = xp.ascontiguousarray(both[..., :channels]), xp.ascontiguousarray(both[..., channels:])
            if self.windows is not None:
                y = (y > 0.5).astype(y.dtype)  # the zoomed mask, binary again
        if self.gains is not None:
            x = brightness_contrast(x, self.gains[part, 0], self.gains[part, 1])
        return x, y
