"""Export a trained model for shipping: only what predict.py needs, optionally stored as float16.

    python -m tinyunet.export runs/<name>/best.npz models/tgs-salt.npz --float16

Keeps the weights and buffers of the model (or of every ensemble member) and the metadata predict
applies: the model settings, the geometry (``fit``, ``input_size``), ``best_threshold``, ``min_area``,
``tta``, the validation score, the training settings and data fingerprint (so the validation split
can be rebuilt). Drops the optimizer state, the epoch-by-epoch history and the callbacks' counters.
float16 halves the file; :func:`tinyunet.models.load_model` widens the arrays back to float32, so
the network computes in float32 as trained: only the weights are rounded.

``--member K`` writes the K-th model (from 1) of an ensemble file alone, e.g. to fine-tune it with
``train.py --init``; it keeps the ensemble's threshold and post-processing (tuned for the mean of all
members, not for this one: ``python -m tinyunet.combine`` on the one file tunes its own), drops the
ensemble's validation score and keeps the member's own epoch where the file records it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from tinyunet.checkpoint import CheckpointError, save_checkpoint
from tinyunet.ensemble import split_members
from tinyunet.models import load_model

DROPPED = ("history", "callbacks")  # metadata only training and --resume read


def export(source: str | os.PathLike, target: str | os.PathLike, float16: bool = False,
           member: int | None = None) -> Path:
    """Write ``target`` from the checkpoint ``source`` (checked by loading it as a model first); with
    ``member``, only that model (from 1) of the ensemble ``source``."""
    _, ckpt = load_model(source)  # the same checks as predict.py: a file that would not predict is refused
    if Path(target).resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{target} is the checkpoint being exported: choose another output file")
    if member is not None:
        ckpt = _member(ckpt, member)

    def stored(arrays: dict) -> dict:
        return {name: a.astype(np.float16) if float16 else a for name, a in arrays.items()}

    meta = {key: value for key, value in ckpt.meta.items() if key not in DROPPED}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(target, stored(ckpt.params), meta, buffers=stored(ckpt.buffers))


def _member(ckpt, k: int):
    """The k-th member (from 1) of the ensemble checkpoint ``ckpt`` as a checkpoint of one model."""
    count = len(ckpt.meta.get("members") or [])
    if not count:
        raise CheckpointError(f"{ckpt.path} is one model, not an ensemble: export it without --member")
    if not 1 <= k <= count:
        raise CheckpointError(f"--member {k} is out of range: {ckpt.path} is an ensemble of {count} models "
                              f"(give 1 to {count})")
    one = split_members(ckpt)[k - 1]
    meta = {key: value for key, value in one.meta.items() if key not in ("members", "member_epochs", "val_score")}
    one.meta = {**meta, "member": {"of": str(ckpt.path), "index": k, "count": count}}
    return one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyunet.export", allow_abbrev=False,
                                     description="Export a trained model with only what predict.py needs.")
    parser.add_argument("source", help="a checkpoint written by train.py (best.npz, ensemble.npz)")
    parser.add_argument("target", help="the file to write, e.g. models/tgs-salt.npz")
    parser.add_argument("--float16", action="store_true", help="store the arrays as float16 (half the size)")
    parser.add_argument("--member", type=int, metavar="K", help="write only the K-th model (from 1) of an "
                        "ensemble file, e.g. to fine-tune it with train.py --init")
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.target, args.float16, args.member)
    except (CheckpointError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
