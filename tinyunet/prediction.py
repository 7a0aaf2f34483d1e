"""Prediction: a trained model's salt masks for a set of images, as a Kaggle submission or scored.

    from tinyunet.prediction import predict
    result = predict("runs/x/best.npz", data="tgs-salt-identification-challenge.zip")  # -> Prediction

Steps: load the checkpoint (:func:`tinyunet.models.load_model`; its metadata says how to build the
model and fit images to it; each BatchNorm is folded into the conv before it, :mod:`tinyunet.fold`),
read the test images (Kaggle's layout, a folder or the competition zip;
any image size; :data:`CHUNK` at a time, each chunk predicted and written before the next is read,
so memory is bounded by the chunk), predict the salt probability in batches (NumPy, or CuPy with
``gpu``), bring it back to each image's size, threshold it (the checkpoint's best threshold unless
``threshold``), and write ``submission.csv`` (``id,rle_mask``; one row per test image; an empty
string for no salt) atomically, so a failure never leaves half a submission over an old one.

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
import shutil
from contextlib import ExitStack, contextmanager
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyunet.backend import GPUUnavailableError, as_numpy
from tinyunet.checkpoint import CheckpointError
from tinyunet.config import config_from_args
from tinyunet.data import DataError, ImageFiles, coverage, fingerprint, load_train, tgs_like
from tinyunet.ensemble import Ensemble
from tinyunet.evaluation import Report, evaluate as score_report
from tinyunet.files import atomic_write, make_writable_folder
from tinyunet.metrics import drop_small
from tinyunet.models import for_inference, load_model
from tinyunet.pipeline import TILE, binarize, probabilities
from tinyunet.rle import rle_encode
from tinyunet.prepare import load_split
from tinyunet.runs import RunError, latest_model, new_run_folder
from tinyunet.transforms import as_stack, canvas, channels, for_display, take, to_channels

CHUNK = 512  # images read, predicted and written at a time: memory is bounded by this, not by the set

DEFAULT_THRESHOLD = 0.5  # used (with a note) when the checkpoint records no best threshold


class PredictError(ValueError):
    """A problem with the arguments or the output files; the message is one line saying what to do."""


# The errors a user can cause: reported as one line, without a traceback (unless --debug).
USER_ERRORS = (PredictError, RunError, CheckpointError, DataError, GPUUnavailableError)


@dataclass
class Prediction:
    """What :func:`predict` did."""

    ids: list[str]  # the predicted images' ids, in file-name order
    probs: np.ndarray | None  # (N, H, W) salt probabilities at the original image size (NumPy); None unless keep
    masks: np.ndarray | None  # (N, H, W) bool: probs > threshold; None unless keep
    threshold: float
    threshold_source: str  # "--threshold", "from the checkpoint" or "default"
    seconds: float  # time spent predicting (network and resizing, data loading excluded)
    images_per_s: float
    submission: Path | None  # the CSV written (None with evaluate)
    preview: Path | None  # the preview grid PNG
    masks_dir: Path | None  # where the mask PNGs went (--save-masks)
    threshold_plot: Path | None = None  # score vs threshold PNG (evaluate only)
    report: Report | None = None  # the scores (evaluate only)
    folder: Path | None = None  # where every output went


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


@contextmanager
def submission_rows(path: Path):
    """A function ``add(ids, masks)`` that appends ``id,rle_mask`` rows to the submission ``path``,
    written atomically when the block ends (:func:`tinyunet.files.atomic_write`): an old submission is
    replaced whole or left as it was, never half-written."""
    try:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("id", "rle_mask"))
            yield lambda ids, masks: writer.writerows((i, rle_encode(m)) for i, m in zip(ids, masks))
    except OSError as err:
        raise PredictError(f"cannot write the submission {path} ({err.strerror or err}); any "
                           "earlier file there is left as it was") from None


def write_submission(path: str | os.PathLike, ids: list[str], masks: np.ndarray) -> Path:
    """Write ``id,rle_mask`` rows for (N, H, W) boolean ``masks`` atomically (:func:`submission_rows`);
    return the path."""
    path = Path(path)
    if len(ids) != len(masks):
        raise ValueError(f"write_submission got {len(ids)} ids for {len(masks)} masks")
    with submission_rows(path) as add:
        add(ids, masks)
    return path


def write_masks(folder: str | os.PathLike, ids: list[str], masks) -> Path:
    """Save each (H, W) mask, at its image's size, as ``folder/<id>.png``, 8-bit, 0 (background) / 255."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, mask in zip(ids, masks):  # ids are plain file names: the readers checked them
        target = folder / f"{image_id}.png"
        try:
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(target)
        except OSError as err:
            raise PredictError(f"cannot write the mask {target} ({err.strerror or err}): "
                               "choose another --save-masks folder") from None
    return folder


