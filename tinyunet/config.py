"""Every training setting and its default in one place, the recipes over them, and their checks.

    config = build_config({"epochs": 10})   # the settings given; the rest from the defaults below
    validate(config)                         # ConfigError, one line naming the flag, for a bad value

:class:`TrainConfig` holds the seed recipe's values as its defaults; :data:`QUICK` (the built-in
synthetic set) and :data:`BEST` (the measured best on the real data) are named sets of settings over
them. A resumed run's settings come from its last.npz (:func:`config_from_args`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinyunet.augment import AUGMENTATIONS
from tinyunet.blocks import BLOCKS
from tinyunet.checkpoint import CheckpointError, load_checkpoint
from tinyunet.losses import LOSSES
from tinyunet.pipeline import FITS, MAX_INPUT_SIZE
from tinyunet.runs import open_resume
from tinyunet.unet import MAX_DEPTH, MAX_WIDTH, default_dropout

# --------------------------------------------------------------------------------------------
# Every default in one place
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every training setting, with the seed recipe's values as defaults."""

    data: str | None = None  # folder or zip: Kaggle's layout or images/ + masks/; None: ./data/... or the synthetic set
    mask_suffix: str = ""  # a mask's file stem is its image's plus this (images/a.jpg <-> masks/a_mask.png)
    mask_threshold: float | None = None  # binarise soft masks: foreground above this share of full scale
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
    loss_region: str = "all"  # "all" pixels of the network input, or with fit="pad" the "central" ones only
    #                           (the original image, not its reflect-padded border): no loss, no gradient there
    monitor: str = "val_loss"  # what early stopping, the best checkpoint and the LR cut watch: or "val_score"
    lr: float = 1e-3  # Adam's learning rate
    val_split: float = 0.2  # validation share, stratified by coverage class (unless fold is set)
    folds: int = 1  # > 1: k-fold cross-validation, one run per fold (tinyunet.folds)
    fold: int | None = None  # with folds > 1: this run validates on fold `fold` (0 .. folds-1) of the k-fold split
    seed: int = 0  # weights, split, shuffles, dropout: all drawn from it
    out: str | None = None  # run folder; None: runs/<YYYYmmdd-HHMMSS>
    resume: str | None = None  # a run folder (or its last.npz) to continue
    init: str | None = None  # a checkpoint whose weights and BatchNorm statistics start the run (fine-tuning)
    fit: str = "resize"  # how images meet the network: "resize" to input_size, or reflect-"pad"
    input_size: int = 128  # network input side with fit="resize"; a multiple of 2**depth
    patience: int = 7  # EarlyStopping on the monitored value
    lr_patience: int = 5  # ReduceLROnPlateau on the monitored value
    lr_factor: float = 0.1
    min_lr: float = 1e-5
    schedule: str = "plateau"  # "plateau": x lr_factor after lr_patience flat epochs; "cosine": warm restarts
    cycle: int = 10  # epochs per cosine cycle; the end of each saves snapshot<k>.npz, an ensemble member
    restart_optimizer: bool = False  # with schedule="cosine": Adam's moments and step count start afresh at
    #                                  every restart, as in a new fine-tuning run from the last snapshot
    ensemble_size: int = 0  # with schedule="cosine": ensemble.npz averages the last this many snapshots; 0: all
    flip: bool = True  # left-right mirrors of the training images, as flip_mode says
    flip_mode: str = "double"  # "double": every mirror appended (the seed); "random": each image mirrored
    #                            with probability 1/2 in every epoch's batches (half the epoch's cost)
    augment: tuple[str, ...] = ()  # augmentations of every training batch, redrawn each epoch: any of "shift",
    #                                "scale", "brightness" (tinyunet.augment), applied in that order after the mirrors
    limit: int | None = None  # use only this many training images (a random subset by seed)
    preset: str = "recipe"  # which defaults apply: "recipe" (the seed's), "best" (BEST over them), "finetune"
    #                         (FINETUNE over them, from --init), or "quick" (QUICK, for the built-in synthetic set)
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

