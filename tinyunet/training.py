"""The training loop behind ``train.py``: the seed recipe, from the data folder to a run folder.

    config = build_config({"epochs": 10})   # the flags given; the rest from the defaults below
    run = train(config)                      # -> Path of the run folder

One epoch, as the recipe has it::

    shuffle the (flip-doubled) training part with rng([seed, epoch]); reseed dropout with (seed, epoch)
    for each minibatch:  logits = model.forward(x, train=True)          dropout on
                         loss, dlogits = binary_crossentropy(logits, y)
                         model.backward(dlogits); adam.step(model.grads)
    validation: loss and pixel accuracy at the network's size, the competition score at threshold 0.5
                on the probabilities brought back to the images' own size
    callbacks, in Keras's order: EarlyStopping, ModelCheckpoint (best.npz), ReduceLROnPlateau
    last.npz (everything --resume needs), history.csv

After the last epoch (or an early stop) the weights of best.npz predict the validation set, 50
thresholds are swept with the competition metric, and the best one goes into best.npz's metadata,
which is what predict.py uses. Then the plots and a summary.

The run folder::

    runs/<name>/  best.npz  last.npz  history.csv
                  learning_curves.png  threshold_sweep.png  val_predictions.png  coverage.png
    runs/latest   the newest run folder's path relative to runs/, written when a run starts (a run
                  folder outside runs/ gets the file in its own parent folder)

Exact resume: every random draw is a function of (seed, epoch): the initial weights of the seed, the
shuffle of ``np.random.default_rng([seed, epoch])`` and the dropout masks of
``model.reseed_dropout((seed, epoch))``. last.npz holds the weights, Adam's moments and step, the
callbacks' counters and the history, so 2 epochs + ``--resume`` 2 more give, on the CPU, bit for bit
the weights of 4 epochs straight (with the same ``threads``). On a GPU only on the same GPU model: CuPy's
generator stream (the dropout masks) depends on the device's multiprocessor count.

On the CPU every batch is split between ``threads`` threads, each running the whole network on its
share (:class:`tinyunet.parallel.DataParallel`); the functions below take either a UNet or that.

The data arrays go to the model's device once, before the first epoch; batches are gathered there, so
no step copies between host and device. Numbers reach the host only at a sync (every step on the
CPU, where it is free; every ``GPU_SYNC_EVERY`` steps on a GPU), where the losses since the last sync
are checked: a NaN or infinite loss stops training at once, naming the epoch and the batch.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinyunet.backend import as_array, as_numpy
from tinyunet.blocks import BLOCKS
from tinyunet.callbacks import CosineAnnealing, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from tinyunet.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint,
                                 temporary_path)
from tinyunet.data import (DataError, augment_hflip, check_finite, coverage, coverage_class, fingerprint, load_train,
                           minibatches, stratified_folds, stratified_split)
from tinyunet.ensemble import save_ensemble
from tinyunet.layers import sigmoid
from tinyunet.losses import LOSSES, get_loss, pixel_accuracy
from tinyunet.metrics import best_postprocessing, best_threshold, competition_score, drop_small, threshold_sweep
from tinyunet.models import load_into
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import FITS, from_network, probabilities, to_network
from tinyunet.unet import UNet, default_dropout

# --------------------------------------------------------------------------------------------
# Every default in one place
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every training setting, with the seed recipe's values as defaults."""

    data: str | None = None  # folder or zip in Kaggle's layout; None: ./data/... or the synthetic set
    gpu: bool = False  # train on CuPy
    threads: int | None = None  # CPU threads sharing every batch (tinyunet.parallel); None: every usable core
    epochs: int = 40  # total epochs (a resumed run counts the ones already done)
    batch_size: int = 8
    features: int = 8  # filters at the top level, doubled per level down
    depth: int = 4  # levels down (and up)
    dropout: tuple[float, ...] | None = None  # per level; None: the recipe's, cut (or extended with its last) to depth
    block: str = "double"  # each level's two convs: "double" (the seed), "double_bn", "residual" (tinyunet.blocks)
    loss: str = "bce"  # the training loss, by name (tinyunet.losses.LOSSES)
    loss2: str | None = None  # a second loss from epoch loss2_epoch on (e.g. BCE first, then "lovasz")
    loss2_epoch: int = 0  # the first epoch (counting from 1) trained with loss2
    monitor: str = "val_loss"  # what early stopping, the best checkpoint and the LR cut watch: or "val_score"
    lr: float = 1e-3  # Adam's learning rate
    val_split: float = 0.2  # validation share, stratified by coverage class (unless fold is set)
    folds: int = 1  # > 1: k-fold cross-validation, one run per fold (tinyunet.folds)
    fold: int | None = None  # with folds > 1: this run validates on fold `fold` (0 .. folds-1) of the k-fold split
    seed: int = 0  # weights, split, shuffles, dropout: all drawn from it
    out: str | None = None  # run folder; None: runs/<YYYYmmdd-HHMMSS>
    resume: str | None = None  # a run folder (or its last.npz) to continue
    fit: str = "resize"  # how images meet the network: "resize" to input_size, or reflect-"pad"
    input_size: int = 128  # network input side with fit="resize"; a multiple of 2**depth
    patience: int = 7  # EarlyStopping on val_loss
    lr_patience: int = 5  # ReduceLROnPlateau on val_loss
    lr_factor: float = 0.1
    min_lr: float = 1e-5
    schedule: str = "plateau"  # "plateau": x lr_factor after lr_patience flat epochs; "cosine": warm restarts
    cycle: int = 10  # epochs per cosine cycle; the end of each saves snapshot<k>.npz, an ensemble member
    flip: bool = True  # left-right mirrors of the training images, as flip_mode says
    flip_mode: str = "double"  # "double": every mirror appended (the seed); "random": each image mirrored
    #                            with probability 1/2 in every epoch's batches (half the epoch's cost)
    limit: int | None = None  # use only this many training images (a random subset by seed)
    preset: str = "recipe"  # which defaults apply: "recipe" (the seed's), "best" (BEST over them), or "quick"
    #                         (QUICK, for the built-in synthetic set)
    tta: bool = False  # predict validation (and, recorded in best.npz, test) images also mirrored, averaged
    empty_rule: bool = False  # tune a minimum predicted area on validation; smaller masks become empty
    progress: bool = True  # tqdm bar (it hides itself when the output is not a terminal)
    plots: bool = True  # write the PNGs after training


