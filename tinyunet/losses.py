"""Binary cross-entropy on logits, and pixel accuracy.

With z the logit and y the target in [0, 1], p = sigmoid(z):

    BCE(z, y) = -[y log p + (1 - y) log(1 - p)]
              = max(z, 0) - z*y + log(1 + exp(-|z|))         (no overflow for any z)
    dBCE/dz   = p - y

The loss is the mean over every pixel of every image, so dL/dz = (p - y) / (number of pixels).

:func:`loss_in_box` gives any of these losses only the pixels inside a box (``--loss-region central``: the
original image inside its reflect-padded border).
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
    # the count as a scalar of the logits' dtype: a Python int above 65535 would make dlogits float64
    # under value-based promotion (NumPy 1.x, CuPy 13), and with it the whole backward
    dlogits = (sigmoid(logits) - target) / logits.dtype.type(logits.size)
    return loss, dlogits


def pixel_accuracy(logits, target):
    """Fraction of pixels where (sigmoid(logit) > 0.5) agrees with (target > 0.5); a 0-d array."""
    return ((logits > 0) == (target > 0.5)).mean()


# --------------------------------------------------------------------------------------------
# The Lovász hinge (Berman, Rannen Triki and Blaschko, CVPR 2018)
# --------------------------------------------------------------------------------------------

def lovasz_grad(gt_sorted):
    """The Lovász extension's gradient of the Jaccard loss at errors sorted in descending order.

    ``gt_sorted`` (N, P): each image's truth (0/1) in the order of its sorted errors. With
    ``gts`` the image's truth count, after the k-th pixel
    ``jaccard_k = 1 - (gts - cumsum(gt)_k) / (gts + cumsum(1 - gt)_k)``; the weights are its
    increments ``jaccard_k - jaccard_(k-1)`` (the first one is ``jaccard_1`` itself).
    """
    xp = get_array_module(gt_sorted)
    gts = gt_sorted.sum(axis=1, keepdims=True)  # (N, 1)
    intersection = gts - xp.cumsum(gt_sorted, axis=1)  # (N, P)
    union = gts + xp.cumsum(1 - gt_sorted, axis=1)  # >= 1 everywhere: no division by zero
    jaccard = 1 - intersection / union
    jaccard[:, 1:] = jaccard[:, 1:] - jaccard[:, :-1]
    return jaccard


def lovasz_hinge(logits, target, per_image: bool = True, variant: str = "relu"):
    """The Lovász hinge of ``logits`` against binary ``target`` (N, H, W, 1); returns ``(loss, dlogits)``.

    Per image, with sign s = 2*target - 1 and hinge errors e = 1 - logit * s, sorted in descending order:

        loss_image = sum_k f(e_sorted[k]) * lovasz_grad(truth in that order)[k]
        f = relu (Berman et al.), or f(e) = elu(e) + 1 (``variant="elu"``, smooth and never flat)

    then the mean over images (``per_image=True``, as the competition averages images) or one
    sort over every pixel of the batch. The sort is piecewise constant, so away from ties the
    gradient is the weights times f'(e) times de/dlogit = -s.
    """
    errors, truth, order = _sorted_errors(logits, target, per_image, variant)
    loss, drows = _hinge_of_sorted(errors, truth, order, variant)
    return loss, drows.reshape(logits.shape)


def _sorted_errors(logits, target, per_image: bool, variant: str):
    """The rows of hinge errors e = 1 - logit * (2*target - 1), (N, P) per image or (1, N*P), their
    truth (0/1) and each row's order of descending errors."""
    xp = get_array_module(logits)
    if logits.shape != target.shape:
        raise ValueError(f"logits {logits.shape} and target {target.shape} must have the same shape")
    if variant not in ("relu", "elu"):
        raise ValueError(f"lovasz_hinge variant must be 'relu' or 'elu', got {variant!r}")
    rows = logits.reshape(len(logits), -1) if per_image else logits.reshape(1, -1)  # (N, P) or (1, N*P)
    truth = target.reshape(rows.shape).astype(logits.dtype, copy=False)
    errors = 1 - rows * (2 * truth - 1)
    return errors, truth, xp.argsort(-errors, axis=1)  # descending errors, image by image


