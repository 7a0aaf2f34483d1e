"""Every picture tinyunet draws, saved as PNG.

Four figures, each a function that takes plain arrays and an output path and returns that path:

* :func:`learning_curves`     loss, accuracy, validation score and learning rate per epoch;
* :func:`threshold_curve`     competition score against the probability threshold, the best marked;
* :func:`prediction_grid`     examples as columns: input / truth / probability / predicted mask;
* :func:`coverage_histogram`  how many images of each coverage class 0..10 the two parts hold.

matplotlib is imported inside the functions, so ``import tinyunet`` stays light, and only its
``Figure`` class is used (the Agg canvas it comes with): no window opens and no global backend is
changed, so the functions are safe in scripts, tests and on machines without a display. Each PNG is
written to a temporary file beside the target and renamed onto it, so an interrupted save never
leaves half a picture over an old one. Arrays may be NumPy or CuPy (only what is drawn is copied to
the host).

Notation: N images of H x W pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tinyunet.backend import as_numpy
from tinyunet.files import atomic_write
from tinyunet.transforms import for_display

N_CLASSES = 11  # coverage classes 0 (empty) .. 10 (more than 90 % salt)
CLASS_LABELS = ["0\nempty"] + [f"{c}\n≤{10 * c}%" for c in range(1, N_CLASSES)]  # ticks of class axes


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no window)."""
    from matplotlib.figure import Figure  # heavy: imported only when a picture is drawn

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out_png: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out_png`` atomically (temporary file + rename); return the path."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_png) as f:
        fig.savefig(f, format="png")
    return out_png