# The quick run: `python train.py` with no data on the machine trains on the built-in synthetic set with
# these settings over the recipe's (flags override them), sized for under 10 minutes on 2 CPU cores
# (measured: see README, "The quick run"):
# - 64 x 64 input: the smooth synthetic masks survive 101 -> 64 -> 101 (all 4000 score 1.0), and a
#   step costs a third of 128 x 128;
# - 4000 generated images and no flips: synthetic images are free, so fresh ones replace mirror copies;
# - no dropout: over 13 epochs of 3200 fresh images, training and validation loss stay together (0.050
#   and 0.065 at the end), so there is nothing for it to regularise;
# - 13 epochs, the LR cut (x0.1) after 2 flat epochs: late in a run at 1e-3 the validation loss jumps every
#   few epochs, and each epoch at 1e-4 after a cut adds about 0.01-0.04. Single runs of 12 epochs ended at
#   0.79-0.82 depending on when the cut came (the trajectory differs between BLAS thread counts); 14 epochs
#   gave 0.836 but can take over 10 minutes when a 2-core machine is slow.
QUICK: dict[str, Any] = {"epochs": 13, "input_size": 64, "dropout": (0.0, 0.0, 0.0, 0.0), "flip": False,
                         "patience": 5, "lr_patience": 2}

# The best recipe measured on the real TGS data (docs/accuracy.md; python train.py --recipe best --data DIR):
# a residual U-Net with BatchNorm at 16 filters, reflect-padded 101 -> 112 instead of resized, random mirrors
# instead of doubled ones (half the epoch), BCE and then the per-image Lovász hinge, the best checkpoint by
# the competition score, flip TTA and the empty-mask rule tuned on validation.
BEST: dict[str, Any] = {"block": "residual", "features": 16, "fit": "pad", "flip_mode": "random", "loss": "bce",
                        "loss2": "lovasz", "loss2_epoch": 31, "monitor": "val_score", "epochs": 60, "patience": 12,
                        "lr_patience": 6, "tta": True, "empty_rule": True}
PRESETS = ("recipe", "best", "quick")

SYNTHETIC_DIR = Path("data/synthetic")  # generated here (once) when no data is found
SYNTHETIC_SIZE = {"n_train": 4000, "n_test": 200}  # images written into SYNTHETIC_DIR (19-20 s measured on 2 cores)
REAL_DATA = (Path("data/tgs-salt-identification-challenge.zip"), Path("data/tgs-salt"))  # looked for first
RUNS_DIR = Path("runs")  # default parent of the run folders
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_score", "lr", "seconds")
EVAL_BATCH = 32  # images per forward pass when validating
MIN_AREAS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500, 700, 1000)  # empty-mask rule candidates (px)
GPU_SYNC_EVERY = 20  # steps between host syncs on a GPU (progress bar, NaN check)

# Settings that decide the model, the split or the geometry: a resumed run must keep them.
FIXED_ON_RESUME = ("features", "depth", "dropout", "block", "fit", "input_size", "val_split", "seed", "flip",
                   "flip_mode", "limit", "folds", "fold")
FLIP_MODES = ("double", "random")
SCHEDULES = ("plateau", "cosine")
MONITORS = {"val_loss": "min", "val_score": "max"}  # a monitored value and the direction it improves in


class ConfigError(ValueError):
    """A setting has a value training cannot use; the message is one line saying which and why."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch and the last good files."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what was saved and how to resume."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# Building and checking a config
# --------------------------------------------------------------------------------------------

def flag(name: str) -> str:
    """The command-line spelling of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def found_data() -> Path | None:
    """The competition zip or folder under ./data, if one is there."""
    return next((path for path in REAL_DATA if path.exists()), None)


def build_config(given: Mapping[str, Any] | None = None) -> TrainConfig:
    """A config from the settings ``given`` (field name -> value); the others come from the defaults.

    * With ``resume``: the run's own settings (from its last.npz), then the given ones on top.
    * Without ``data``: the competition data under ./data when there, with the recipe's defaults;
      otherwise the built-in synthetic set with :data:`QUICK` over the recipe's defaults.
    """
    given = {key: value for key, value in (given or {}).items() if value is not None}
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    if "dropout" in given:
        given["dropout"] = tuple(given["dropout"])
    if given.get("resume"):
        _, checkpoint = open_resume(given["resume"])
        saved = config_from_args(checkpoint.meta.get("args"), checkpoint.path)
        return replace(saved, **{"out": None, **given})  # the run continues in its own folder
    if given.get("preset") == "best":  # the named recipe, on whatever data
        return replace(TrainConfig(), **{**BEST, **given})
    if given.get("data") is None:
        real = found_data()
        if real is not None:
            given["data"] = str(real)
        else:
            return replace(TrainConfig(), **{**QUICK, "preset": "quick", **given})
    return replace(TrainConfig(), **given)