# The best recipe measured on the real TGS data (docs/accuracy.md, sessions 7-14), in two commands:
#   python train.py --data DIR --recipe best --out runs/A
#   python train.py --data DIR --recipe finetune --init runs/A/best.npz --out runs/B
# BEST: a residual U-Net with BatchNorm at 16 filters, reflect-padded 101 -> 112 instead of resized, random
# mirrors (half the seed's epoch), shifts, zooms and brightness/contrast on every batch and no dropout (the
# network underfits with it), BCE for 11 epochs and then the per-image Lovász hinge, one cosine descent of the
# LR from 1e-3 to 1e-5 over its 24 epochs, the best checkpoint by the competition score, flip TTA and the
# empty-mask rule tuned on validation. Measured: 0.7756 on the 640 validation images (44-58 min on 2 cores).
BEST: dict[str, Any] = {"block": "residual", "features": 16, "fit": "pad", "flip_mode": "random",
                        "augment": ("shift", "scale", "brightness"), "dropout": (0.0, 0.0, 0.0, 0.0),
                        "loss": "bce", "loss2": "lovasz", "loss2_epoch": 12, "monitor": "val_score",
                        "schedule": "cosine", "cycle": 24, "epochs": 24, "patience": 30,
                        "tta": True, "empty_rule": True}
# FINETUNE, the second command, from BEST's best.npz (--init): the Lovász hinge alone, fresh Adam, the LR restarted
# at 2e-4 every 12 epochs (cosine down to 1e-5; higher restarts threw the score back, docs/accuracy.md rows 9-11;
# cycles of 4 and 9 epochs ended lower, rows 24-29), a snapshot at each of the five cycles' ends, and the last
# four snapshots averaged into ensemble.npz (the first, a cycle after BEST's, trails). No early stopping: it
# would cut the cycles short. The network comes from --init. Measured from BEST's model: 0.8016 on the same
# 640 images after 60 epochs (1 h 55 min; 2 h 49 min for both commands, docs/accuracy.md row 30).
FINETUNE: dict[str, Any] = {**{key: BEST[key] for key in ("flip_mode", "augment", "monitor", "tta", "empty_rule")},
                            "loss": "lovasz", "schedule": "cosine", "cycle": 12, "lr": 2e-4, "epochs": 60,
                            "patience": 60, "ensemble_size": 4}
NAMED = {"best": BEST, "finetune": FINETUNE}  # the presets that are a set of settings over the seed's, on any data
PRESETS = ("recipe", *NAMED, "quick")

REAL_DATA = (Path("data/tgs-salt-identification-challenge.zip"), Path("data/tgs-salt"))  # looked for first
MIN_AREAS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500, 700, 1000)  # empty-mask rule candidates (px)

# Settings that decide the model, the split or the geometry: a resumed run must keep them.
FIXED_ON_RESUME = ("features", "depth", "dropout", "block", "fit", "input_size", "val_split", "seed", "flip",
                   "flip_mode", "augment", "limit", "folds", "fold", "mask_suffix", "mask_threshold")
SPLIT_SETTINGS = ("seed", "val_split", "folds", "fold", "limit")  # what decides which images are validation
FLIP_MODES = ("double", "random")
LOSS_REGIONS = ("all", "central")
SCHEDULES = ("plateau", "cosine")
MONITORS = {"val_loss": "min", "val_score": "max"}  # a monitored value and the direction it improves in
COSINE_ONLY = {"ensemble_size": "no snapshots to average",  # settings of the cosine schedule only, and what
               "restart_optimizer": "no restarts to reset Adam at"}  # another schedule would lack for them


class ConfigError(ValueError):
    """A setting has a value training cannot use; the message is one line saying which and why."""


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
    for name in ("dropout", "augment"):  # lists (JSON, a caller's) as tuples
        if name in given:
            given[name] = tuple(given[name])
    if given.get("resume") and given.get("init"):
        raise ConfigError("--init and --resume both give the starting weights: a resumed run continues from its "
                          "own last.npz; drop --init")
    if given.get("resume"):
        _, checkpoint = open_resume(given["resume"])
        saved = config_from_args(checkpoint.meta.get("args"), checkpoint.path)
        return replace(saved, **{"out": None, **given})  # the run continues in its own folder
    if given.get("init"):  # fine-tuning: the network is the checkpoint's
        given = {**init_settings(given["init"]), **given}
    if given.get("preset") == "finetune" and not given.get("init"):
        raise ConfigError("--recipe finetune continues a trained model: give --init with its best.npz, e.g. "
                          "--init runs/A/best.npz after python train.py --recipe best --out runs/A")
    if given.get("preset") in NAMED:  # the named recipe, on whatever data
        preset = NAMED[given["preset"]]
        if given.get("schedule", preset.get("schedule")) != "cosine":  # its cosine-only settings go with its schedule
            preset = {key: value for key, value in preset.items() if key not in COSINE_ONLY}
        return replace(TrainConfig(), **{**preset, **given})
    if given.get("data") is None:
        real = found_data()
        if real is not None:
            given["data"] = str(real)
        else:
            return replace(TrainConfig(), **{**QUICK, "preset": "quick", **given})
    return replace(TrainConfig(), **given)


