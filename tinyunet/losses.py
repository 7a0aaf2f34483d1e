"""Binary cross-entropy on logits, and pixel accuracy.

With z the logit and y the target in [0, 1], p = sigmoid(z):

    BCE(z, y) = -[y log p + (1 - y) log(1 - p)]
              = max(z, 0) - z*y + log(1 + exp(-|z|))         (no overflow for any z)
    dBCE/dz   = p - y

The loss is the mean over every pixel of every image, so dL/dz = (p - y) / (number of pixels).
"""

from __future__ import annotations

from tinyunet.backend import get_array_module
from tinyunet.layers import sigmoid


def binary_crossentropy(logits, target):
    """Mean BCE of sigmoid(logits) against ``target``; returns ``(loss, dlogits)``.

    ``logits`` and ``target`` have the same shape, e.g. (N, H, W, 1). ``loss`` is a 0-d array of
    the logits' module (no copy to the host: call ``float(loss)`` when you need the number).
    """
    xp = get_array_module(logits)
    if logits.shape != target.shape:
        raise ValueError(f"logits {logits.shape} and target {target.shape} must have the same shape")
    target = target.astype(logits.dtype, copy=False)
    loss = (xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))).mean()
    dlogits = (sigmoid(logits) - target) / logits.size
    return loss, dlogits


def pixel_accuracy(logits, target):
    """Fraction of pixels where (sigmoid(logit) > 0.5) agrees with (target > 0.5); a 0-d array."""
    return ((logits > 0) == (target > 0.5)).mean()