def config_from_args(args: Any, where: Path) -> TrainConfig:
    """The TrainConfig stored in a checkpoint's ``meta["args"]``."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{where} holds no training settings (meta 'args'); it was not written by "
                              "train.py: start a new run instead of resuming")
    known = {f.name for f in fields(TrainConfig)}
    values = {key: value for key, value in args.items() if key in known}
    if isinstance(values.get("dropout"), list):
        values["dropout"] = tuple(values["dropout"])
    return replace(TrainConfig(), **values)


def dropout_rates(config: TrainConfig) -> tuple[float, ...]:
    """The dropout rate of each level: the config's, or :data:`DROPOUT` fitted to the depth."""
    if config.dropout is not None:
        return tuple(float(rate) for rate in config.dropout)
    return default_dropout(config.depth)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate(config: TrainConfig) -> None:
    """Raise ConfigError (one line, naming the flag) for the first setting training cannot use."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{flag(name)} {getattr(config, name)!r} is invalid: {rule}")

    for name in ("epochs", "batch_size", "features", "depth"):
        need(_is_int(getattr(config, name)) and getattr(config, name) >= 1, name, "it must be a whole number >= 1")
    need(config.depth <= 8, "depth", "it must be at most 8 (the image is halved at every level)")
    for name in ("lr", "val_split", "lr_factor", "min_lr"):
        need(_is_number(getattr(config, name)) and math.isfinite(getattr(config, name)), name, "it must be a number")
    need(config.lr > 0, "lr", "the learning rate must be > 0, e.g. 1e-3")
    need(0 < config.val_split < 1, "val_split", "the validation share must be between 0 and 1, e.g. 0.2")
    for name in ("patience", "lr_patience"):
        need(_is_int(getattr(config, name)) and getattr(config, name) >= 0, name, "it must be a whole number >= 0")
    need(0 < config.lr_factor < 1, "lr_factor", "it must be between 0 and 1, e.g. 0.1")
    need(config.min_lr >= 0, "min_lr", "it must be >= 0")
    need(_is_int(config.seed) and config.seed >= 0, "seed", "it must be a whole number >= 0")
    need(config.fit in FITS, "fit", f"choose one of {', '.join(FITS)}")
    need(_is_int(config.input_size) and config.input_size >= 1, "input_size", "it must be a whole number >= 1")
    step = 2 ** config.depth
    if config.fit == "resize" and config.input_size % step:
        nearest = max(step, step * round(config.input_size / step))
        raise ConfigError(f"--input-size {config.input_size} is invalid: with --depth {config.depth} it must be "
                          f"a multiple of 2**depth = {step}, e.g. {nearest}")
    need(config.limit is None or (_is_int(config.limit) and config.limit >= 2), "limit",
         "it must be a whole number >= 2 (a training and a validation image at least)")
    rates = dropout_rates(config)
    if len(rates) != config.depth or not all(0 <= rate < 1 for rate in rates):
        shown = ",".join(f"{rate:g}" for rate in rates)
        raise ConfigError(f"--dropout {shown} is invalid: give one rate in [0, 1) per level, comma-separated "
                          f"({config.depth} at --depth {config.depth})")
    need(config.preset in PRESETS, "preset", f"choose one of {', '.join(PRESETS)}")
    need(config.block in BLOCKS, "block", f"choose one of {', '.join(BLOCKS)}")
    need(config.loss in LOSSES, "loss", f"choose one of {', '.join(LOSSES)}")
    need(config.loss2 is None or config.loss2 in LOSSES, "loss2", f"choose one of {', '.join(LOSSES)}")
    need(_is_int(config.loss2_epoch) and config.loss2_epoch >= 0, "loss2_epoch", "it must be a whole number >= 0")
    need(config.monitor in MONITORS, "monitor", f"choose one of {', '.join(MONITORS)}")
    need(config.flip_mode in FLIP_MODES, "flip_mode", f"choose one of {', '.join(FLIP_MODES)}")
    need(config.schedule in SCHEDULES, "schedule", f"choose one of {', '.join(SCHEDULES)}")
    need(_is_int(config.cycle) and config.cycle >= 1, "cycle", "it must be a whole number >= 1")
    need(_is_int(config.folds) and 1 <= config.folds <= 20, "folds", "it must be a whole number from 1 (no "
         "cross-validation) to 20")
    need(config.fold is None or (_is_int(config.fold) and 0 <= config.fold < config.folds), "fold",
         f"it must be a fold number from 0 to {config.folds - 1} (with --folds {config.folds})")
    need(config.threads is None or (_is_int(config.threads) and config.threads >= 1), "threads",
         "it must be a whole number >= 1 (or leave it out to use every core)")


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------

def open_resume(path: str | os.PathLike):
    """``(run folder, last.npz Checkpoint)`` of the run to resume; CheckpointError when there is none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such run folder; give a folder written by train.py "
                              f"(it holds last.npz), e.g. {RUNS_DIR}/<name>")
    last = path / "last.npz"
    if not last.is_file():
        raise CheckpointError(f"--resume {path}: the folder has no last.npz (it is saved after every epoch), so "
                              "there is nothing to resume; start a new run")
    return path, load_checkpoint(last)