def _hinge_of_sorted(errors, truth, order, variant: str):
    """The Lovász hinge (the mean over rows) of ``errors`` (N, P) in ``order``, and its gradient with
    respect to the rows' logits (N, P)."""
    xp = get_array_module(errors)
    errors_sorted = xp.take_along_axis(errors, order, axis=1)
    weights = lovasz_grad(xp.take_along_axis(truth, order, axis=1))  # (N, P)
    if variant == "relu":
        f, df = xp.maximum(errors_sorted, 0), (errors_sorted > 0).astype(errors.dtype)
    else:  # elu(e) + 1 = e + 1 for e > 0, exp(e) otherwise
        exp = xp.exp(xp.minimum(errors_sorted, 0))
        f, df = xp.where(errors_sorted > 0, errors_sorted + 1, exp), xp.where(errors_sorted > 0, 1, exp)
    scale = errors.dtype.type(1) / errors.dtype.type(len(errors))  # the mean over images
    loss = (f * weights).sum() * scale
    d_sorted = df * weights * scale  # dL / d e_sorted
    d_errors = xp.empty_like(d_sorted)
    xp.put_along_axis(d_errors, order, d_sorted, axis=1)
    return loss, -(2 * truth - 1) * d_errors  # de/dlogit = -s


def symmetric_lovasz(logits, target, variant: str = "relu"):
    """(Lovász hinge of the salt + Lovász hinge of the background) / 2, per image: the second term
    scores the inverted mask with negated logits, so empty images are judged on their background.

    Negating both the logits and the signs leaves every error 1 - logit * s as it is, so one sort
    serves both terms; the background's gradient, taken for the negated logits, changes sign."""
    errors, truth, order = _sorted_errors(logits, target, True, variant)
    salt, dsalt = _hinge_of_sorted(errors, truth, order, variant)
    background, dbackground = _hinge_of_sorted(errors, 1 - truth, order, variant)
    half = logits.dtype.type(0.5)
    return (salt + background) * half, ((dsalt - dbackground) * half).reshape(logits.shape)


def bce_lovasz(logits, target):
    """Binary cross-entropy + the per-image Lovász hinge (elu + 1): BCE's dense signal on every
    pixel, Lovász's on the IoU that the competition scores."""
    bce, dbce = binary_crossentropy(logits, target)
    lovasz, dlovasz = lovasz_hinge(logits, target, variant="elu")
    return bce + lovasz, dbce + dlovasz


# Every loss a config can name: (logits, target) -> (loss, dlogits).
LOSSES = {
    "bce": binary_crossentropy,
    "lovasz": lovasz_hinge,
    "lovasz_elu": lambda logits, target: lovasz_hinge(logits, target, variant="elu"),
    "lovasz_symmetric": symmetric_lovasz,
    "bce_lovasz": bce_lovasz,
}


def loss_in_box(loss_fn, logits, target, box: tuple[int, int, int, int], mirrored=None):
    """``loss_fn`` on the pixels inside ``box`` = (top, left, h, w) of every image only: ``(loss, dlogits)``.

    The loss is ``loss_fn``'s of the cropped (B, h, w, 1) logits and targets (BCE: the mean over the box's
    pixels; per-image Lovász: each image's box alone); ``dlogits`` (B, H, W, 1) is its gradient placed back,
    zero outside the box. ``mirrored`` (B,) bool, or None for none: those images were mirrored left-right
    after padding, so their box is mirrored too (left' = W - left - w; an odd padding, 101 -> 112, puts the
    extra column on the other side).
    """
    xp = get_array_module(logits)
    top, left, h, w = box
    lefts = left if mirrored is None else xp.where(mirrored, logits.shape[2] - left - w, left)[:, None, None]
    index = (xp.arange(len(logits))[:, None, None], top + xp.arange(h)[None, :, None],
             lefts + xp.arange(w)[None, None, :])  # broadcast to (B, h, w): image, row, column
    loss, dinner = loss_fn(logits[index], target[index])  # (B, h, w, 1)
    dlogits = xp.zeros_like(logits)
    dlogits[index] = dinner  # no loss, no gradient outside the box
    return loss, dlogits


def get_loss(name: str):
    """The loss called ``name`` in :data:`LOSSES`; ValueError naming the choices otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
