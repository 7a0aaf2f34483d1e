"""Prediction: a trained model's salt masks for a set of images, as a Kaggle submission or scored.

    from tinyunet.prediction import predict
    result = predict("runs/x/best.npz", data="tgs-salt-identification-challenge.zip")  # -> Prediction

Steps: load the checkpoint (:func:`tinyunet.models.load_model`; its metadata says how to build the
model and fit images to it), read the test images (Kaggle's layout, a folder or the competition zip;
any image size), predict the salt probability in batches (NumPy, or CuPy with ``gpu``), bring it back
to each image's size, threshold it (the checkpoint's best threshold unless ``threshold``), and write
``submission.csv`` (``id,rle_mask``; one row per test image; an empty string for no salt)
atomically, so a failure never leaves half a submission over an old one.

With ``evaluate`` the *train* part of the data (images with masks) is predicted instead and scored:
the competition score, IoU, pixel accuracy and the score per coverage class are printed and the
threshold-vs-score plot is saved next to ``out``; no submission is written (a submission of
training images would be of no use, and would replace a real one).

Every mistake a user can make (no model, a bad checkpoint or data folder, ``gpu`` without a GPU, a
setting out of range, an output folder that cannot be written) raises one of :data:`USER_ERRORS`
with a one-line message, before the slow part where it can be known then.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyunet.backend import GPUUnavailableError, as_numpy
from tinyunet.checkpoint import CheckpointError
from tinyunet.data import DataError, fingerprint, load_test, load_train
from tinyunet.ensemble import Ensemble
from tinyunet.evaluation import Report, evaluate as score_report
from tinyunet.files import atomic_write, make_writable_folder, remove_stale_temporaries
from tinyunet.metrics import drop_small
from tinyunet.models import load_model
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import binarize, probabilities
from tinyunet.rle import rle_encode
from tinyunet.runs import RunError, latest_model

DEFAULT_THRESHOLD = 0.5  # used (with a note) when the checkpoint records no best threshold


class PredictError(ValueError):
    """A problem with the arguments or the output files; the message is one line saying what to do."""


# The errors a user can cause: reported as one line, without a traceback (unless --debug).
USER_ERRORS = (PredictError, RunError, CheckpointError, DataError, GPUUnavailableError)


@dataclass
class Prediction:
    """What :func:`predict` did."""

    ids: list[str]  # the predicted images' ids, in file-name order
    probs: np.ndarray  # (N, H, W) salt probabilities at the original image size (NumPy)
    masks: np.ndarray  # (N, H, W) bool: probs > threshold
    threshold: float
    threshold_source: str  # "--threshold", "from the checkpoint" or "default"
    seconds: float  # time spent predicting (network and resizing, data loading excluded)
    images_per_s: float
    submission: Path | None  # the CSV written (None with evaluate)
    preview: Path | None  # the preview grid PNG
    masks_dir: Path | None  # where the mask PNGs went (--save-masks)
    threshold_plot: Path | None = None  # score vs threshold PNG (evaluate only)
    report: Report | None = None  # the scores (evaluate only)


# ------------------------------------------------------------------------------------------------
# The threshold
# ------------------------------------------------------------------------------------------------

def choose_threshold(threshold: float | None, meta: dict) -> tuple[float, str]:
    """The threshold to use and where it came from: ``threshold``, else the checkpoint's best, else 0.5."""
    if threshold is not None:
        return float(threshold), "--threshold"
    best = meta.get("best_threshold")
    if best is None:
        return DEFAULT_THRESHOLD, "default"
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not 0 <= best <= 1:
        raise CheckpointError(f"the checkpoint records best_threshold={best!r}, not a number in "
                              "[0, 1]: pass --threshold")
    return float(best), "from the checkpoint"


# ------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------

