"""The data of a training run: found (or generated), checked, subset, split, fitted to the network and
moved to its device once, before the first epoch.

    path = resolve_data(config, print)                 # --data, ./data/..., or the synthetic set
    prep = prepare_data(config, path, xp, np.float32)  # -> Prepared
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
from tinyunet.transforms import augment_hflip

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
