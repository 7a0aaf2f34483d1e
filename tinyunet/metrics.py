"""The competition metric: IoU per image, precision over IoU thresholds, the probability-threshold sweep.

Notation: N images of H x W pixels, boolean masks ``truth`` and ``pred`` of shape ``(N, H, W)``;
I = |truth & pred| and U = |truth | pred| count pixels per image; T probability thresholds in the sweep.

    IoU = I / U                                         (1 when both masks are empty, U = 0)

    score = 1/10 * sum over t in {0.50, 0.55, ..., 0.95} of [IoU > t]

An IoU must be strictly *greater* than a threshold to count as a hit. With one object per image this is
the Kaggle TGS Salt precision ``TP / (TP + FP + FN)`` at each threshold: a hit is TP = 1, a miss is
FP = FN = 1 (or just one of them when a mask is empty). So both masks empty scores 1, exactly one empty
scores 0, and the competition score is the mean of ``score`` over the images.

The comparison ``I / U > (10 + k) / 20`` is done in integers, ``20 * I > (10 + k) * U``, so an IoU that
lands exactly on a threshold (0.5 = 1/2, 0.75 = 3/4) is never pushed over it by float rounding.

Beware the kernel copied around Kaggle that builds the IoU from a 2-bin ``np.histogram2d``: it sizes the
bins from the distinct values in each mask, so an empty mask gets a single bin, and it can score an empty
prediction against a large mask as a hit. Here the counts are plain sums, and the empty cases follow
from the counts alone: ``U = 0`` (both empty) scores 1, ``I = 0 < U`` (one empty) scores 0.

Shapes: masks are ``(N, H, W)``, or ``(H, W)`` for one image; a channel axis ``(N, H, W, 1)`` must be
squeezed first. Per-image results come back as NumPy arrays, single numbers as Python floats (they are
small and go to reports); the heavy work runs on NumPy or CuPy, whichever the inputs are.
"""

from __future__ import annotations

import numpy as np

from tinyunet.backend import as_numpy, get_array_module

N_IOU_THRESHOLDS = 10  # IoU thresholds (10 + k) / 20 for k = 0..9, i.e. 0.50, 0.55, ..., 0.95


def to_bool(mask, name: str = "mask"):
    """``mask`` as a boolean array of its own module (NumPy or CuPy).

    Bool stays as it is; integers are salt where > 0 (PNG masks: 0/1, 0/255, 0/65535); floats must hold
    only 0 and 1 (a float32 target is fine, a probability map is refused: threshold it first).
    """
    xp = get_array_module(mask)
    mask = xp.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > 0
    if np.issubdtype(mask.dtype, np.floating):
        if not bool(xp.all((mask == 0) | (mask == 1))):
            raise ValueError(
                f"{name} is a float array with values other than 0 and 1; threshold probabilities first "
                "(probs > t)"
            )
        return mask == 1
    raise ValueError(f"{name} has dtype {mask.dtype}; expected a bool, integer or 0/1 float mask")


def _as_batch(truth, other, other_name: str):
    """Check that ``truth`` and ``other`` have the same (N, H, W) or (H, W) shape; return both as 3-D."""
    xp = get_array_module(truth, other)
    truth, other = xp.asarray(truth), xp.asarray(other)
    if truth.shape != other.shape:
        raise ValueError(f"truth has shape {truth.shape} but {other_name} has shape {other.shape}")
    if truth.ndim == 2:
        return truth[None], other[None]  # (1, H, W)
    if truth.ndim != 3:
        raise ValueError(
            f"masks must be (N, H, W) or (H, W), got shape {truth.shape}; squeeze a channel axis first"
        )
    return truth, other


def _counts(truth, pred):
    """Per-image intersection and union pixel counts, each (N,) integers."""
    truth, pred = _as_batch(truth, pred, "pred")
    truth, pred = to_bool(truth, "truth"), to_bool(pred, "pred")
    inter = (truth & pred).sum(axis=(1, 2))  # (N,)
    union = (truth | pred).sum(axis=(1, 2))  # (N,)
    return inter, union


def _precision(inter, union):
    """Per-image score from intersection and union counts of any shape: the mean of [I / U > t] over t.

    Exact integer comparison ``20 * I > (10 + k) * U``; an image with ``U == 0`` (both empty) scores 1.
    """
    xp = get_array_module(inter, union)
    k = xp.arange(N_IOU_THRESHOLDS)  # (10,)
    hits = 20 * inter[..., None] > (10 + k) * union[..., None]  # (..., 10)
    return xp.where(union == 0, 1.0, hits.mean(axis=-1))


def iou(truth, pred) -> np.ndarray:
    """Intersection over union per image, ``(N,)`` float64 (1 where both masks are empty)."""
    xp = get_array_module(truth, pred)
    inter, union = _counts(truth, pred)
    return as_numpy(xp.where(union == 0, 1.0, inter / xp.maximum(union, 1)))


def dice(truth, pred) -> np.ndarray:
    """Dice coefficient per image, 2I / (|truth| + |pred|) = 2I / (I + U), ``(N,)`` float64 (1 where both
    masks are empty)."""
    xp = get_array_module(truth, pred)
    inter, union = _counts(truth, pred)
    return as_numpy(xp.where(union == 0, 1.0, 2 * inter / xp.maximum(inter + union, 1)))


def pooled_iou_dice(truth, pred) -> tuple[float, float]:
    """IoU and Dice over the whole set, every pixel of every image counted together (1, 1 when both are empty)."""
    inter, union = (int(c.sum()) for c in _counts(truth, pred))
    return (inter / union, 2 * inter / (inter + union)) if union else (1.0, 1.0)