def _finite(values) -> np.ndarray:
    """float64 array with non-finite values (a diverged loss) as NaN: matplotlib leaves a gap."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


# ------------------------------------------------------------------------------------------------
# Learning curves
# ------------------------------------------------------------------------------------------------

def _column(history: Sequence[Mapping], key: str) -> np.ndarray:
    """``history[i][key]`` for every epoch as float64, NaN where an epoch lacks it."""
    values = [row.get(key) for row in history]
    return _finite([math.nan if v is None else v for v in values])


def learning_curves(history: Sequence[Mapping], out_png: str | os.PathLike) -> Path:
    """Save a 2 x 2 panel of training curves per epoch and return the path.

    ``history`` holds one dict per epoch with the keys ``epoch``, ``loss``, ``accuracy``,
    ``val_loss``, ``val_accuracy``, ``val_score`` and ``lr`` (a missing key or a non-finite value
    leaves a gap). Panels: loss and val_loss (the best val_loss epoch marked), accuracy and
    val_accuracy, val_score (the competition score on the validation set), lr on a log scale.
    """
    from matplotlib.ticker import MaxNLocator

    history = list(history)
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    if not history:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return _save(fig, out_png)

    epochs = _column(history, "epoch")
    if np.isnan(epochs).any():  # no epoch numbers recorded: count from 1
        epochs = np.arange(1, len(history) + 1, dtype=np.float64)
    marker = "o" if len(history) <= 30 else None  # dots help a short run, clutter a long one

    panels = [
        (axes[0, 0], "loss (binary cross-entropy)", [("loss", "train"), ("val_loss", "validation")]),
        (axes[0, 1], "pixel accuracy", [("accuracy", "train"), ("val_accuracy", "validation")]),
        (axes[1, 0], "validation competition score", [("val_score", "validation")]),
        (axes[1, 1], "learning rate", [("lr", "lr")]),
    ]
    for ax, title, series in panels:
        drawn = False
        for key, label in series:
            values = _column(history, key)
            if np.isnan(values).all():
                continue
            color = "C1" if label == "validation" else "C0"
            ax.plot(epochs, values, marker=marker, markersize=3, color=color, label=label)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        elif len(series) > 1:
            ax.legend(loc="best")

    val_loss = _column(history, "val_loss")
    if not np.isnan(val_loss).all():
        best = int(np.nanargmin(val_loss))
        axes[0, 0].axvline(epochs[best], color="gray", linestyle=":", linewidth=1)
        axes[0, 0].plot([epochs[best]], [val_loss[best]], marker="*", markersize=12, color="C1",
                        linestyle="none", label=f"best val_loss {val_loss[best]:.4f} "
                                                f"(epoch {epochs[best]:g})")
        axes[0, 0].legend(loc="best")
    lr = _column(history, "lr")
    if (lr > 0).any():  # NaN compares False
        axes[1, 1].set_yscale("log")
    axes[1, 0].set_ylim(-0.02, 1.02)
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------------------
# Threshold sweep
# ------------------------------------------------------------------------------------------------

def threshold_curve(thresholds, scores, best_threshold: float, out_png: str | os.PathLike) -> Path:
    """Save the competition score against the probability threshold, the best one marked and labelled."""
    thresholds, scores = _finite(as_numpy(thresholds)), _finite(as_numpy(scores))
    if thresholds.shape != scores.shape or thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(f"threshold_curve needs two 1-D arrays of one length, got shapes "
                         f"{thresholds.shape} and {scores.shape}")
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    ax.plot(thresholds, scores, marker="o", markersize=3, color="C0", label="score at threshold")
    best = int(np.nanargmin(np.abs(thresholds - best_threshold)))  # the sweep point nearest to it
    best_score = scores[best]
    ax.axvline(best_threshold, color="C3", linestyle=":", linewidth=1)
    ax.plot([best_threshold], [best_score], marker="*", markersize=14, color="C3", linestyle="none",
            label=f"best: threshold {best_threshold:.3f}, score {best_score:.4f}")
    # the label sits above the maximum (the curve is lower on both sides), below it near the top
    above = not best_score > 0.9
    ax.annotate(f"{best_threshold:.3f} → {best_score:.4f}", (best_threshold, best_score),
                xytext=(0, 12 if above else -14), textcoords="offset points", ha="center",
                va="bottom" if above else "top", color="C3",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_xlabel("probability threshold (pixel is salt when probability > threshold)")
    ax.set_ylabel("competition score (mean precision, IoU 0.50-0.95)")
    ax.set_title("Threshold sweep")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower center")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------------------
# Examples
# ------------------------------------------------------------------------------------------------

PREVIEW_COLUMNS = 8  # examples in a prediction preview


def spread_picks(cover: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct indices whose coverages spread evenly from the lowest to the highest.

    For each target coverage in ``linspace(min, max, n)`` the nearest image not yet picked is taken,
    so a set that is 40 % empty shows one empty example, not three. Returned sorted by coverage.
    """
    targets = np.linspace(cover.min(), cover.max(), n)
    free = np.ones(len(cover), bool)
    picks = []
    for target in targets:
        i = int(np.argmin(np.where(free, np.abs(cover - target), np.inf)))
        free[i] = False
        picks.append(i)
    return np.array(sorted(picks, key=lambda i: (cover[i], i)), dtype=np.int64)