def new_run_folder() -> Path:
    """runs/<YYYYmmdd-HHMMSS> (with -2, -3, ... when taken), not yet created."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = RUNS_DIR / stamp
    n = 2
    while run.exists():
        run = RUNS_DIR / f"{stamp}-{n}"
        n += 1
    return run


def prepare_run_folder(out: str | os.PathLike | None, resuming: bool) -> Path:
    """Create (or check) the run folder and prove it writable; ConfigError when it is not."""
    run = Path(out) if out is not None else new_run_folder()
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run} is a file, not a folder: choose a folder for the run")
    if not resuming and (run / "last.npz").exists():
        raise ConfigError(f"--out {run} already holds a run (last.npz): continue it with --resume {run}, "
                          "or choose another --out")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to the output folder {run} ({err.strerror or err}): "
                          "choose another --out") from None
    return run


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_latest(run: Path) -> Path:
    """Write ``runs/latest`` holding the run folder's path relative to ``runs/``, for predict.py.

    A run folder outside ./runs gets the ``latest`` file in its own parent folder instead.
    """
    runs = RUNS_DIR.resolve()
    where = run.resolve()
    home = runs if where.is_relative_to(runs) and where != runs else where.parent
    latest = home / "latest"
    _write_text_atomic(latest, where.relative_to(home).as_posix() + "\n")
    return latest


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, one row per epoch, rewritten whole (atomically) after every epoch."""
    lines = [",".join(HISTORY_COLUMNS)]
    lines += [",".join(repr(row[column]) for column in HISTORY_COLUMNS) for row in history]
    _write_text_atomic(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def resolve_data(config: TrainConfig, say) -> Path:
    """The data path to train on; generates the synthetic set into ./data/synthetic when needed."""
    if config.data is not None:
        return Path(config.data)
    real = found_data()
    if real is not None:
        return real
    if not SYNTHETIC_DIR.exists():
        from tinyunet.synth import generate  # only when the synthetic set is needed

        say(f"no data given and none under ./data: generating the built-in synthetic set "
            f"({SYNTHETIC_SIZE['n_train']} training + {SYNTHETIC_SIZE['n_test']} test images) into "
            f"{SYNTHETIC_DIR} ...")
        started = time.perf_counter()
        generate(SYNTHETIC_DIR, **SYNTHETIC_SIZE)
        say(f"  done in {time.perf_counter() - started:.1f}s")
    return SYNTHETIC_DIR


@dataclass
class Prepared:
    """The data of a run, split, fitted to the network and (for training) on the model's device."""

    ids: list[str]  # every image used, sorted
    fingerprint: str
    train_idx: np.ndarray  # indices into ids
    val_idx: np.ndarray
    x_train: Any  # (2N or N, S, S', 1) on the device, flips appended
    y_train: Any  # (.., S, S', 1) soft targets in [0, 1]
    x_val: Any  # (M, S, S', 1) on the device
    y_val: Any
    box: Any  # what undoes the fit (pad: the crop box; resize: None)
    val_images: Any  # (M, H, W) at the original size, on the device
    val_truth: Any  # (M, H, W) bool on the device
    coverage: np.ndarray = field(repr=False)  # (N,) of every image used


def prepare_data(config: TrainConfig, path: Path, xp, dtype) -> Prepared:
    """Load, check, subset, split, fit and move the data to the device (once)."""
    data = load_train(path)
    ids, images, masks = data.ids, data.images, data.masks
    if config.limit is not None and config.limit < len(ids):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(ids), config.limit, replace=False))
        ids, images, masks = [ids[i] for i in keep], images[keep], masks[keep]
    check_finite(images, f"the images of {path}")
    if len(ids) < 2:
        raise DataError(f"{path} holds {len(ids)} training image(s): training needs at least 2 "
                        "(one for training, one for validation)")
    cov = coverage(masks)
    if config.fold is None:
        train_idx, val_idx = stratified_split(coverage_class(cov), config.val_split, config.seed)
    else:
        train_idx, val_idx = stratified_folds(coverage_class(cov), config.folds, config.seed)[config.fold]
    x_train, box = to_network(images[train_idx], config.fit, config.input_size, config.depth)  # (N, S, S', 1)
    y_train, _ = to_network(masks[train_idx], config.fit, config.input_size, config.depth)
    if config.flip and config.flip_mode == "double":
        x_train, y_train = augment_hflip(x_train, y_train)  # (2N, S, S', 1): originals, then mirrors
    x_val, _ = to_network(images[val_idx], config.fit, config.input_size, config.depth)
    y_val, _ = to_network(masks[val_idx], config.fit, config.input_size, config.depth)

    def dev(a):
        return as_array(np.ascontiguousarray(a, dtype=dtype), xp)

    return Prepared(ids=ids, fingerprint=fingerprint(ids, images, masks), train_idx=train_idx, val_idx=val_idx,
                    x_train=dev(x_train), y_train=dev(y_train), x_val=dev(x_val), y_val=dev(y_val), box=box,
                    val_images=dev(images[val_idx]), val_truth=as_array(masks[val_idx] > 0.5, xp), coverage=cov)


