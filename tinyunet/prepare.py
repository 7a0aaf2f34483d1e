"""The data of a training run: found (or generated), checked, subset, split, fitted to the network and
moved to its device once, before the first epoch.

    path = resolve_data(config, print)                 # --data, ./data/..., or the synthetic set
    prep = prepare_data(config, path, xp, np.float32)  # -> Prepared
    split = load_split(config, path)                   # -> Split: the same images and split, unfitted

A set of mixed sizes stays a list of images (:mod:`tinyunet.transforms`) until it is fitted; its
validation masks then sit on one canvas, background around each (the scores count pixels per image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyunet.backend import as_array
from tinyunet.config import TrainConfig, found_data
from tinyunet.data import (DataError, check_finite, coverage, coverage_class, fingerprint, load_train,
                           stratified_folds, stratified_split)
from tinyunet.pipeline import to_network
from tinyunet.transforms import augment_hflip, canvas, channels, take

SYNTHETIC_DIR = Path("data/synthetic")  # generated here (once) when no data is found
SYNTHETIC_SIZE = {"n_train": 4000, "n_test": 200}  # images written into SYNTHETIC_DIR (19-20 s measured on 2 cores)


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
class Split:
    """A run's labelled images, checked, subset (``limit``) and split, at their own sizes (on the host)."""

    ids: list[str]  # every image used, sorted
    images: Any  # (N, H, W[, C]) float32, or a list of (H, W[, C]) when sizes differ
    masks: Any  # (N, H, W) float32 in {0, 1}, or a list of (H, W)
    fingerprint: str
    train_idx: np.ndarray  # indices into ids
    val_idx: np.ndarray
    coverage: np.ndarray = field(repr=False)  # (N,) of every image used


def split_indices(config: TrainConfig, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of images with coverages ``cov``: the run's stratified split, or with
    ``config.fold`` set that fold of the k-fold split."""
    if config.fold is None:
        return stratified_split(coverage_class(cov), config.val_split, config.seed)
    return stratified_folds(coverage_class(cov), config.folds, config.seed)[config.fold]


def load_split(config: TrainConfig, path: Path) -> Split:
    """Load and check the labelled images at ``path`` and split them as a run with ``config`` does."""
    def choose(n: int) -> np.ndarray:  # --limit: a subset chosen by the seed before any image is decoded
        if config.limit is None or config.limit >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(config.seed).choice(n, config.limit, replace=False))

    data = load_train(path, config.mask_suffix, config.mask_threshold, choose)
    ids, images, masks = data.ids, data.images, data.masks
    for image in (images if isinstance(images, list) else [images]):
        check_finite(image, f"the images of {path}")
    if len(ids) < 2:
        raise DataError(f"{path} holds {len(ids)} training image(s): training needs at least 2 "
                        "(one for training, one for validation)")
    cov = coverage(masks)
    train_idx, val_idx = split_indices(config, cov)
    return Split(ids=ids, images=images, masks=masks, fingerprint=fingerprint(ids, images, masks),
                 train_idx=train_idx, val_idx=val_idx, coverage=cov)


@dataclass
class Prepared:
    """The data of a run, split, fitted to the network and (for training) on the model's device."""

    ids: list[str]  # every image used, sorted
    fingerprint: str
    channels: int  # image channels: the network's input channels (1 for gray)
    train_idx: np.ndarray  # indices into ids
    val_idx: np.ndarray
    x_train: Any  # (2N or N, S, S', C) on the device, flips appended
    y_train: Any  # (.., S, S', 1) soft targets in [0, 1]
    train_box: Any  # what undoes the training images' fit, before any mirror (as box)
    x_val: Any  # (M, S, S', C) on the device
    y_val: Any
    box: Any  # what undoes the validation images' fit (pad: the crop box, or one per image; resize: None)
    val_images: Any  # (M, H, W[, C]) at the original size (a list when sizes differ), on the device
    val_sizes: Any  # (H, W) of the validation images, or a list of them when sizes differ
    val_truth: Any  # (M, H, W) bool on the device; for mixed sizes on one canvas, background around each
    coverage: np.ndarray = field(repr=False)  # (N,) of every image used


def prepare_data(config: TrainConfig, path: Path, xp, dtype) -> Prepared:
    """Load, check, subset, split, fit and move the data to the device (once)."""
    split = load_split(config, path)
    images, masks, train_idx, val_idx = split.images, split.masks, split.train_idx, split.val_idx
    train_images = take(images, train_idx)
    x_train, train_box = to_network(train_images, config.fit, config.input_size, config.depth)  # (N, S, S', C)
    y_train, _ = to_network(take(masks, train_idx), config.fit, config.input_size, config.depth)
    if config.flip and config.flip_mode == "double":
        x_train, y_train = augment_hflip(x_train, y_train)  # (2N, S, S', C): originals, then mirrors
    val_images, val_masks = take(images, val_idx), take(masks, val_idx)
    x_val, box = to_network(val_images, config.fit, config.input_size, config.depth)
    y_val, _ = to_network(val_masks, config.fit, config.input_size, config.depth)

    def dev(a):
        if isinstance(a, list):
            return [dev(item) for item in a]
        return as_array(np.ascontiguousarray(a, dtype=dtype), xp)

    sizes = [m.shape for m in val_masks] if isinstance(val_masks, list) else val_masks.shape[1:]
    return Prepared(ids=split.ids, fingerprint=split.fingerprint, channels=channels(images), train_idx=train_idx,
                    val_idx=val_idx, x_train=dev(x_train), y_train=dev(y_train), train_box=train_box,
                    x_val=dev(x_val), y_val=dev(y_val), box=box, val_images=dev(val_images), val_sizes=sizes,
                    val_truth=as_array(canvas(val_masks) > 0.5, xp), coverage=split.coverage)