def _writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and check a file can be created in it, else raise PredictError."""
    try:
        make_writable_folder(folder)
    except NotADirectoryError as err:
        raise PredictError(f"cannot write {what} in {folder}: {err.strerror}; choose another location") from None
    except OSError as err:
        raise PredictError(f"cannot write {what} in the folder {folder} "
                           f"({err.strerror or err}): choose another location") from None


def _check_file_target(path: Path, what: str) -> None:
    """``path`` can be written as a file: it is not a folder and its folder is writable."""
    if path.is_dir():
        raise PredictError(f"{what} {path} is a folder: give a file name inside it")
    _writable_folder(path.parent, what)


def _refuse_inputs(targets: list[tuple[str, Path]], model_path: Path, data, ids: list[str]) -> None:
    """PredictError when an output (``(flag, path)`` pairs) would overwrite the model just loaded, the
    data file given, or an input image (a file named after an image id inside the data folder)."""
    model_file, data_path = model_path.resolve(), Path(data).resolve()
    stems = set(ids)
    for flag, target in targets:
        if not os.path.lexists(target):
            continue
        where = target.resolve()
        if where == model_file:
            raise PredictError(f"{flag} {target} is the model being used ({model_path}): predict.py never writes "
                               f"over its inputs; choose another {flag}")
        if where == data_path or (where.is_relative_to(data_path) and where.stem in stems):
            raise PredictError(f"{flag} {target} is an input file of {data}: predict.py never writes over its "
                               f"inputs; choose another {flag}")


def _remove_temporaries(folders: list[Path], log: Callable[[str], None]) -> None:
    """Delete the half-written files a killed predict.py left in the output folders, and say so."""
    for folder in dict.fromkeys(folders):
        stale = remove_stale_temporaries(folder)
        if stale:
            log(f"removed {len(stale)} half-written temporary file(s) a killed run left in {folder}: "
                + ", ".join(p.name for p in stale))


def write_submission(path: str | os.PathLike, ids: list[str], masks: np.ndarray) -> Path:
    """Write ``id,rle_mask`` rows for (N, H, W) boolean ``masks`` atomically; return the path.

    The rows go through :func:`tinyunet.files.atomic_write`: an old submission is replaced whole or left as it was, never half-written.
    """
    path = Path(path)
    if len(ids) != len(masks):
        raise ValueError(f"write_submission got {len(ids)} ids for {len(masks)} masks")
    try:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("id", "rle_mask"))
            writer.writerows((image_id, rle_encode(mask)) for image_id, mask in zip(ids, masks))
    except OSError as err:
        raise PredictError(f"cannot write the submission {path} ({err.strerror or err}); any "
                           "earlier file there is left as it was") from None
    return path


def write_masks(folder: str | os.PathLike, ids: list[str], masks: np.ndarray) -> Path:
    """Save each (H, W) mask as ``folder/<id>.png``, 8-bit, 0 (no salt) / 255 (salt)."""
    from PIL import Image

    folder = Path(folder)
    for image_id, mask in zip(ids, masks):  # ids are plain file names: load_test checked them
        target = folder / f"{image_id}.png"
        try:
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(target)
        except OSError as err:
            raise PredictError(f"cannot write the mask {target} ({err.strerror or err}): "
                               "choose another --save-masks folder") from None
    return folder


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

def predict(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike = "submission.csv",
    gpu: bool = False,
    threads: int | None = None,
    batch_size: int = 32,
    tta: bool | None = None,
    threshold: float | None = None,
    save_masks: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
    evaluate: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Prediction:
    """Predict the test images of ``data`` with the checkpoint ``model`` and write the submission.

    ``model`` defaults to ``runs/<runs/latest>/best.npz``, ``data`` to the data folder recorded in
    the checkpoint. ``threshold`` defaults to the checkpoint's best threshold (0.5 when it has
    none), ``tta`` to the checkpoint's choice (off when it records none); the checkpoint's empty-mask
    rule (``min_area``) always applies. A checkpoint may hold an ensemble (:mod:`tinyunet.ensemble`).
    ``threads`` CPU threads share every batch (default: every usable core). ``preview``
    defaults to ``<out stem>_preview.png`` beside ``out``. With ``evaluate`` the labelled train part
    of ``data`` is predicted and scored instead, the threshold-vs-score plot goes to
    ``<out stem>_threshold.png`` and no submission is written. Every input is checked before the
    slow work starts; problems raise one of :data:`USER_ERRORS` with a one-line message.
    """
    # --- the arguments, before anything slow ---------------------------------------------------
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PredictError(f"--threads must be a whole number >= 1, got {threads}")
    if threshold is not None and not 0 <= threshold <= 1:  # NaN fails this too
        raise PredictError(f"--threshold must be in [0, 1], got {threshold}")

    # --- the model ---------------------------------------------------------------------------------
    model_path = Path(model) if model is not None else latest_model()
    unet, ckpt = load_model(model_path, gpu=gpu)
    if isinstance(unet, Ensemble):  # every batch split between the CPU's threads, member by member
        net = Ensemble([DataParallel(member, threads) for member in unet.members])
    else:
        net = DataParallel(unet, threads)
    meta = ckpt.meta
    threshold, source = choose_threshold(threshold, meta)
    tta = bool(meta.get("tta", False)) if tta is None else tta
    min_area = meta.get("min_area", 0)
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 0:
        raise CheckpointError(f"{model_path} records min_area={min_area!r}, not a whole number >= 0; "
                              "the file is damaged or was edited: use another checkpoint or train again")

    # --- the output locations, checked before the slow part ------------------------------------------
    out = Path(out)
    preview = Path(preview) if preview is not None else out.with_name(f"{out.stem}_preview.png")
    plot_path = out.with_name(f"{out.stem}_threshold.png") if evaluate else None
    _check_file_target(out, "the output" if evaluate else "the submission")
    _check_file_target(preview, "the preview")
    if save_masks is not None:
        save_masks = Path(save_masks)
        if save_masks.exists() and not save_masks.is_dir():
            raise PredictError(f"--save-masks {save_masks} is a file, not a folder: give a folder")
        _writable_folder(save_masks, "the mask PNGs")

    members = f", an ensemble of {len(net.members)}" if isinstance(net, Ensemble) else ""
    log(f"model: {model_path} (features={net.config['features']}, depth={net.config['depth']}{members}, "
        f"{meta.get('fit')} to {meta.get('input_size')}, epoch {meta.get('epoch', '?')}, "
        f"{'GPU (CuPy)' if gpu else f'CPU (NumPy), {net.threads} thread(s)'})")
    if source == "default":
        log(f"note: the checkpoint records no best threshold; using {DEFAULT_THRESHOLD} "
            "(pass --threshold to choose)")

    # --- the data ----------------------------------------------------------------------------------
    if data is None:
        recorded = meta.get("data")
        recorded = recorded.get("path") if isinstance(recorded, dict) else None
        if not isinstance(recorded, str) or not recorded:
            raise PredictError(f"{model_path} does not record which data it was trained on: "
                               "pass --data")
        if not Path(recorded).exists():
            raise PredictError(f"the data recorded in the checkpoint, {recorded}, does not exist "
                               "(moved or deleted?): pass --data")
        data = recorded
    truths = None
    if evaluate:
        labelled = load_train(data)
        ids, images, truths = labelled.ids, labelled.images, labelled.masks > 0.5
        trained_on = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        if trained_on.get("fingerprint") == fingerprint(ids, images, labelled.masks):
            log("note: these are the images the model was trained on (training and validation "
                "parts): the scores below are optimistic")
        del labelled
    else:
        ids, images = load_test(data)
    n, h, w = images.shape
    log(f"data: {data}: {n} {'labelled ' if evaluate else 'test '}images of {w}x{h}")

    targets = [("--out", out), ("--preview", preview)] + ([("--out", plot_path)] if plot_path else [])
    if save_masks is not None:
        targets += [("--save-masks", save_masks / f"{image_id}.png") for image_id in ids]
    _refuse_inputs(targets, model_path, data, ids)
    _remove_temporaries([out.parent, preview.parent] + ([save_masks] if save_masks is not None else []), log)

    # --- the network ---------------------------------------------------------------------------
    from tqdm import tqdm

    with tqdm(total=n, desc="predicting", unit="img", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        start = time.perf_counter()
        probs = probabilities(net, images, meta["fit"], meta.get("input_size", 0),
                              batch_size=batch_size, tta=tta, progress=bar.update)
        probs = as_numpy(probs)  # (N, H, W); also waits for the GPU to finish
        seconds = time.perf_counter() - start
    masks = drop_small(binarize(probs, threshold), min_area)  # (N, H, W) bool

    # --- the outputs -----------------------------------------------------------------------------
    from tinyunet import plots

    result = Prediction(ids=ids, probs=probs, masks=masks, threshold=threshold,
                        threshold_source=source, seconds=seconds,
                        images_per_s=n / max(seconds, 1e-9), submission=None, preview=None,
                        masks_dir=None)
    if evaluate:
        result.report = score_report(truths, probs, threshold, threshold_source=source, min_area=min_area)
        log(result.report.format())
        result.threshold_plot = plots.threshold_curve(result.report.thresholds,
                                                      result.report.scores,
                                                      result.report.best_threshold, plot_path)
        log(f"saved the threshold-vs-score plot to {plot_path}")
        log("no submission written (--evaluate scores the labelled train part)")
    else:
        result.submission = write_submission(out, ids, masks)
        log(f"wrote {out}: {n} rows, {int(masks.any(axis=(1, 2)).sum())} with salt, threshold "
            f"{threshold:.3f} ({source})")
    if save_masks is not None:
        result.masks_dir = write_masks(save_masks, ids, masks)
        log(f"saved {n} mask PNGs to {save_masks}")
    result.preview = plots.prediction_grid(images, probs, masks, preview, truths=truths, ids=ids)
    log(f"saved the preview to {preview}")
    device = "GPU" if gpu else f"CPU, {net.threads} thread(s)"
    log(f"speed: {n} images in {seconds:.2f} s = {result.images_per_s:.1f} images/s "
        f"({device}, batch {batch_size}, tta {'on' if tta else 'off'})")
    return result