# --------------------------------------------------------------------------------------------
# One epoch, validation
# --------------------------------------------------------------------------------------------

def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm hides itself when stderr is not a terminal
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=None if enabled else True,
                dynamic_ncols=True)


def epoch_loss(config: TrainConfig, epoch: int):
    """The loss function of ``epoch`` (counting from 0): ``loss``, or ``loss2`` from ``loss2_epoch`` on."""
    second = config.loss2 is not None and epoch + 1 >= config.loss2_epoch
    return get_loss(config.loss2 if second else config.loss)


def train_epoch(model, optimizer, x, y, config: TrainConfig, epoch: int) -> tuple[float, float]:
    """One pass over the training part; returns (mean loss, mean pixel accuracy) over its images.

    ``epoch`` counts from 0. Raises TrainingDiverged at the first non-finite loss found. With
    ``flip_mode="random"`` each image of a batch is mirrored left-right with probability 1/2, drawn
    (after the shuffle) from the epoch's generator, so a resumed run draws the same mirrors.
    """
    xp = model.xp
    n = len(x)
    rng = np.random.default_rng([config.seed, epoch])  # the shuffle of this epoch, whatever came before
    model.reseed_dropout((config.seed, epoch))
    loss_fn = epoch_loss(config, epoch)
    batches = list(minibatches(n, config.batch_size, rng, shuffle=True))
    order = as_array(np.concatenate(batches), xp)  # one small copy per epoch; batches are slices of it
    mirrored = None
    if config.flip and config.flip_mode == "random":
        mirrored = as_array(rng.random(n) < 0.5, xp)[:, None, None, None]  # (n, 1, 1, 1), in batch order
    sync_every = 1 if xp is np else GPU_SYNC_EVERY
    loss_sum = xp.zeros((), dtype=xp.float64)  # sums stay on the device between syncs
    acc_sum = xp.zeros((), dtype=xp.float64)
    pending = []  # this chunk's batch losses, checked at the next sync
    seen = 0
    bar = _progress_bar(len(batches), f"epoch {epoch + 1}/{config.epochs}", config.progress)
    try:
        start = 0
        for b, batch in enumerate(batches):
            idx = order[start:start + len(batch)]
            start += len(batch)
            xb, yb = x[idx], y[idx]  # gathered on the device
            if mirrored is not None:
                flip = mirrored[start - len(batch):start]  # (B, 1, 1, 1)
                xb, yb = xp.where(flip, xb[:, :, ::-1], xb), xp.where(flip, yb[:, :, ::-1], yb)
            logits = model.forward(xb, train=True)  # (B, S, S', 1)
            loss, dlogits = loss_fn(logits, yb)
            pending.append(loss)
            if len(pending) == sync_every or b == len(batches) - 1:
                values = as_numpy(xp.stack(pending)) if len(pending) > 1 else np.array([float(loss)])
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    raise TrainingDiverged(f"the training loss became {values[bad[0]]} at epoch {epoch + 1}, "
                                           f"batch {b - len(pending) + 2 + int(bad[0])} of {len(batches)}")
            model.backward(dlogits, input_grad=False)  # the images need no gradient
            optimizer.step(model.grads)
            loss_sum += loss * len(batch)
            acc_sum += pixel_accuracy(logits, yb) * len(batch)
            seen += len(batch)
            if len(pending) == sync_every or b == len(batches) - 1:
                pending = []
                if not bar.disable:
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{float(acc_sum) / seen:.4f}",
                                    refresh=False)
                bar.update(b + 1 - bar.n)
    finally:
        bar.close()
    return float(loss_sum) / n, float(acc_sum) / n


def validate_epoch(model, prep: Prepared, config: TrainConfig, epoch: int) -> tuple[float, float, float]:
    """Validation (loss, pixel accuracy, competition score at threshold 0.5), no dropout; the loss
    is the one ``epoch`` trains with.

    Loss and accuracy are at the network's size, against the fitted masks (as Keras would see them);
    the score is on the probabilities brought back to the original size, against the original masks.
    """
    xp = model.xp
    loss_fn = epoch_loss(config, epoch)
    n = len(prep.x_val)
    size = prep.val_truth.shape[1:]
    probs = xp.empty((n,) + size, dtype=model.dtype)  # (M, H, W)
    loss_sum = xp.zeros((), dtype=xp.float64)
    acc_sum = xp.zeros((), dtype=xp.float64)
    for start in range(0, n, EVAL_BATCH):
        xb, yb = prep.x_val[start:start + EVAL_BATCH], prep.y_val[start:start + EVAL_BATCH]
        logits = model.forward(xb, train=False)
        loss, _ = loss_fn(logits, yb)
        loss_sum += loss * len(xb)
        acc_sum += pixel_accuracy(logits, yb) * len(xb)
        probs[start:start + len(xb)] = from_network(sigmoid(logits), config.fit, prep.box, size)
    score = competition_score(prep.val_truth, probs > xp.float32(0.5))
    return float(loss_sum) / n, float(acc_sum) / n, score


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------

def say(message: str = "") -> None:
    print(message, flush=True)