def prediction_grid(images, probs, masks_pred, out_png: str | os.PathLike, truths=None, ids=None,
                    n: int = PREVIEW_COLUMNS) -> Path:
    """Save a grid of ``n`` examples as columns and return the path.

    Rows: the input image, the true mask (when ``truths`` is given), the salt probability and the
    predicted mask. All arrays are (N, H, W), NumPy or CuPy; images may be (N, H, W, C): RGB is shown as it
    is, any other channel count by its channels' mean. With ``truths`` the examples are spread
    over the true coverage (empty to full) and each predicted mask is titled with its competition
    score and IoU; without them they are spread over the predicted coverage. ``ids`` name the
    columns.
    """
    from tinyunet.metrics import image_scores, iou  # only for the titles

    images, probs, masks_pred = (as_numpy(a) for a in (images, probs, masks_pred))
    truths = None if truths is None else as_numpy(truths)
    shapes = {a.shape[:3] for a in (images, probs, masks_pred) + (() if truths is None else (truths,))}
    if len(shapes) != 1 or probs.ndim != 3 or images.ndim not in (3, 4):
        raise ValueError(f"prediction_grid needs (N, H, W) arrays of one shape (images may be (N, H, W, C)), "
                         f"got {sorted(shapes)}")
    if len(images) == 0:
        raise ValueError("prediction_grid needs at least one image")
    if ids is not None and len(ids) != len(images):
        raise ValueError(f"prediction_grid got {len(ids)} ids for {len(images)} images")
    reference = truths if truths is not None else masks_pred
    cover = (reference.reshape(len(reference), -1) > 0.5).mean(axis=1)  # (N,)
    picks = spread_picks(cover, min(max(n, 1), len(images)))

    rows = [("input", images, "gray")]
    if truths is not None:
        rows.append(("truth", truths, "gray"))
    rows += [("probability", probs, "magma"), ("predicted", masks_pred, "gray")]
    cols = len(picks)
    fig = _figure(1.45 * cols + 0.9, 1.6 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    shown = None
    for col, i in enumerate(picks):
        for row, (label, array, cmap) in enumerate(rows):
            ax = axes[row, col]
            picture = for_display(array[i]) if label == "input" else array[i]  # (H, W) or (H, W, 3)
            shown_here = ax.imshow(picture.astype(np.float32), cmap=cmap, vmin=0, vmax=1,
                                   interpolation="nearest")
            if label == "probability":
                shown = shown_here
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label, fontsize=10)
        name = str(ids[i]) if ids is not None else f"#{i}"
        name = name if len(name) <= 10 else name[:9] + "…"
        what = "salt" if truths is not None else "predicted"  # whose coverage the picks follow
        axes[0, col].set_title(f"{name}\n{cover[i]:.0%} {what}", fontsize=8)
        if truths is not None:
            t, p = truths[i][None] > 0.5, masks_pred[i][None] > 0.5
            axes[-1, col].set_title(f"score {image_scores(t, p)[0]:.2f}\nIoU {iou(t, p)[0]:.2f}",
                                    fontsize=8)
    if shown is not None:
        fig.colorbar(shown, ax=axes[len(rows) - 2, :].tolist(), fraction=0.02, pad=0.01,
                     label="p(salt)")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------------------
# Coverage classes
# ------------------------------------------------------------------------------------------------

def coverage_histogram(coverage_train, coverage_val, out_png: str | os.PathLike) -> Path:
    """Save the share of each coverage class 0..10 in the training and validation parts.

    ``coverage_train`` and ``coverage_val`` are per-image salt fractions in [0, 1] (as
    :func:`tinyunet.data.coverage` returns them), not classes. Bars show each part's share of its own
    images, so a stratified split shows two matching profiles; the legend gives the counts.
    """
    from tinyunet.data import coverage_class

    parts = []
    for name, cov in (("training", coverage_train), ("validation", coverage_val)):
        cov = np.asarray(as_numpy(cov), dtype=np.float64).ravel()
        if cov.size and (np.isnan(cov).any() or cov.min() < 0 or cov.max() > 1):
            raise ValueError(f"coverage_histogram needs salt fractions in [0, 1]; the {name} part "
                             f"holds values in [{np.nanmin(cov):g}, {np.nanmax(cov):g}] "
                             "(pass coverage(masks), not coverage classes)")
        counts = np.bincount(coverage_class(cov), minlength=N_CLASSES)  # (11,)
        parts.append((name, counts))
    fig = _figure(9, 4.5)
    ax = fig.subplots()
    width = 0.4
    x = np.arange(N_CLASSES)
    for k, (name, counts) in enumerate(parts):
        total = counts.sum()
        share = 100 * counts / max(total, 1)
        ax.bar(x + (k - 0.5) * width, share, width, color=f"C{k}",
               label=f"{name} ({total} images)")
    ax.set_xticks(x, CLASS_LABELS, fontsize=8)
    ax.set_xlabel("coverage class (ceil(10 x salt fraction))")
    ax.set_ylabel("share of the part's images (%)")
    ax.set_title("Salt coverage classes")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, out_png)