# What --init takes from its checkpoint unless given: the network and how images meet it.
INIT_SETTINGS = ("features", "depth", "dropout", "block", "fit", "input_size")


def init_settings(path: str) -> dict[str, Any]:
    """The settings of :data:`INIT_SETTINGS` that the checkpoint at ``path`` was trained with (its
    ``meta["args"]``, else ``meta["model"]``), so ``--init FILE`` alone builds FILE's network;
    CheckpointError (one line) when the file is not a readable single-model checkpoint."""
    checkpoint = load_checkpoint(path)
    if checkpoint.meta.get("members") is not None:
        raise CheckpointError(f"{checkpoint.path} is an ensemble of {len(checkpoint.meta['members'])} models; "
                              "give --init one model, e.g. a run's best.npz")
    args = checkpoint.meta.get("args")
    saved = {**(checkpoint.meta.get("model") or {}), **{k: checkpoint.meta[k] for k in ("fit", "input_size")
                                                          if k in checkpoint.meta}}
    if isinstance(args, dict):
        saved = {**saved, **args}
    settings = {key: saved[key] for key in INIT_SETTINGS if saved.get(key) is not None}
    if isinstance(settings.get("dropout"), list):
        settings["dropout"] = tuple(settings["dropout"])
    return settings


def config_from_args(args: Any, where: Path) -> TrainConfig:
    """The TrainConfig stored in a checkpoint's ``meta["args"]``."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{where} holds no training settings (meta 'args'); it was not written by "
                              "train.py: start a new run instead of resuming")
    known = {f.name for f in fields(TrainConfig)}
    values = {key: value for key, value in args.items() if key in known}
    for name in ("dropout", "augment"):  # JSON keeps tuples as lists
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
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
    need(config.depth <= MAX_DEPTH, "depth", f"it must be at most {MAX_DEPTH} (the image is halved at every level)")
    need(config.features * 2 ** config.depth <= MAX_WIDTH, "features", f"with --depth {config.depth} the bridge "
         f"would have {config.features * 2 ** config.depth} filters (features * 2**depth); at most {MAX_WIDTH}")
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
    need(_is_int(config.input_size) and 1 <= config.input_size <= MAX_INPUT_SIZE, "input_size",
         f"it must be a whole number from 1 to {MAX_INPUT_SIZE}")
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
    need(isinstance(config.augment, tuple) and all(name in AUGMENTATIONS for name in config.augment)
         and len(set(config.augment)) == len(config.augment), "augment",
         f"give each of {', '.join(AUGMENTATIONS)} at most once, comma-separated")
    need(config.loss_region in LOSS_REGIONS, "loss_region", f"choose one of {', '.join(LOSS_REGIONS)}")
    if config.loss_region == "central" and config.fit != "pad":
        raise ConfigError(f"--loss-region central needs --fit pad: with --fit {config.fit} every pixel of the "
                          "network input is the image's, there is no padded border to leave out")
    need(config.schedule in SCHEDULES, "schedule", f"choose one of {', '.join(SCHEDULES)}")
    need(_is_int(config.cycle) and config.cycle >= 1, "cycle", "it must be a whole number >= 1")
    need(_is_int(config.ensemble_size) and (config.ensemble_size == 0 or config.ensemble_size >= 2), "ensemble_size",
         "give 2 or more (the last that many snapshots) or 0 (all of them)")
    for name, what in COSINE_ONLY.items():
        if getattr(config, name) and config.schedule != "cosine":
            raise ConfigError(f"{flag(name)} needs --schedule cosine: with --schedule {config.schedule} there are "
                              f"{what}")
    need(_is_int(config.folds) and 1 <= config.folds <= 20, "folds", "it must be a whole number from 1 (no "
         "cross-validation) to 20")
    need(config.fold is None or (_is_int(config.fold) and 0 <= config.fold < config.folds), "fold",
         f"it must be a fold number from 0 to {config.folds - 1} (with --folds {config.folds})")
    need(isinstance(config.mask_suffix, str) and "/" not in config.mask_suffix, "mask_suffix",
         "it must be the end of a file name, e.g. _mask")
    need(config.mask_threshold is None or (_is_number(config.mask_threshold) and 0 <= config.mask_threshold < 1),
         "mask_threshold", "it must be in [0, 1), e.g. 0.5 (a share of the mask's full scale)")
    need(config.threads is None or (_is_int(config.threads) and config.threads >= 1), "threads",
         "it must be a whole number >= 1 (or leave it out to use every core)")