def _check_resume(config: TrainConfig, checkpoint, run: Path) -> None:
    """ConfigError unless ``config`` keeps every setting of the run that decides model, split and geometry."""
    saved = config_from_args(checkpoint.meta.get("args"), checkpoint.path)
    for name in FIXED_ON_RESUME:
        ours, theirs = getattr(config, name), getattr(saved, name)
        if (dropout_rates(config) != dropout_rates(saved)) if name == "dropout" else ours != theirs:
            shown = dropout_rates(config) if name == "dropout" else ours
            raise ConfigError(f"{flag(name)} {shown} differs from the run being resumed ({name}="
                              f"{dropout_rates(saved) if name == 'dropout' else theirs} in {checkpoint.path}): "
                              f"a resumed run keeps its model, split and geometry; drop {flag(name)}, "
                              "or start a new run with another --out")
    if config.out is not None and Path(config.out).resolve() != run.resolve():
        raise ConfigError(f"--out {config.out} differs from --resume {run}: a resumed run continues in its own "
                          "folder; drop --out")


def _setup(config: TrainConfig, run: Path, resume_from):
    """The model (with the resumed state), its optimizer, the history so far and the prepared data."""
    rates = dropout_rates(config)
    model = UNet(features=config.features, depth=config.depth, dropout=rates, block=config.block, seed=config.seed,
                 dtype=np.float32, gpu=config.gpu)  # GPUUnavailableError here, before any data is read
    xp = model.xp
    optimizer = Adam(model.params, lr=config.lr)
    history: list[dict] = []
    if resume_from is not None:
        load_into(model, resume_from)
        if resume_from.optimizer_state is None:
            raise CheckpointError(f"{resume_from.path} has no optimizer state, so the run cannot continue exactly; "
                                  "start a new run")
        optimizer.load_state_dict(resume_from.optimizer_state)
        saved_args = resume_from.meta.get("args", {})
        if config.lr != saved_args.get("lr", config.lr):  # --lr given on resume: the rate from now on
            optimizer.lr = config.lr
        history = list(resume_from.meta.get("history", []))

    path = resolve_data(config, say)
    config = replace(config, data=str(Path(path).resolve()))
    prep = prepare_data(config, path, xp, model.dtype)
    if resume_from is not None:
        saved_print = resume_from.meta.get("data", {}).get("fingerprint")
        if saved_print != prep.fingerprint:
            raise DataError(f"the data at {path} (fingerprint {prep.fingerprint}) is not the data the run in {run} "
                            f"was trained on (fingerprint {saved_print}): give that run's data with --data, "
                            "or start a new run")
    return model, optimizer, history, prep, config


def _describe(config: TrainConfig, run: Path, net: DataParallel, prep: Prepared,
              resumed_after: int | None, lr: float) -> None:
    """The few lines that say what this run is about to do."""
    h, w = prep.val_truth.shape[1:]
    s, s2 = prep.x_val.shape[1:3]
    say(f"run folder: {run}" + (f" (resuming after epoch {resumed_after})" if resumed_after is not None else ""))
    say(f"data: {config.data}, {len(prep.ids)} images {h}x{w} (fingerprint {prep.fingerprint})")
    flips = {"double": f" (x2 with left-right flips = {len(prep.x_train)})",
             "random": " (each mirrored left-right with probability 1/2 in every epoch)"}
    say(f"split: {len(prep.train_idx)} train" + (flips[config.flip_mode] if config.flip else "")
         + f", {len(prep.val_idx)} validation, stratified by coverage class (seed {config.seed}"
         + (f"; fold {config.fold + 1} of {config.folds})" if config.fold is not None else ")"))
    say(f"model: U-Net features={config.features} depth={config.depth} block={config.block} "
         f"dropout={net.config['dropout']}, "
         f"{net.model.count_params():,} parameters; input {h}x{w} -> {s}x{s2} ({config.fit}); "
         f"{f'CPU (NumPy), {net.threads} thread(s)' if net.xp is np else 'GPU (CuPy)'}")
    if config.preset == "quick":
        kept = [f"{key}={value}" for key, value in QUICK.items() if getattr(config, key) == value]
        changed = [f"{key}={getattr(config, key)}" for key, value in QUICK.items() if getattr(config, key) != value]
        say("settings: QUICK defaults for the built-in synthetic set (" + ", ".join(kept) + ")"
             + (f", overridden by flags: {', '.join(changed)}" if changed else "; flags override them")
             + "; with --data the seed recipe's defaults apply")
    lr_note = f" (reduced on plateau from {config.lr:g})" if lr != config.lr else ""  # only on a resume
    losses = config.loss + (f" (epochs 1-{config.loss2_epoch - 1}), then {config.loss2}" if config.loss2 else "")
    say(f"training: epochs={config.epochs} batch_size={config.batch_size} lr={lr:g}{lr_note}; loss {losses}; "
         f"early stopping patience {config.patience} on {config.monitor}; lr x{config.lr_factor} after "
         f"{config.lr_patience} epochs without improvement (min {config.min_lr})")