def write_overlays(folder: Path, ids: list[str], images, masks) -> Path:
    """Save each image as ``folder/<id>.png`` (RGB) with its predicted mask's outline drawn in red."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for image_id, image, mask in zip(ids, images, masks):
        picture = for_display(image)  # (H, W) gray or (H, W, 3)
        rgb = np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture  # (H, W, 3)
        inner = np.pad(mask, 1, mode="edge")
        inner = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:] & mask
        pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
        pixels[mask & ~inner] = (255, 0, 0)  # the outline: mask pixels with a background neighbour
        target = folder / f"{image_id}.png"
        try:
            Image.fromarray(pixels, mode="RGB").save(target)
        except OSError as err:
            raise PredictError(f"cannot write the overlay {target} ({err.strerror or err}): "
                               "choose another --out") from None
    return folder


class Loaded:
    """Images already in memory (a labelled set to score), read like :class:`tinyunet.data.ImageFiles`."""

    def __init__(self, ids: list[str], images):
        self.ids, self.images = ids, images

    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(image.shape[:2]) for image in self.images]

    def read(self, indices):
        return take(self.images, np.asarray(list(indices), dtype=np.int64))

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc) -> None:
        pass


def output_folder(out: str | os.PathLike | None, model_path: Path) -> Path:
    """The folder this command writes into, created: ``out``, which must be new or empty (one command never
    overwrites another's files), or a new ``predictions/<YYYYmmdd-HHMMSS>`` beside the model."""
    if out is None:
        try:
            return new_run_folder(model_path.parent / "predictions")
        except OSError as err:
            raise PredictError(f"cannot create a predictions folder beside {model_path} ({err.strerror or err}): "
                               "pass --out") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out} is a file: give a folder (new or empty) for the predictions")
    if out.is_dir() and any(out.iterdir()):
        raise PredictError(f"--out {out} already holds files (another command's outputs?): choose a new or "
                           "empty folder, or leave --out out for a new one beside the model")
    _writable_folder(out, "the predictions")
    return out


@contextmanager
def removed_if_empty_on_failure():
    """A list for the folders a command creates; when the block fails, those holding no file are removed
    (with their empty subfolders), so a failed command leaves no empty folder behind."""
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        for folder in created:
            if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

def _geometry(meta: dict, depth: int) -> str:
    """How images meet the network, in words: 'resize to 128', 'pad to a multiple of 16'."""
    if meta.get("fit") == "pad":
        return f"pad to a multiple of {2 ** depth}"
    return f"resize to {meta.get('input_size')}"


