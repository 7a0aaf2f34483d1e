"""The training loop behind ``train.py``: the seed recipe, from the data folder to a run folder.

    config = build_config({"epochs": 10})   # tinyunet.config: the flags given, the rest from the defaults
    run = train(config)                      # -> Path of the run folder

One epoch, as the recipe has it::

    shuffle the (flip-doubled) training part with rng([seed, epoch]); reseed dropout with (seed, epoch)
    for each minibatch:  (--flip-mode random: mirrors; --augment: shifts, zooms, brightness, all drawn by rng)
                         logits = model.forward(x, train=True)          dropout on
                         loss, dlogits = binary_crossentropy(logits, y)
                         model.backward(dlogits); adam.step(model.grads)
    validation: loss and pixel accuracy at the network's size, the competition score at threshold 0.5
                on the probabilities brought back to the images' own size
    callbacks, in Keras's order: EarlyStopping, ModelCheckpoint (best.npz), ReduceLROnPlateau (or, with
               --schedule cosine, CosineAnnealing and a snapshotNN.npz at each cycle's end)
    last.npz (everything --resume needs), history.csv

After the last epoch (or an early stop) the weights of best.npz predict the validation set, 50
thresholds are swept with the competition metric, and the best one goes into best.npz's metadata,
which is what predict.py uses (with two or more snapshots, ensemble.npz too). Then the plots and a summary.

The run folder (best.npz, last.npz, history.csv, the plots, runs/latest) is :mod:`tinyunet.runs`; the
data is found, split and fitted by :mod:`tinyunet.prepare`.

Exact resume: every random draw is a function of (seed, epoch): the initial weights of the seed, the
shuffle, mirrors and augmentations of ``np.random.default_rng([seed, epoch])`` and the dropout masks of
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
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from tinyunet.augment import Augmentation, describe
from tinyunet.backend import as_array, as_numpy, get_backend
from tinyunet.callbacks import CosineAnnealing, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from tinyunet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyunet.config import (FIXED_ON_RESUME, MIN_AREAS, MONITORS, QUICK, SPLIT_SETTINGS, ConfigError, TrainConfig,
                             config_from_args, dropout_rates, flag, validate)
from tinyunet.data import DataError, tgs_like
from tinyunet.ensemble import mean_probability, save_ensemble
from tinyunet.files import remove_stale_temporaries
from tinyunet.layers import sigmoid
from tinyunet.losses import get_loss, loss_in_box, pixel_accuracy
from tinyunet.metrics import best_postprocessing, best_threshold, competition_score, drop_small, threshold_sweep
from tinyunet.models import load_into
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import from_network, probabilities
from tinyunet.prepare import Prepared, prepare_data, resolve_data
from tinyunet.runs import (discard_run_folder, latest_file, open_resume, prepare_run_folder, release_run_folder,
                           write_history, write_latest)
from tinyunet.transforms import canvas, minibatches
from tinyunet.unet import UNet

EVAL_BATCH = 32  # images per forward pass when validating
GPU_SYNC_EVERY = 20  # steps between host syncs on a GPU (progress bar, NaN check)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch and the last good files."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's stop), raised by the handler train_main installs: training
    stops as on Ctrl-C, with the finished epochs saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training; the message says what was saved and how to resume."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


def train_epoch(model, optimizer, x, y, config: TrainConfig, epoch: int, box=None) -> tuple[float, float]:
    """One pass over the training part; returns (mean loss, mean pixel accuracy) over its images.

    ``epoch`` counts from 0. Raises TrainingDiverged at the first non-finite loss found. With
    ``flip_mode="random"`` each image of a batch is mirrored left-right with probability 1/2, drawn
    (after the shuffle) from the epoch's generator, and then ``config.augment``'s parameters (every image's,
    at once), so a resumed run draws the same mirrors and augmentations. ``box`` (top, left, h, w): the loss
    sees only those pixels of every image (``--loss-region central``: the original image inside its padding;
    a mirrored image's box mirrored); None: every pixel.
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
    augment = Augmentation(config.augment, rng, n, x.shape[1:3], xp, x.dtype) if config.augment else None
    flipped = None  # (n,) in batch order: the mirrored images, whose loss box is mirrored too
    if box is not None and config.flip:  # "double": x's second half mirrors its first (prepare_data)
        flipped = mirrored[:, 0, 0, 0] if mirrored is not None else order >= n // 2
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
            part = slice(start - len(batch), start)  # this batch's places in the epoch's order
            xb, yb = x[idx], y[idx]  # gathered on the device
            if mirrored is not None:
                flip = mirrored[part]  # (B, 1, 1, 1)
                xb, yb = xp.where(flip, xb[:, :, ::-1], xb), xp.where(flip, yb[:, :, ::-1], yb)
            if augment is not None:
                xb, yb = augment(xb, yb, part)
            logits = model.forward(xb, train=True)  # (B, S, S', 1)
            if box is None:
                loss, dlogits = loss_fn(logits, yb)
            else:  # the box stays where the padding put it: shifts and zooms move the image, not the box
                loss, dlogits = loss_in_box(loss_fn, logits, yb, box, None if flipped is None else flipped[part])
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
    is the one ``epoch`` trains with, on the pixels it trains on (``--loss-region``).

    Loss and accuracy are at the network's size, against the fitted masks (as Keras would see them);
    the score is on the probabilities brought back to the original size, against the original masks.
    """
    xp = model.xp
    loss_fn = epoch_loss(config, epoch)
    box = prep.box if config.loss_region == "central" else None
    n = len(prep.x_val)
    probs = xp.zeros(prep.val_truth.shape, dtype=model.dtype)  # (M, H, W); mixed sizes: on the truth's canvas
    loss_sum = xp.zeros((), dtype=xp.float64)
    acc_sum = xp.zeros((), dtype=xp.float64)
    for start in range(0, n, EVAL_BATCH):
        xb, yb = prep.x_val[start:start + EVAL_BATCH], prep.y_val[start:start + EVAL_BATCH]
        logits = model.forward(xb, train=False)
        loss, _ = loss_fn(logits, yb) if box is None else loss_in_box(loss_fn, logits, yb, box)
        loss_sum += loss * len(xb)
        acc_sum += pixel_accuracy(logits, yb) * len(xb)
        part = slice(start, start + len(xb))
        if isinstance(prep.val_sizes, list):  # each image back to its own size, at the canvas's top left
            boxes = prep.box[part] if isinstance(prep.box, list) else None
            for i, p in enumerate(from_network(sigmoid(logits), config.fit, boxes, prep.val_sizes[part]), start):
                probs[i, :p.shape[0], :p.shape[1]] = p
        else:
            probs[part] = from_network(sigmoid(logits), config.fit, prep.box, prep.val_sizes)
    score = competition_score(prep.val_truth, probs > xp.float32(0.5))
    return float(loss_sum) / n, float(acc_sum) / n, score


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------

def say(message: str = "") -> None:
    """Print a line of the run's report. When stdout is closed (``train.py | head -1``) or full
    (``> /dev/full``), training goes on and the report stops: stdout becomes /dev/null."""
    try:
        print(message, flush=True)
    except OSError:  # BrokenPipeError, ENOSPC
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered drains there too, at exit
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a descriptor
            sys.stdout = open(os.devnull, "w")


def _check_resume(config: TrainConfig, checkpoint, run: Path) -> None:
    """ConfigError unless ``config`` keeps every setting of the run that decides model, split and geometry."""
    saved = config_from_args(checkpoint.meta.get("args"), checkpoint.path)

    def shown(settings: TrainConfig, name: str):  # a setting as the message shows it
        if name == "augment":
            return ",".join(settings.augment) or "none"
        return dropout_rates(settings) if name == "dropout" else getattr(settings, name)

    for name in FIXED_ON_RESUME:
        if shown(config, name) != shown(saved, name):
            raise ConfigError(f"{flag(name)} {shown(config, name)} differs from the run being resumed ({name}="
                              f"{shown(saved, name)} in {checkpoint.path}): "
                              f"a resumed run keeps its model, split and geometry; drop {flag(name)}, "
                              "or start a new run with another --out")
    if config.out is not None and Path(config.out).resolve() != run.resolve():
        raise ConfigError(f"--out {config.out} differs from --resume {run}: a resumed run continues in its own "
                          "folder; drop --out")


def _setup(config: TrainConfig, run: Path, resume_from):
    """The model (with the resumed state), its optimizer, the history so far and the prepared data."""
    xp = get_backend(config.gpu)  # GPUUnavailableError here, before any data is read
    path = resolve_data(config, say)
    config = replace(config, data=str(Path(path).resolve()))
    prep = prepare_data(config, path, xp, np.float32)
    if config.loss_region == "central" and (isinstance(prep.box, list) or isinstance(prep.train_box, list)):
        # Images of mixed sizes each have a box of their own size: BCE (a mean over pixels) and the per-image
        # Lovász (a mean over images) would weigh them differently, so no single crop serves every loss.
        raise ConfigError("--loss-region central takes images of one size: these are of mixed sizes, so each "
                          "has its own padded border; give --loss-region all")
    if resume_from is not None:
        saved_print = resume_from.meta.get("data", {}).get("fingerprint")
        if saved_print != prep.fingerprint:
            raise DataError(f"the data at {path} (fingerprint {prep.fingerprint}) is not the data the run in {run} "
                            f"was trained on (fingerprint {saved_print}): give that run's data with --data, "
                            "or start a new run")
    model = UNet(features=config.features, depth=config.depth, dropout=dropout_rates(config), block=config.block,
                 in_channels=prep.channels, seed=config.seed, dtype=np.float32, gpu=config.gpu)  # channels: the data's
    if config.init is not None and resume_from is None:
        _start_from(model, config, prep)
    optimizer = Adam(model.params, lr=config.lr)
    history: list[dict] = []
    if resume_from is not None:
        load_into(model, resume_from)
        try:
            optimizer.load_state_dict(resume_from.optimizer_state)  # checked by runs.check_resumable
        except ValueError as err:  # its moments do not fit the model
            raise CheckpointError(f"{resume_from.path} cannot be resumed ({err}); start a new run") from None
        saved_args = resume_from.meta.get("args", {})
        if config.lr != saved_args.get("lr", config.lr):  # --lr given on resume: the rate from now on
            optimizer.lr = config.lr
        history = list(resume_from.meta.get("history", []))
    return model, optimizer, history, prep, config


def _start_from(model: UNet, config: TrainConfig, prep: Prepared) -> None:
    """Load ``config.init``'s weights and BatchNorm statistics into ``model`` (fine-tuning); CheckpointError
    unless they fit it. A note when that model learnt from this data under another split: some of
    today's validation images were its training images, so the validation score flatters."""
    checkpoint = load_checkpoint(config.init)
    load_into(model, checkpoint)
    saved_args = checkpoint.meta.get("args") if isinstance(checkpoint.meta.get("args"), dict) else {}
    if checkpoint.meta.get("data", {}).get("fingerprint") == prep.fingerprint:
        moved = [name for name in SPLIT_SETTINGS if saved_args.get(name, getattr(TrainConfig(), name))
                 != getattr(config, name)]
        if moved:
            say(f"note: --init {config.init} was trained on this data with another split "
                f"({', '.join(f'{flag(name)} {saved_args.get(name)}' for name in moved)}): some validation "
                "images were its training images, so the validation score is optimistic")
    say(f"weights: from {checkpoint.path} (epoch {checkpoint.meta.get('epoch', '?')}), fine-tuned with a "
        "fresh optimizer")


def _describe(config: TrainConfig, run: Path, net: DataParallel, prep: Prepared,
              resumed_after: int | None, lr: float) -> None:
    """The few lines that say what this run is about to do."""
    h, w = prep.val_truth.shape[1:]
    s, s2 = prep.x_val.shape[1:3]
    shape = f"of mixed sizes, validation up to {h}x{w}" if isinstance(prep.val_sizes, list) else f"{h}x{w}"
    colour = f", {prep.channels} channels" if prep.channels > 1 else ""
    say(f"run folder: {run}" + (f" (resuming after epoch {resumed_after})" if resumed_after is not None else ""))
    say(f"data: {config.data}, {len(prep.ids)} images {shape}{colour} (fingerprint {prep.fingerprint})")
    flips = {"double": f" (x2 with left-right flips = {len(prep.x_train)})",
             "random": " (each mirrored left-right with probability 1/2 in every epoch)"}
    say(f"split: {len(prep.train_idx)} train" + (flips[config.flip_mode] if config.flip else "")
         + f", {len(prep.val_idx)} validation, stratified by coverage class (seed {config.seed}"
         + (f"; fold {config.fold + 1} of {config.folds})" if config.fold is not None else ")"))
    if config.augment:
        say(f"augment: every training batch, redrawn each epoch: {describe(config.augment, (s, s2))}")
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
    lr_note = "" if lr == config.lr or config.schedule == "cosine" else f" (reduced on plateau from {config.lr:g})"
    switch = config.loss2 not in (None, config.loss)  # a second loss equal to the first changes nothing
    losses = config.loss + (f" (epochs 1-{config.loss2_epoch - 1}), then {config.loss2}" if switch else "")
    if config.loss_region == "central":
        losses += f" on the central {prep.box[2]}x{prep.box[3]} pixels only (not the padded border)"
    reset = ", Adam reset at each restart" if config.restart_optimizer else ""
    schedule = (f"lr cosine from {config.lr:g} to {config.min_lr:g} every {config.cycle} epochs, a snapshot at "
                f"each cycle's end{reset}" if config.schedule == "cosine" else
                f"lr x{config.lr_factor} after {config.lr_patience} epochs without improvement (min {config.min_lr})")
    say(f"training: epochs={config.epochs} batch_size={config.batch_size} lr={lr:g}{lr_note}; loss {losses}; "
         f"early stopping patience {config.patience} on {config.monitor}; {schedule}")


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
        return _train_in(config, run, resume_from, created, wall_start)
    except BaseException:  # bad data, no GPU, Ctrl-C, a crash before any epoch finished: no empty run folder
        if created:
            discard_run_folder(run)
        raise
    finally:
        release_run_folder(run)


def _train_in(config: TrainConfig, run: Path, resume_from, created: bool, wall_start: float) -> Path:
    """:func:`train` in the prepared and locked run folder ``run`` (``created``: by this call)."""
    model, optimizer, history, prep, config = _setup(config, run, resume_from)
    net = DataParallel(model, config.threads)  # what runs the batches; model holds the weights

    def point_latest() -> bool:  # runs/latest -> this run, once it holds an epoch (or is resumed)
        if not write_latest(run):
            say(f"note: {latest_file(run)} is not a pointer train.py wrote, so it is left as it is; "
                f"give predict.py --model {run / 'best.npz'}")
        return True

    pointed = not created and point_latest()

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
        callbacks["cosine"] = CosineAnnealing(optimizer, config.lr, config.cycle, config.min_lr,
                                              config.restart_optimizer)
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
                    loss, acc = train_epoch(net, optimizer, prep.x_train, prep.y_train, config, epoch,
                                            prep.train_box if config.loss_region == "central" else None)
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
                pointed = pointed or point_latest()
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
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
        again = (f" The run folder {run} is removed: start again" if created and last_saved == 0
                 else f" Continue with: python train.py --resume {run}")
        raise TrainingInterrupted(f"{how}; " + _saved_note(run, last_saved, history) + again) from None
    best_epoch, monitored, threshold, score, collapse = summary
    sizes = prep.val_sizes if isinstance(prep.val_sizes, list) else [prep.val_sizes]
    score_name = "competition score" if tgs_like(sizes, prep.channels) else "score (competition metric)"
    minutes, seconds = divmod(time.perf_counter() - wall_start, 60)
    say(f"done in {int(minutes)}m{seconds:04.1f}s: best epoch {best_epoch} ({config.monitor} {monitored:.4f}), "
         f"best threshold {threshold:.3f}, validation {score_name} {score:.4f}")
    say(f"run folder: {run}  (best.npz for predict.py, history.csv, plots)")
    if collapse is not None:
        say(collapse)
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
    A cosine run with two or more snapshots also gets ``ensemble.npz``: every snapshot (the last
    ``config.ensemble_size`` where that is set), their mean probability tuned the same way
    (:mod:`tinyunet.ensemble`).
    Returns ``(best epoch, its value of config.monitor (what chose it), best threshold, validation score at
    it, the collapse warning or None)``.
    """
    def predict_val(ckpt):  # (M, H, W) on the validation truth's canvas
        model.load_params(ckpt.params, ckpt.buffers)
        return canvas(probabilities(model, prep.val_images, config.fit, config.input_size, batch_size=EVAL_BATCH,
                                    tta=config.tta))

    cycles = len(history) // config.cycle if config.schedule == "cosine" else 0
    snapshots = [run / snapshot_name(k) for k in range(1, cycles + 1) if (run / snapshot_name(k)).is_file()]
    snapshots = snapshots[-config.ensemble_size:] if config.ensemble_size else snapshots
    if len(snapshots) >= 2:
        members = [load_checkpoint(path) for path in snapshots]
        mean = mean_probability(predict_val(member) for member in members)
        min_area, threshold, score, _, _ = tune_postprocessing(prep.val_truth, mean, config)
        save_ensemble(run / "ensemble.npz", members, {**members[-1].meta, "best_threshold": threshold,
                                                      "val_score": score, "min_area": min_area, "tta": config.tta})
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
    monitored = next((row[config.monitor] for row in history if row["epoch"] == best_epoch), float("nan"))

    pixels = (sum(h * w for h, w in prep.val_sizes) if isinstance(prep.val_sizes, list)
              else int(prep.val_truth.size))  # the canvas's background is no image's
    collapse = collapse_note(int(drop_small(probs > probs.dtype.type(threshold), min_area).sum()),
                             int(prep.val_truth.sum()), pixels, len(prep.val_idx))
    if not config.plots:
        return best_epoch, monitored, threshold, score, collapse
    from tinyunet import plots  # matplotlib: only now

    images = as_numpy(canvas(prep.val_images))
    probs_np = as_numpy(probs)
    ids = [prep.ids[i] for i in prep.val_idx]
    plots.learning_curves(history, run / "learning_curves.png")
    plots.threshold_curve(thresholds, scores, threshold, run / "threshold_sweep.png")
    plots.prediction_grid(images, probs_np, drop_small(probs_np > np.float32(threshold), min_area),
                          run / "val_predictions.png",
                          truths=as_numpy(prep.val_truth), ids=ids)
    plots.coverage_histogram(prep.coverage[prep.train_idx], prep.coverage[prep.val_idx], run / "coverage.png")
    return best_epoch, monitored, threshold, score, collapse


def collapse_note(predicted: int, true: int, pixels: int, n_images: int) -> str | None:
    """A warning when the model predicts one class on every validation pixel (``predicted`` of ``pixels``
    foreground) though the truth has both (``true`` foreground); None otherwise."""
    if predicted not in (0, pixels) or true in (0, pixels):
        return None
    what = "background (an empty mask)" if predicted == 0 else "foreground (a full mask)"
    return (f"warning: the model predicts {what} on all {n_images} validation images, so it has learned nothing "
            "yet; try more --epochs, a larger --input-size, or another --lr (e.g. 3e-4 or 3e-3)")