def train(config: TrainConfig) -> Path:
    """Train as ``config`` says, write the run folder and return its path.

    Raises ConfigError / DataError / CheckpointError / GPUUnavailableError for bad input (before any
    file is written where possible), TrainingDiverged when the loss stops being finite, and
    TrainingInterrupted on Ctrl-C; the checkpoints of finished epochs are never damaged.
    """
    wall_start = time.perf_counter()
    validate(config)
    resume_from = None
    out = config.out
    if config.resume:
        out, resume_from = open_resume(config.resume)
        _check_resume(config, resume_from, out)
    created = out is None or not Path(out).exists()
    run = prepare_run_folder(out, resuming=resume_from is not None)
    try:
        model, optimizer, history, prep, config = _setup(config, run, resume_from)
        net = DataParallel(model, config.threads)  # what runs the batches; model holds the weights
    except BaseException:  # bad data, no GPU, Ctrl-C while reading: leave no empty run folder behind
        if created and run.is_dir() and not any(run.iterdir()):
            run.rmdir()
        raise
    write_latest(run)

    _describe(config, run, net, prep, resumed_after=len(history) if resume_from is not None else None,
              lr=optimizer.lr)
    stale = remove_stale_temporaries(run)  # what a killed run was writing when it died
    if stale:
        say(f"removed {len(stale)} half-written temporary file(s) left by a killed run: "
             + ", ".join(p.name for p in stale))

    def meta(epoch: int) -> dict:
        return {"model": dict(model.config), "fit": config.fit, "input_size": config.input_size, "epoch": epoch,
                "best_threshold": None, "val_score": None,
                "data": {"path": config.data, "fingerprint": prep.fingerprint},
                "args": asdict(config), "history": list(history),
                "callbacks": {name: cb.state_dict() for name, cb in callbacks.items()}, "seed": config.seed}

    def save_best(epoch: int, logs: dict) -> None:
        save_checkpoint(run / "best.npz", model.params, meta(epoch + 1), buffers=model.buffers)

    callbacks = {
        "early_stopping": EarlyStopping(config.monitor, patience=config.patience, mode=MONITORS[config.monitor]),
        "model_checkpoint": ModelCheckpoint(save_best, monitor=config.monitor, mode=MONITORS[config.monitor]),
    }
    if config.schedule == "cosine":
        callbacks["cosine"] = CosineAnnealing(optimizer, config.lr, config.cycle, config.min_lr)
    else:
        callbacks["reduce_lr"] = ReduceLROnPlateau(optimizer, monitor=config.monitor, factor=config.lr_factor,
                                                   patience=config.lr_patience, min_lr=config.min_lr,
                                                   mode=MONITORS[config.monitor])
    if resume_from is not None:
        for name, cb in callbacks.items():
            state = resume_from.meta.get("callbacks", {}).get(name)
            try:
                if not isinstance(state, dict):
                    raise ValueError(f"it has no {name} state")
                cb.load_state_dict(state)
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{resume_from.path} cannot be resumed ({err}); start a new run") from None
    if history:
        write_history(run / "history.csv", history)

    last_saved = len(history)  # epochs in last.npz
    try:
        with np.errstate(all="ignore"):  # a diverging loss is caught and reported below, not warned about
            for epoch in range(len(history), config.epochs):
                if callbacks["early_stopping"].stop_training:
                    break
                started = time.perf_counter()
                if "cosine" in callbacks:
                    callbacks["cosine"].on_epoch_begin(epoch)
                lr = float(optimizer.lr)
                try:
                    loss, acc = train_epoch(net, optimizer, prep.x_train, prep.y_train, config, epoch)
                    val_loss, val_acc, val_score = validate_epoch(net, prep, config, epoch)
                    if not math.isfinite(val_loss):
                        raise TrainingDiverged(f"the validation loss became {val_loss} after epoch {epoch + 1}")
                except TrainingDiverged as err:
                    raise TrainingDiverged(
                        f"{err}; stopped. " + _saved_note(run, last_saved, history)
                        + " Train again with a lower --lr (e.g. a tenth of this one)") from None
                row = {"epoch": epoch + 1, "loss": loss, "accuracy": acc, "val_loss": val_loss,
                       "val_accuracy": val_acc, "val_score": val_score, "lr": lr,
                       "seconds": round(time.perf_counter() - started, 3)}
                history.append(row)
                logs = {k: v for k, v in row.items() if k not in ("epoch", "seconds")}
                stop = callbacks["early_stopping"].on_epoch_end(epoch, logs)
                saved = callbacks["model_checkpoint"].on_epoch_end(epoch, logs)
                reduced = "reduce_lr" in callbacks and callbacks["reduce_lr"].on_epoch_end(epoch, logs)
                snapshot = None
                if "cosine" in callbacks and callbacks["cosine"].on_epoch_end(epoch, logs):
                    snapshot = run / snapshot_name((epoch + 1) // config.cycle)
                    save_checkpoint(snapshot, model.params, meta(epoch + 1), buffers=model.buffers)
                save_checkpoint(run / "last.npz", model.params, meta(epoch + 1), optimizer.state_dict(),
                                model.buffers)
                last_saved = epoch + 1
                write_history(run / "history.csv", history)
                notes = (["saved best.npz"] if saved else []) + ([f"saved {snapshot.name}"] if snapshot else []) + \
                        ([f"lr -> {optimizer.lr:.1e}"] if reduced else []) + (["early stop"] if stop else [])
                say(f"epoch {epoch + 1:3d}/{config.epochs}  loss {loss:.4f}  acc {acc:.4f}  val_loss {val_loss:.4f}  "
                     f"val_acc {val_acc:.4f}  val_score {val_score:.4f}  lr {lr:.1e}  {row['seconds']:.1f}s"
                     + (f"  [{', '.join(notes)}]" if notes else ""))
                if stop:
                    es = callbacks["early_stopping"]
                    say(f"early stopping: {config.monitor} has not improved for {es.wait} epochs "
                         f"(best {es.best:.4f} at epoch {es.best_epoch + 1})")
                    break
            summary = finish(net, prep, config, run, history)
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted (Ctrl-C); " + _saved_note(run, last_saved, history)
                                  + f" Continue with: python train.py --resume {run}") from None
    best_epoch, val_loss, threshold, score = summary
    minutes, seconds = divmod(time.perf_counter() - wall_start, 60)
    say(f"done in {int(minutes)}m{seconds:04.1f}s: best epoch {best_epoch} (val_loss {val_loss:.4f}), "
         f"best threshold {threshold:.3f}, validation competition score {score:.4f}")
    say(f"run folder: {run}  (best.npz for predict.py, history.csv, plots)")
    return run


