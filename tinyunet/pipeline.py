"""Between images and the network: fitting any image size to the U-Net and back.

The U-Net needs H and W divisible by 2**depth; TGS images are 101 x 101. Two ways to fit them:

* ``"resize"`` (the seed recipe): bilinear resize to ``input_size`` x ``input_size`` (128), and the
  probabilities resized back to the original size for scoring and submission;
* ``"pad"``: reflect-pad to the next multiple of 2**depth (101 -> 112 at depth 4) and crop back.

Training, validation and prediction all go through :func:`to_network` / :func:`probabilities`, so
the three can never disagree about the geometry.
"""

from __future__ import annotations

from tinyunet.backend import as_numpy, get_array_module, map_batches
from tinyunet.transforms import crop, hflip, pad_to_multiple, resize
from tinyunet.layers import sigmoid

FITS = ("resize", "pad")
MAX_INPUT_SIZE = 2048  # the largest network side of fit="resize" (the seed's: 128)


def to_network(images, fit: str, input_size: int, depth: int):
    """Images (N, H, W) -> network input (N, S, S', 1) and the box that undoes the fit.

    Masks go through the same function, so image and target stay aligned (resized masks become
    soft targets in [0, 1], as in the seed recipe).
    """
    if fit == "resize":
        step = 2 ** depth
        if input_size % step:
            raise ValueError(f"input size {input_size} is not divisible by 2**depth = {step}: "
                             f"use a multiple of {step}, such as {step * round(input_size / step)}")
        out, box = resize(images, input_size), None
    elif fit == "pad":
        out, box = pad_to_multiple(images, 2 ** depth)
    else:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    return out[..., None], box  # (N, S, S', 1)


def from_network(probs, fit: str, box, size: tuple[int, int]):
    """Network output (N, S, S', 1) -> (N, H, W) at the original image size."""
    probs = probs[..., 0]
    return resize(probs, size) if fit == "resize" else crop(probs, box)


def probabilities(model, images, fit: str, input_size: int, batch_size: int = 32,
                  tta: bool = False, progress=None):
    """Salt probabilities (N, H, W) for images (N, H, W) of any size, on the model's device.

    Runs ``batch_size`` images at a time without dropout. With ``tta`` each image is also predicted
    mirrored left-right and the two probability maps (the mirror flipped back) are averaged.
    ``progress``, if given, is called with the number of images done after each batch.
    """
    depth = model.config["depth"]
    h, w = images.shape[1:]

    def predict_at_original_size(batch):  # (B, H, W) -> (B, H, W)
        x, box = to_network(batch, fit, input_size, depth)
        return from_network(sigmoid(model.forward(x, train=False)), fit, box, (h, w))

    def predict(batch):  # (B, H, W) -> (B, H, W)
        p = predict_at_original_size(batch)
        if tta:  # mirror the image itself, so an odd padding cannot shift the mirrored view
            p = (p + hflip(predict_at_original_size(hflip(batch)))) / 2
        return p

    return map_batches(predict, images, batch_size, model.xp, model.dtype, progress)


def binarize(probs, threshold: float):
    """Masks from probabilities: ``probs > threshold``, as NumPy bool (N, H, W)."""
    xp = get_array_module(probs)
    return as_numpy(probs > xp.float32(threshold))
