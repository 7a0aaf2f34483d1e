"""Scoring a labelled set: the threshold sweep, the scores at one threshold, the score per coverage class.

:func:`evaluate` takes the true masks and the predicted probabilities of N images and returns a
:class:`Report`; ``Report.format()`` is the table ``predict.py --evaluate`` prints::

    800 images, threshold 0.469 (from the checkpoint); the sweep's best is 0.490 (score 0.7712)
      competition score   0.7650
      mean IoU            0.7102
      pixel accuracy      0.9533
      per coverage class of the truth:
      class  salt        images   share   score     IoU
          0  empty          305   38.1%  0.9103  0.9103
          1  (0, 10%]       122   15.2%  0.4522  0.3218
          ...

Coverage classes are those of the split, ``ceil(10 * coverage)`` of the *true* mask (0 = no salt).
All arrays may be NumPy or CuPy; the report holds NumPy arrays and Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tinyunet.backend import as_numpy
from tinyunet.data import coverage, coverage_class
from tinyunet.metrics import (best_threshold, dice, drop_small, image_scores, iou, pooled_iou_dice, threshold_sweep,
                              to_bool)
from tinyunet.pipeline import binarize
from tinyunet.transforms import canvas

N_CLASSES = 11  # coverage classes 0 (empty) .. 10


def class_label(c: int) -> str:
    """The coverage range of class ``c``: 'empty' for 0, '(10(c-1)%, 10c%]' otherwise."""
    return "empty" if c == 0 else f"({10 * (c - 1)}, {10 * c}%]"


@dataclass
class Report:
    """Scores of one set of predictions against the truth (see :func:`evaluate`)."""

    n_images: int
    thresholds: np.ndarray  # (T,) the sweep's probability thresholds
    scores: np.ndarray  # (T,) the competition score at each of them
    threshold: float  # the threshold the numbers below are taken at
    threshold_source: str  # where it came from: "given", "best of the sweep", "from the checkpoint", ...
    best_threshold: float  # the sweep's best threshold ...
    best_score: float  # ... and its score
    score: float  # competition score at ``threshold``
    mean_iou: float  # mean over images of the IoU at ``threshold`` (1 where both masks are empty)
    mean_dice: float  # mean over images of the Dice coefficient at ``threshold`` (1 where both are empty)
    set_iou: float  # IoU over the whole set's pixels at ``threshold``
    set_dice: float  # Dice over the whole set's pixels at ``threshold``
    pixel_accuracy: float  # fraction of all pixels predicted right at ``threshold``
    image_iou: np.ndarray = field(repr=False)  # (N,) IoU of each image
    image_dice: np.ndarray = field(repr=False)  # (N,) Dice of each image
    image_scores: np.ndarray = field(repr=False)  # (N,) competition score of each image
    class_counts: np.ndarray = field(repr=False)  # (11,) images per coverage class of the truth
    class_scores: np.ndarray = field(repr=False)  # (11,) mean competition score per class, NaN if none
    class_iou: np.ndarray = field(repr=False)  # (11,) mean IoU per class, NaN if none

    def as_dict(self) -> dict:
        """Plain JSON-able numbers: for logs, checkpoint metadata and tests."""
        def floats(a):
            return [None if math.isnan(v) else float(v) for v in a]

        return {
            "n_images": self.n_images, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "best_threshold": self.best_threshold,
            "best_score": self.best_score, "score": self.score, "mean_iou": self.mean_iou,
            "mean_dice": self.mean_dice, "set_iou": self.set_iou, "set_dice": self.set_dice,
            "pixel_accuracy": self.pixel_accuracy,
            "thresholds": floats(self.thresholds), "scores": floats(self.scores),
            "class_counts": [int(c) for c in self.class_counts],
            "class_scores": floats(self.class_scores), "class_iou": floats(self.class_iou),
        }

    def format(self, what: str = "salt") -> str:
        """A readable table: the headline numbers, then one line per coverage class of ``what`` (the
        foreground's name: "salt" for TGS, "mask" for other data)."""
        lines = [
            f"{self.n_images} images, threshold {self.threshold:.3f} ({self.threshold_source}); "
            f"the sweep's best is {self.best_threshold:.3f} (competition score {self.best_score:.4f})",
            f"  Dice                {self.mean_dice:.4f} per image, {self.set_dice:.4f} over the set",
            f"  IoU                 {self.mean_iou:.4f} per image, {self.set_iou:.4f} over the set",
            f"  competition score   {self.score:.4f} (TGS: precision over IoU thresholds 0.5-0.95)",
            f"  pixel accuracy      {self.pixel_accuracy:.4f}",
            "  per coverage class of the truth:",
            f"  {'class':>5}  {what:<11} {'images':>6}  {'share':>6}  {'score':>6}  {'IoU':>6}",
        ]
        for c in range(N_CLASSES):
            count = int(self.class_counts[c])
            share = f"{100 * count / self.n_images:.1f}%"
            score, mean_iou = ((f"{self.class_scores[c]:.4f}", f"{self.class_iou[c]:.4f}") if count
                               else ("-", "-"))
            lines.append(f"  {c:>5}  {class_label(c):<11} {count:>6}  {share:>6}  {score:>6}  "
                         f"{mean_iou:>6}")
        return "\n".join(lines)


def evaluate(truth, probs, threshold: float | None = None, threshold_source: str | None = None,
             n_thresholds: int = 50, min_area: int = 0) -> Report:
    """Score probabilities ``probs`` (N, H, W) against boolean (or 0/1) masks ``truth`` (N, H, W).

    A set of mixed sizes comes as lists of (H, W) arrays; they are scored on one canvas, background
    around each image, which no per-image count sees. Sweeps ``n_thresholds`` probability thresholds
    in [0, 1]; the numbers at one threshold are taken at ``threshold`` when given, else at the sweep's
    best. ``threshold_source`` says in the report where a given threshold came from (default
    "given"). A pixel is salt when its probability is
    greater than the threshold, as in prediction; with ``min_area`` the empty-mask rule applies too
    (:func:`tinyunet.metrics.drop_small`), in the sweep and at the threshold.
    """
    cov = as_numpy(coverage(truth))  # (N,) of each image's own pixels
    pixels = sum(int(t.size) for t in truth) if isinstance(truth, list) else None
    truth, probs = to_bool(canvas(truth), "truth"), canvas(probs)
    pixels = pixels or int(truth.size)
    if truth.ndim != 3 or truth.shape != probs.shape:
        raise ValueError(f"evaluate needs truth and probs of one (N, H, W) shape, got {truth.shape} "
                         f"and {probs.shape}")
    if truth.shape[0] == 0:
        raise ValueError("evaluate needs at least one image")
    thresholds, scores = threshold_sweep(truth, probs, n_thresholds, min_areas=[min_area])
    scores = scores[0]
    best_t, best_s = best_threshold(thresholds, scores)
    if threshold is None:
        threshold, threshold_source = best_t, "best of the sweep"
    else:
        threshold = float(threshold)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        threshold_source = threshold_source or "given"
    pred = drop_small(binarize(probs, threshold), min_area)  # NumPy bool (N, H, W)
    truth = as_numpy(truth)
    per_image = image_scores(truth, pred)  # (N,)
    per_iou = iou(truth, pred)  # (N,)
    per_dice = dice(truth, pred)  # (N,)
    set_iou, set_dice = pooled_iou_dice(truth, pred)
    classes = as_numpy(coverage_class(cov))  # (N,)
    counts = np.bincount(classes, minlength=N_CLASSES)  # (11,)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty classes -> NaN
        class_scores = np.bincount(classes, per_image, minlength=N_CLASSES) / counts
        class_iou = np.bincount(classes, per_iou, minlength=N_CLASSES) / counts
    return Report(
        n_images=int(truth.shape[0]), thresholds=thresholds, scores=scores, threshold=threshold,
        threshold_source=threshold_source, best_threshold=best_t, best_score=best_s,
        score=float(per_image.mean()), mean_iou=float(per_iou.mean()), mean_dice=float(per_dice.mean()),
        set_iou=set_iou, set_dice=set_dice, pixel_accuracy=1 - int((truth != pred).sum()) / pixels,
        image_iou=per_iou, image_dice=per_dice, image_scores=per_image,
        class_counts=counts, class_scores=class_scores, class_iou=class_iou,
    )
