"""Between images and the network: fitting any image size to the U-Net and back.

The U-Net needs H and W divisible by 2**depth; TGS images are 101 x 101. Two ways to fit them:

* ``"resize"`` (the seed recipe): bilinear resize to ``input_size`` x ``input_size`` (128), and the
  probabilities resized back to the original size for scoring and submission;
* ``"pad"``: reflect-pad to the next multiple of 2**depth (101 -> 112 at depth 4) and crop back.

Training, validation and prediction all go through :func:`to_network` / :func:`probabilities`, so
the three can never disagree about the geometry.

A set of mixed sizes is a list of images (:mod:`tinyunet.transforms`): each is fitted on its own and
brought back to its own size. For a training batch they share one network size: resized, they all are
``input_size``; padded, each is reflect-padded onto one canvas (the largest padded size) and cropped
back by its own box. :func:`probabilities` predicts one size at a time, and an image larger than
``tile`` on a side (with ``fit="pad"``) in overlapping tiles, so memory is bounded by the tile.
"""

from __future__ import annotations

import numpy as np

from tinyunet.backend import as_numpy, get_array_module, map_batches
from tinyunet.transforms import as_stack, crop, hflip, pad_to, pad_to_multiple, resize, size_groups, take
from tinyunet.layers import sigmoid

FITS = ("resize", "pad")
MAX_INPUT_SIZE = 2048  # the largest network side of fit="resize" (the seed's: 128)


def to_network(images, fit: str, input_size: int, depth: int):
    """Images (N, H, W) gray or (N, H, W, C), or a list of them of mixed sizes -> network input
    (N, S, S', C) and the box that undoes the fit (a list of boxes, one per image, for a list).

    Masks go through the same function, so image and target stay aligned (resized masks become
    soft targets in [0, 1], as in the seed recipe).
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    step = 2 ** depth
    if fit == "resize" and input_size % step:
        raise ValueError(f"input size {input_size} is not divisible by 2**depth = {step}: "
                         f"use a multiple of {step}, such as {step * round(input_size / step)}")
    if isinstance(images, list):
        xp = get_array_module(*images)
        if fit == "resize":
            out, box = xp.concatenate([resize(image[None], input_size) for image in images]), None
        else:
            size = tuple(max(-(-image.shape[axis] // step) * step for image in images) for axis in (0, 1))
            padded = [pad_to(image[None], size) for image in images]
            out, box = xp.concatenate([x for x, _ in padded]), [b for _, b in padded]
    elif fit == "resize":
        out, box = resize(images, input_size), None
    else:
        out, box = pad_to_multiple(images, step)
    return (out[..., None] if out.ndim == 3 else out), box  # (N, S, S', C)


def from_network(probs, fit: str, box, size):
    """Network output (N, S, S', 1) -> (N, H, W) at the original image size ``size`` (H, W); a list of
    (H, W) arrays for a list of sizes (and of boxes)."""
    probs = probs[..., 0]
    if isinstance(size, list):
        if fit == "resize":
            return [resize(p[None], s)[0] for p, s in zip(probs, size)]
        return [crop(p[None], b)[0] for p, b in zip(probs, box)]
    return resize(probs, size) if fit == "resize" else crop(probs, box)


TILE = 1024  # with fit="pad", an image larger than this on a side is predicted in tiles of this side
TILE_OVERLAP = 128  # pixels neighbouring tiles share; their probabilities are blended there


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of side ``tile`` start along an axis of ``length``, ``overlap`` apart, the last at the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, xp, dtype):
    """Blending weights along one axis of a tile: rising over ``overlap`` pixels at both ends, 1 between."""
    i = xp.arange(length, dtype=xp.float64)
    return xp.clip(xp.minimum(i + 1, length - i) / (overlap + 1), 0, 1).astype(dtype)  # (L,), all > 0


def probabilities(model, images, fit: str, input_size: int, batch_size: int = 32,
                  tta: bool = False, progress=None, tile: int = TILE):
    """Foreground probabilities (N, H, W) for images (N, H, W) or (N, H, W, C) of any size, on the
    model's device; for a list of images of mixed sizes, a list of (H, W) maps.

    Runs ``batch_size`` images of one size at a time without dropout. With ``tta`` each image is also
    predicted mirrored left-right and the two probability maps (the mirror flipped back) are averaged.
    With ``fit="pad"`` an image wider or taller than ``tile`` is predicted in overlapping tiles of at
    most ``tile`` x ``tile`` (blended where they overlap), ``batch_size`` tiles at a time.
    ``progress``, if given, is called with the number of images done after each batch.
    """
    depth = model.config["depth"]

    def predict_at_original_size(batch):  # (B, H, W[, C]) -> (B, H, W)
        x, box = to_network(batch, fit, input_size, depth)
        return from_network(sigmoid(model.forward(x, train=False)), fit, box, batch.shape[1:3])

    def predict(batch):  # (B, H, W[, C]) -> (B, H, W)
        p = predict_at_original_size(batch)
        if tta:  # mirror the image itself, so an odd padding cannot shift the mirrored view
            p = (p + hflip(predict_at_original_size(hflip(batch)))) / 2
        return p

    def predict_tiled(image):  # (H, W[, C]) -> (H, W), tile by tile
        xp = model.xp
        h, w = image.shape[:2]
        th, tw, overlap = min(tile, h), min(tile, w), min(TILE_OVERLAP, tile // 2)
        corners = [(y, x) for y in _tile_starts(h, th, overlap) for x in _tile_starts(w, tw, overlap)]
        weight = _ramp(th, overlap, xp, model.dtype)[:, None] * _ramp(tw, overlap, xp, model.dtype)[None, :]
        total = xp.zeros((h, w), dtype=model.dtype)
        weights = xp.zeros((h, w), dtype=model.dtype)
        for start in range(0, len(corners), batch_size):
            part = corners[start:start + batch_size]
            crops = np.stack([as_numpy(image[y:y + th, x:x + tw]) for y, x in part])  # (B, th, tw[, C])
            probs = map_batches(predict, crops, batch_size, xp, model.dtype)  # (B, th, tw)
            for (y, x), p in zip(part, probs):
                total[y:y + th, x:x + tw] += p * weight
                weights[y:y + th, x:x + tw] += weight
        return total / weights

    results = [None] * len(images)
    for group in size_groups(images):
        stack = take(images, group) if isinstance(images, list) else images  # (G, H, W[, C]), one size
        if fit == "pad" and max(stack.shape[1:3]) > tile:
            probs = model.xp.stack([predict_tiled(image) for image in stack])  # (G, H, W)
            if progress is not None:
                progress(len(stack))
        else:
            probs = map_batches(predict, stack, batch_size, model.xp, model.dtype, progress)
        if not isinstance(images, list):
            return probs
        for i, p in zip(group, probs):
            results[int(i)] = p
    return as_stack(results)


def binarize(probs, threshold: float):
    """Masks from probabilities: ``probs > threshold``, as NumPy bool (N, H, W)."""
    xp = get_array_module(probs)
    return as_numpy(probs > xp.float32(threshold))
