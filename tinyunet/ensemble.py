"""Ensembles: several trained U-Nets of one geometry whose probabilities are averaged.

    p(x) = (1/K) * sum_k sigmoid(model_k(x))

The members are snapshots of one run (one per cosine cycle) or the models of K folds. An
:class:`Ensemble` behaves like a model for prediction: ``forward(x)`` returns the logit of the mean
probability, so every prediction path (``pipeline.probabilities``, flips, pieces) treats one model
and many alike.

In a checkpoint file each member's arrays are stored under ``m<k>/`` (``param/m0/enc1.conv1.W``,
``buffer/m1/enc1.bn1.moving_mean``, ...), and ``meta["members"]`` lists each member's model settings
(``meta["model"]``) in order and ``meta["member_epochs"]`` the epoch each was saved at; the rest of
the metadata (threshold, minimum area, TTA, geometry) is the ensemble's own, with no ``epoch`` of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.checkpoint import Checkpoint, save_checkpoint
from tinyunet.layers import sigmoid


class Ensemble:
    """``members`` (UNets, or DataParallel wrappers of them) with one geometry; inference only."""

    def __init__(self, members: list):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)

    xp = property(lambda self: self.members[0].xp)
    dtype = property(lambda self: self.members[0].dtype)
    config = property(lambda self: self.members[0].config)
    threads = property(lambda self: getattr(self.members[0], "threads", 1))

    def forward(self, x, train: bool = False):
        """log(p / (1 - p)) of the members' mean probability p (N, H, W, 1); no training."""
        if train:
            raise RuntimeError("an Ensemble only predicts: train its members one by one")
        p = sigmoid(self.members[0].forward(x))
        xp = get_array_module(p)  # the members' device, whatever x came as
        for member in self.members[1:]:
            p += sigmoid(member.forward(x))
        p /= p.dtype.type(len(self.members))
        tiny = p.dtype.type(np.finfo(p.dtype).tiny)
        return xp.log(xp.maximum(p, tiny)) - xp.log(xp.maximum(1 - p, tiny))  # sigmoid() maps it back to p


def mean_probability(maps):
    """The mean of probability maps (M, H, W) given one after another (an iterable, so that only the
    sum and one map need be in memory); the sum is taken in the first map."""
    maps = iter(maps)
    mean, count = next(maps), 1
    for p in maps:
        mean += p
        count += 1
    mean /= mean.dtype.type(count)
    return mean


def member_prefix(k: int) -> str:
    return f"m{k}/"


# one model's own metadata, never an ensemble's: its history, counters, settings, threshold sweep and epoch
MEMBER_ONLY = ("history", "callbacks", "model", "members", "member_epochs", "threshold_sweep", "epoch")


def save_ensemble(path: str | os.PathLike, members: list[Checkpoint], meta: dict) -> Path:
    """One checkpoint holding every member's parameters and buffers, and ``meta`` with ``members``
    (each member's ``meta["model"]``) and ``member_epochs``; the keys of :data:`MEMBER_ONLY` in ``meta``
    (callers pass one member's metadata with the ensemble's threshold and scores over it) are left out."""
    params, buffers = {}, {}
    for k, member in enumerate(members):
        for store, arrays in ((params, member.params), (buffers, member.buffers)):
            for name, value in arrays.items():
                store[member_prefix(k) + name] = value
    meta = {**{key: value for key, value in meta.items() if key not in MEMBER_ONLY},
            "members": [dict(member.meta["model"]) for member in members],
            "member_epochs": [member.meta.get("epoch") for member in members]}
    return save_checkpoint(path, params, meta, buffers=buffers)


def split_members(ckpt: Checkpoint) -> list[Checkpoint]:
    """The members of an ensemble checkpoint, each as a Checkpoint of its own (arrays not copied), with
    its epoch where the file records it (ensembles written before ``member_epochs`` do not)."""
    out = []
    epochs = ckpt.meta.get("member_epochs") or []
    for k, config in enumerate(ckpt.meta["members"]):
        prefix = member_prefix(k)
        epoch = epochs[k] if k < len(epochs) else None

        def take(arrays):
            return {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}

        out.append(Checkpoint(path=ckpt.path, params=take(ckpt.params), buffers=take(ckpt.buffers),
                              meta={**{key: value for key, value in ckpt.meta.items() if key != "epoch"},
                                    "model": config, **({"epoch": epoch} if epoch is not None else {})},
                              optimizer_state=None))
    return out