def image_scores(truth, pred) -> np.ndarray:
    """The competition score of each image, ``(N,)`` float64 in [0, 1]; the competition score is its mean."""
    return as_numpy(_precision(*_counts(truth, pred)))


def competition_score(truth, pred) -> float:
    """The competition score: the mean over images of :func:`image_scores`."""
    return float(image_scores(truth, pred).mean())


def pixel_accuracy(truth, pred) -> float:
    """The fraction of pixels, over all images, where the prediction equals the truth."""
    truth, pred = _as_batch(truth, pred, "pred")
    return float((to_bool(truth, "truth") == to_bool(pred, "pred")).mean())


def threshold_sweep(truth, probs, n_thresholds: int = 50, min_areas=None) -> tuple[np.ndarray, np.ndarray]:
    """The competition score of ``probs > t`` for ``n_thresholds`` thresholds t evenly spaced in [0, 1].

    Returns ``(thresholds, scores)``, NumPy arrays of shape ``(n_thresholds,)``; ``scores[j]`` equals
    ``competition_score(truth, probs > thresholds[j])`` (up to float rounding in the mean over images).
    With ``min_areas`` (A whole numbers) the scores are ``(A, n_thresholds)``: ``scores[a, j]`` scores
    ``drop_small(probs > thresholds[j], min_areas[a])``, the empty-mask rule.

    The thresholds are ``np.linspace(0, 1, n_thresholds)`` rounded to float32, so ``probs > t`` picks the
    same pixels whether ``probs`` is float32 or float64 and ``t`` a Python float, np.float32 or np.float64.

    Vectorised over images and thresholds at once, in one pass over the pixels: a pixel's bin b is the
    number of thresholds below its probability, so it is predicted at thresholds ``0 .. b - 1``. One
    ``bincount`` over (image, bin, is-truth) keys, then a cumulative sum from the top bin down gives every
    threshold's predicted count and intersection per image. Memory: a few int64 arrays the size of
    ``probs``.
    """
    truth, probs = _as_batch(truth, probs, "probs")
    truth = to_bool(truth, "truth")
    xp = get_array_module(probs)
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be a float array, got dtype {probs.dtype}")
    if bool(xp.isnan(probs).any()):
        raise ValueError("probs contains NaN")
    n_images = probs.shape[0]
    n_bins = n_thresholds + 1  # bin b = how many thresholds lie below the probability: 0..n_thresholds
    thresholds = np.linspace(0.0, 1.0, n_thresholds).astype(np.float32)

    p = probs.reshape(n_images, -1)  # (N, HW)
    # The bin is ceil(p * (T - 1)) up to float rounding; one comparison each way makes it exact
    # (the same as searchsorted(thresholds, p), four times faster). padded[b + 1] is threshold b.
    padded = xp.asarray(np.concatenate([[-np.inf], thresholds, [np.inf]]).astype(np.float32))
    bins = xp.clip(xp.ceil(p * (n_thresholds - 1)), 0, n_thresholds).astype(xp.int64)  # (N, HW)
    bins = bins + (p > padded[bins + 1]) - (p <= padded[bins])  # (N, HW)

    keys = (bins + n_bins * xp.arange(n_images)[:, None]) * 2 + truth.reshape(n_images, -1)  # (N, HW)
    counts = xp.bincount(keys.ravel(), minlength=n_images * n_bins * 2).reshape(n_images, n_bins, 2)
    # Threshold j predicts the pixels of bins j+1..T: a cumulative sum from the top bin, first bin dropped.
    above = xp.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (N, T, 2): [not truth, truth]
    inter = above[..., 1]  # (N, T)
    truth_area = truth.sum(axis=(1, 2))[:, None]  # (N, 1)
    union = truth_area + above[..., 0]  # (N, T): truth plus false positives
    if min_areas is None:
        return thresholds, as_numpy(_precision(inter, union).mean(axis=0))  # (T,)
    # The empty-mask rule: a prediction of fewer than A pixels becomes empty (inter 0, union = truth).
    area = above.sum(axis=2)  # (N, T) predicted pixels
    areas = xp.asarray(np.asarray(min_areas, dtype=np.int64))[:, None, None]  # (A, 1, 1)
    small = area[None] < areas  # (A, N, T)
    scores = _precision(xp.where(small, 0, inter[None]), xp.where(small, truth_area[None], union[None]))
    return thresholds, as_numpy(scores.mean(axis=1))  # (A, T)


def drop_small(masks, min_area: int):
    """The empty-mask rule: every mask (N, H, W) with fewer than ``min_area`` pixels becomes empty.

    About 39 % of TGS images hold no salt, and a single false-positive pixel scores such an image 0.
    """
    small = masks.reshape(len(masks), -1).sum(axis=1) < min_area  # (N,)
    return masks & ~small[:, None, None]


def best_postprocessing(thresholds: np.ndarray, scores: np.ndarray, min_areas) -> tuple[int, float, float]:
    """``(min_area, threshold, score)`` of the best cell of a ``threshold_sweep(..., min_areas)`` grid
    (A, T); on a tie the smallest area, then the lowest threshold."""
    a, t = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(min_areas[a]), float(thresholds[t]), float(scores[a, t])


def best_threshold(thresholds: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold with the highest score, and that score (the lowest such threshold on a tie)."""
    best = int(np.argmax(scores))
    return float(thresholds[best]), float(scores[best])