def _saved_note(run: Path, last_saved: int, history: list[dict]) -> str:
    """Which epoch the files on disk hold, in words."""
    if last_saved == 0:
        return "no epoch had finished, so nothing was saved."
    best = run / "best.npz"
    best_epoch = None
    if best.exists():
        try:
            best_epoch = load_checkpoint(best).meta.get("epoch")
        except CheckpointError:
            best_epoch = None
    return (f"{run / 'last.npz'} holds epoch {last_saved}"
            + (f", {best} epoch {best_epoch}" if best_epoch is not None else "") + ".")


def tune_postprocessing(truth, probs, config: TrainConfig):
    """The threshold (and with ``config.empty_rule`` the minimum area) that score the validation
    probabilities best: ``(min_area, threshold, score, thresholds, scores at that area)``."""
    if not config.empty_rule:
        thresholds, scores = threshold_sweep(truth, probs)
        return (0, *best_threshold(thresholds, scores), thresholds, scores)
    thresholds, grid = threshold_sweep(truth, probs, min_areas=MIN_AREAS)  # (A, T)
    min_area, threshold, score = best_postprocessing(thresholds, grid, MIN_AREAS)
    return min_area, threshold, score, thresholds, grid[MIN_AREAS.index(min_area)]


def snapshot_name(k: int) -> str:
    """The file of the k-th cosine cycle's snapshot (k from 1): snapshot01.npz, ..."""
    return f"snapshot{k:02d}.npz"


def finish(model, prep: Prepared, config: TrainConfig, run: Path, history: list[dict]):
    """Best weights -> validation probabilities -> threshold sweep -> best.npz's meta -> plots.

    With ``config.tta`` the probabilities average each image and its mirror; with ``config.empty_rule``
    the sweep also tries every minimum area of :data:`MIN_AREAS` and keeps the best pair. best.npz
    records what predict.py then applies: ``best_threshold``, ``min_area`` (0: no rule) and ``tta``.
    A cosine run with two or more snapshots also gets ``ensemble.npz``: every snapshot, their mean
    probability tuned the same way (:mod:`tinyunet.ensemble`).
    Returns ``(best epoch, its val_loss, best threshold, validation score at it)``.
    """
    def predict_val(ckpt):
        model.load_params(ckpt.params, ckpt.buffers)
        return probabilities(model, prep.val_images, config.fit, config.input_size, batch_size=EVAL_BATCH,
                             tta=config.tta)

    snapshots = sorted(run.glob("snapshot[0-9][0-9].npz")) if config.schedule == "cosine" else []
    if len(snapshots) >= 2:
        members = [load_checkpoint(path) for path in snapshots]
        mean = predict_val(members[0])
        for member in members[1:]:
            mean += predict_val(member)
        mean /= mean.dtype.type(len(members))
        min_area, threshold, score, _, _ = tune_postprocessing(prep.val_truth, mean, config)
        shared = {k: v for k, v in members[-1].meta.items() if k not in ("history", "callbacks", "model")}
        save_ensemble(run / "ensemble.npz", members, {**shared, "best_threshold": threshold, "val_score": score,
                                                      "min_area": min_area, "tta": config.tta})
        say(f"ensemble of {len(members)} snapshots ({', '.join(p.name for p in snapshots)}): validation score "
             f"{score:.4f} at threshold {threshold:.3f}, min area {min_area}; saved {run / 'ensemble.npz'}")

    best = load_checkpoint(run / "best.npz")
    probs = predict_val(best)
    min_area, threshold, score, thresholds, scores = tune_postprocessing(prep.val_truth, probs, config)
    meta = dict(best.meta)
    meta.update(best_threshold=threshold, val_score=score, min_area=min_area, tta=config.tta,
                threshold_sweep={"thresholds": [float(t) for t in thresholds], "scores": [float(s) for s in scores]})
    save_checkpoint(run / "best.npz", best.params, meta, best.optimizer_state, best.buffers)
    best_epoch = int(meta["epoch"])
    val_loss = next((row["val_loss"] for row in history if row["epoch"] == best_epoch), float("nan"))

    if not config.plots:
        return best_epoch, val_loss, threshold, score
    from tinyunet import plots  # matplotlib: only now

    images = as_numpy(prep.val_images)
    probs_np = as_numpy(probs)
    ids = [prep.ids[i] for i in prep.val_idx]
    plots.learning_curves(history, run / "learning_curves.png")
    plots.threshold_curve(thresholds, scores, threshold, run / "threshold_sweep.png")
    plots.prediction_grid(images, probs_np, drop_small(probs_np > np.float32(threshold), min_area),
                          run / "val_predictions.png",
                          truths=as_numpy(prep.val_truth), ids=ids)
    plots.coverage_histogram(prep.coverage[prep.train_idx], prep.coverage[prep.val_idx], run / "coverage.png")
    return best_epoch, val_loss, threshold, score