def predict(
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | list | None = None,
    out: str | os.PathLike | None = None,
    gpu: bool = False,
    threads: int | None = None,
    batch_size: int = 32,
    tta: bool | None = None,
    threshold: float | None = None,
    save_masks: bool = False,
    overlays: bool = False,
    kaggle_csv: bool | None = None,
    evaluate: bool | str = False,
    tile: int = TILE,
    keep: bool = True,
    chunk: int = CHUNK,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Prediction:
    """Predict the images of ``data`` with the checkpoint ``model``; write the outputs into one folder.

    ``model`` defaults to ``runs/<runs/latest>/best.npz``; ``data`` (a folder or zip, an image file, or a
    list of them) to the data folder recorded in the checkpoint, whose test part is predicted. ``out`` is
    the folder for every output (new or empty; default: a new ``predictions/<stamp>`` beside the model).
    ``threshold`` defaults to the checkpoint's best threshold (0.5 when it has none), ``tta`` to the
    checkpoint's choice; its empty-mask rule (``min_area``) always applies. Images are converted to the
    model's channels (gray <-> RGB) or refused. Outputs: ``preview.png``; ``submission.csv`` (Kaggle's
    ``id,rle_mask``) with ``kaggle_csv``, by default only for TGS-like images (101 x 101 gray);
    ``masks/<id>.png`` at each image's size with ``save_masks``; ``overlays/<id>.png`` with ``overlays``.
    With ``evaluate`` (True or "all": every labelled image of ``data``; "val": exactly the validation
    part of the model's own training split) the images are scored instead: Dice, IoU, the competition
    score, ``scores.csv`` per image and ``threshold.png``. Images are read, predicted and written
    ``chunk`` at a time, so memory is bounded by the chunk; the result holds every probability map and
    mask only with ``keep`` (always with ``evaluate``, whose sweep needs them). Problems raise one of
    :data:`USER_ERRORS` with a one-line message, before the slow work where they can be known then.
    """
    # --- the arguments, before anything slow ---------------------------------------------------
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PredictError(f"--threads must be a whole number >= 1, got {threads}")
    if threshold is not None and not 0 <= threshold <= 1:  # NaN fails this too
        raise PredictError(f"--threshold must be in [0, 1], got {threshold}")
    evaluate = "all" if evaluate is True else evaluate
    if evaluate not in (False, "all", "val"):
        raise PredictError(f"--evaluate takes 'all' or 'val', got {evaluate!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16:
        raise PredictError(f"--tile must be a whole number >= 16, got {tile}")

    # --- the model ---------------------------------------------------------------------------------
    model_path = Path(model) if model is not None else latest_model()
    unet, ckpt = load_model(model_path, gpu=gpu)
    net = for_inference(unet, threads)  # BatchNorm folded; every batch split between the CPU's threads
    meta = ckpt.meta
    threshold, source = choose_threshold(threshold, meta)
    tta = bool(meta.get("tta", False)) if tta is None else tta
    min_area = meta.get("min_area", 0)
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 0:
        raise CheckpointError(f"{model_path} records min_area={min_area!r}, not a whole number >= 0; "
                              "the file is damaged or was edited: use another checkpoint or train again")
    settings = config_from_args(meta["args"], model_path) if isinstance(meta.get("args"), dict) else None
    if evaluate == "val" and settings is None:
        raise PredictError(f"{model_path} records no training settings (meta 'args'), so its split cannot be "
                           "rebuilt: use --evaluate all")

    if isinstance(net, Ensemble):  # its members' epochs, where the file records them
        epochs = [str(e) for e in meta.get("member_epochs") or [] if e is not None]
        trained = f"an ensemble of {len(net.members)}" + (f" (epochs {', '.join(epochs)})" if epochs else "")
    else:
        trained = f"epoch {meta.get('epoch', '?')}"
    log(f"model: {model_path} (features={net.config['features']}, depth={net.config['depth']}, "
        f"{net.config.get('in_channels', 1)} channel(s), {_geometry(meta, net.config['depth'])}, {trained}, "
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
    sources = [Path(d) for d in data] if isinstance(data, (list, tuple)) else [Path(data)]
    if evaluate and len(sources) != 1:
        raise PredictError("--evaluate scores one labelled data folder or zip: give a single --data")
    trained_on = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    truths = None
    if evaluate == "val":
        split = load_split(settings, sources[0])
        if split.fingerprint != trained_on.get("fingerprint"):
            raise PredictError(f"the data at {sources[0]} (fingerprint {split.fingerprint}) is not the data "
                               f"{model_path} was trained on: pass that data with --data")
        files = Loaded([split.ids[i] for i in split.val_idx], take(split.images, split.val_idx))
        truths = take(split.masks, split.val_idx)
        del split
    elif evaluate:
        labelled = load_train(sources[0], settings.mask_suffix if settings else "",
                              settings.mask_threshold if settings else None)
        files, truths = Loaded(labelled.ids, labelled.images), labelled.masks
        if trained_on.get("fingerprint") == fingerprint(labelled.ids, labelled.images, labelled.masks):
            log("note: these are the images the model was trained on (training and validation "
                "parts): the scores below are optimistic; --evaluate val scores the validation part alone")
        del labelled
    else:
        files = ImageFiles(sources)
    with files, removed_if_empty_on_failure() as created:  # a zip stays open while its images are read
        ids, sizes = files.ids, files.sizes()
        want = net.config.get("in_channels", 1)
        n = len(ids)
        tgs = tgs_like(sizes, want)  # once converted to the model's channels
        what = "salt" if tgs else "mask"
        shapes = sorted(set(sizes))
        size = f"{shapes[0][1]}x{shapes[0][0]}" if len(shapes) == 1 else f"{len(shapes)} sizes"
        part = {"val": "validation images of the model's split", "all": "labelled images"}.get(evaluate, "images")
        log(f"data: {', '.join(map(str, sources[:3]))}{' ...' if len(sources) > 3 else ''}: {n} {part} of {size}")
        kaggle_csv = (tgs and not evaluate) if kaggle_csv is None else kaggle_csv
        keep = keep or bool(evaluate)  # the report sweeps thresholds over every probability map
        converted = []

        def read(indices):  # the images at indices, in the model's channels
            images = files.read(indices)
            if channels(images) == want:
                return images
            try:
                images = to_channels(images, want)
            except ValueError as err:
                raise PredictError(f"cannot predict {', '.join(map(str, sources[:3]))} with {model_path}: "
                               f"{err}") from None
            if not converted:  # said once, at the first chunk
                log(f"note: the images converted to the model's {want} channel(s) (gray <-> RGB)")
                converted.append(True)
            return images

        def predict_images(images, progress=None):  # -> probabilities (NumPy) and masks, one per image
            probs = probabilities(net, images, meta["fit"], meta.get("input_size", 0), batch_size=batch_size,
                                  tta=tta, progress=progress, tile=tile)
            probs = [as_numpy(p) for p in probs]  # waits for the GPU
            return probs, [drop_small(binarize(p[None], threshold), min_area)[0] for p in probs]

        # --- the output folder, created before the slow part ----------------------------------------------
        target = Path(out) if out is not None else model_path.parent / "predictions"
        missing = [path for path in (target, *target.parents) if not path.exists()]  # created below
        folder = output_folder(out, model_path)
        created += ([folder] if out is None else []) + missing[-1:]  # a stamped folder is always new

        # --- the network and the outputs, chunk by chunk ---------------------------------------------------
        from tqdm import tqdm

        from tinyunet import plots

        step = max(chunk // batch_size, 1) * batch_size
        seconds, with_fg, cover = 0.0, 0, np.zeros(n)  # cover: each predicted mask's coverage, for the preview
        kept_probs, kept_masks = [], []
        with ExitStack() as stack:
            add_rows = stack.enter_context(submission_rows(folder / "submission.csv")) if kaggle_csv else None
            bar = stack.enter_context(tqdm(total=n, desc="predicting", unit="img", file=sys.stderr,
                                           dynamic_ncols=True, disable=None if progress else True))  # None: if a pipe
            for begin in range(0, n, step):
                index = range(begin, min(begin + step, n))
                chunk_ids, images = ids[begin:index.stop], read(index)
                start = time.perf_counter()
                probs, masks = predict_images(images, bar.update)
                seconds += time.perf_counter() - start
                cover[begin:index.stop] = [m.mean() for m in masks]
                with_fg += sum(bool(m.any()) for m in masks)
                if add_rows is not None:
                    add_rows(chunk_ids, masks)
                if save_masks:
                    write_masks(folder / "masks", chunk_ids, masks)
                if overlays:
                    write_overlays(folder / "overlays", chunk_ids, images, masks)
                if keep:
                    kept_probs += probs
                    kept_masks += masks
                del images, probs, masks

        result = Prediction(ids=ids, probs=as_stack(kept_probs) if keep else None,
                            masks=as_stack(kept_masks) if keep else None, threshold=threshold,
                            threshold_source=source, seconds=seconds, images_per_s=n / max(seconds, 1e-9),
                            submission=None, preview=None, masks_dir=None, folder=folder)
        if evaluate:
            result.report = score_report(truths, result.probs, threshold, threshold_source=source,
                                         min_area=min_area)
            log(result.report.format(what))
            result.threshold_plot = plots.threshold_curve(result.report.thresholds, result.report.scores,
                                                          result.report.best_threshold, folder / "threshold.png")
            with atomic_write(folder / "scores.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(("id", "dice", "iou", "competition_score"))
                report = result.report
                writer.writerows((i, f"{d:.6f}", f"{u:.6f}", f"{c:.6f}") for i, d, u, c in
                                 zip(ids, report.image_dice, report.image_iou, report.image_scores))
            log(f"saved the per-image scores to {folder / 'scores.csv'} and the threshold plot to "
                f"{folder / 'threshold.png'}")
        if kaggle_csv:
            result.submission = folder / "submission.csv"
            log(f"wrote {result.submission}: {n} rows, {with_fg} with {what}, threshold {threshold:.3f} "
                f"({source})")
        if save_masks:
            result.masks_dir = folder / "masks"
            log(f"saved {n} full-size mask PNGs to {result.masks_dir}")
        if overlays:
            log(f"saved {n} overlays (the mask's outline in red) to {folder / 'overlays'}")

        # --- the preview: a few images spread over the coverage (of the truth, else of the prediction), again --
        picks = plots.spread_picks(cover if truths is None else coverage(truths), min(plots.PREVIEW_COLUMNS, n))
        images = read(picks)
        probs, masks = predict_images(images)
        truth_canvas = None if truths is None else canvas(take(truths, picks)) > 0.5
        result.preview = plots.prediction_grid(canvas(images), canvas(as_stack(probs)), canvas(as_stack(masks)),
                                               folder / "preview.png", truths=truth_canvas,
                                               ids=[ids[i] for i in picks])
        log(f"saved the preview to {result.preview}")
        device = "GPU" if gpu else f"CPU, {net.threads} thread(s)"
        log(f"speed: {n} images in {seconds:.2f} s = {result.images_per_s:.1f} images/s "
            f"({device}, batch {batch_size}, tta {'on' if tta else 'off'})")
        return result
