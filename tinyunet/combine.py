"""Combine trained models into one ensemble, tuned on the validation split they share.

    python -m tinyunet.combine runs/a/ensemble.npz runs/b/best.npz runs/b/snapshot02.npz --out runs/mix.npz

Every input is a model or an ensemble (taken apart into its members). They must have learnt from the
same data (its fingerprint) under the same split (``seed``, ``val_split``, ``folds``/``fold``,
``limit``) and fit images the same way: then no member has seen the validation images, and their
mean probability there tunes the threshold (and with ``--empty-rule`` the minimum area), as train.py
tunes a run's snapshots. The result is an ordinary ensemble file for predict.py; each member's own
tuned score and the ensemble's are printed. Choosing members by these scores tunes on validation
too: the ensemble's score is not a held-out estimate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from tinyunet.backend import as_numpy
from tinyunet.checkpoint import CheckpointError
from tinyunet.config import SPLIT_SETTINGS, ConfigError, TrainConfig, config_from_args
from tinyunet.data import DataError
from tinyunet.ensemble import Ensemble, mean_probability, save_ensemble, split_members
from tinyunet.models import for_inference, load_model
from tinyunet.pipeline import probabilities
from tinyunet.prepare import load_split
from tinyunet.training import EVAL_BATCH, tune_postprocessing
from tinyunet.transforms import canvas, take

SHARED = ("fit", "input_size")  # how images meet every member: one geometry for the whole ensemble


def _members(paths: list[str]) -> list[tuple]:
    """(model, checkpoint) of every member of the given files, in order, each loaded with every check
    predict.py makes; an ensemble file gives all of its own."""
    members = []
    for path in paths:
        model, ckpt = load_model(path)
        if isinstance(model, Ensemble):
            members += list(zip(model.members, split_members(ckpt)))
        else:
            members.append((model, ckpt))
    return members


def _settings(member) -> TrainConfig:
    """The training settings a member records; CheckpointError when it records none."""
    return config_from_args(member.meta.get("args"), member.path)


def _check_shared(members: list) -> None:
    """CheckpointError unless every member has the first one's geometry, data and split."""
    first, first_args = members[0], _settings(members[0])
    for member in members[1:]:
        args = _settings(member)
        differ = [key for key in SHARED if member.meta.get(key) != first.meta.get(key)]
        differ += [key for key in SPLIT_SETTINGS if getattr(args, key) != getattr(first_args, key)]
        if member.meta.get("data", {}).get("fingerprint") != first.meta.get("data", {}).get("fingerprint"):
            differ.append("data")
        if differ:
            raise CheckpointError(f"{member.path} and {first.path} differ in {', '.join(differ)}: an ensemble is "
                                  "tuned on one validation split that none of its members trained on; combine "
                                  "models trained on the same data with the same split (seed, val_split, folds) "
                                  "and fit")


def _mean_of(member_probs: list, chosen: list[int]):
    """The mean probability of the chosen members, leaving every member's map as it was."""
    return mean_probability([member_probs[chosen[0]].copy(), *(member_probs[k] for k in chosen[1:])])


def select_members(truth, member_probs: list, config: TrainConfig, most: int, say=print) -> list[int]:
    """Greedy forward selection of ensemble members (Caruana et al. 2004, without replacement): the best
    member alone first, then, one at a time, the member whose addition gives the mean probability the
    highest validation score (threshold and minimum area tuned each time, as for the ensemble); it stops
    at ``most`` members or when no addition raises the score. Returns the chosen indices, ascending."""
    def score(chosen):
        return tune_postprocessing(truth, _mean_of(member_probs, chosen), config)[2]

    chosen, best = [], -1.0
    while len(chosen) < min(most, len(member_probs)):
        rest = [k for k in range(len(member_probs)) if k not in chosen]
        top, k = max(((score(chosen + [k]), k) for k in rest), key=lambda pair: pair[0])  # first of equals
        if top <= best:
            say(f"no other member raises the validation score above {best:.4f}: {len(chosen)} chosen")
            break
        chosen, best = chosen + [k], top
        say(f"chose member {k + 1} ({len(chosen)} of at most {most}): validation score {top:.4f}")
    return sorted(chosen)


def combine(paths: list[str], out: str, tta: bool | None = None, empty_rule: bool | None = None,
            threads: int | None = None, data: str | None = None, max_members: int | None = None,
            say=print) -> tuple[Path, float]:
    """Write the ensemble of every model in ``paths`` to ``out``, tuned on their validation split;
    return its path and validation score. ``tta`` and ``empty_rule`` default to the first member's
    training settings; ``data`` replaces the data folder they record (moved data); ``max_members``
    keeps at most that many, chosen by :func:`select_members` on the same validation images."""
    if len(paths) < 1:
        raise ConfigError("give at least one model to combine")
    if max_members is not None and max_members < 1:
        raise ConfigError(f"--max-members {max_members}: give a whole number >= 1")
    if Path(out).resolve() in {Path(p).resolve() for p in paths}:
        raise ConfigError(f"--out {out} is one of the models being combined: choose another file")
    members = _members(paths)
    checkpoints = [ckpt for _, ckpt in members]
    _check_shared(checkpoints)
    first = checkpoints[0]
    config = _settings(first)
    config = replace(config, tta=config.tta if tta is None else tta,
                     empty_rule=config.empty_rule if empty_rule is None else empty_rule, threads=threads,
                     data=data or config.data)
    split = load_split(config, Path(config.data))
    if split.fingerprint != first.meta.get("data", {}).get("fingerprint"):
        raise DataError(f"the data at {config.data} (fingerprint {split.fingerprint}) is not the data the models "
                        "learnt from: give their data with --data")
    images = take(split.images, split.val_idx)
    truth = canvas(take(split.masks, split.val_idx)) > 0.5  # (M, H, W); mixed sizes on one canvas
    fit, size = first.meta["fit"], first.meta.get("input_size", 0)
    say(f"scoring {len(members)} model(s) on the {len(split.val_idx)} validation images of {config.data}"
        f"{' with flip TTA' if config.tta else ''}, one after another")  # said before the slow part

    member_probs = []
    for model, ckpt in members:  # each member's validation probabilities (M, H, W), scored alone
        probs = as_numpy(canvas(probabilities(for_inference(model, threads), images, fit, size,
                                              batch_size=EVAL_BATCH, tta=config.tta)))
        min_area, threshold, score, _, _ = tune_postprocessing(truth, probs, config)
        member_probs.append(probs)
        say(f"member {len(member_probs)}: {ckpt.path} (epoch {ckpt.meta.get('epoch', '?')}): validation score "
            f"{score:.4f} at threshold {threshold:.3f}, min area {min_area}")
    chosen = list(range(len(members)))
    if max_members is not None and max_members < len(members):
        chosen = select_members(truth, member_probs, config, max_members, say)
    min_area, threshold, score, _, _ = tune_postprocessing(truth, _mean_of(member_probs, chosen), config)
    as_float32 = [replace(ckpt, params={k: a.astype(np.float32) for k, a in ckpt.params.items()},
                          buffers={k: a.astype(np.float32) for k, a in ckpt.buffers.items()})
                  for ckpt in (checkpoints[k] for k in chosen)]  # one dtype for the file, whatever each was
    path = save_ensemble(out, as_float32, {**first.meta, "best_threshold": threshold, "val_score": score,
                                           "min_area": min_area, "tta": config.tta,
                                           "combined_from": [str(p) for p in paths],
                                           **({"chosen_members": [k + 1 for k in chosen]}
                                              if len(chosen) < len(members) else {})})
    say(f"ensemble of {len(chosen)}: validation score {score:.4f} at threshold {threshold:.3f}, min area "
        f"{min_area} ({len(split.val_idx)} validation images{', flip TTA' if config.tta else ''}); saved {path}")
    return path, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyunet.combine", allow_abbrev=False,
                                     description="Combine trained models (best.npz, snapshots, ensembles) into one "
                                                 "ensemble, tuned on the validation split they share.")
    parser.add_argument("models", nargs="+", help="checkpoints written by train.py")
    parser.add_argument("--out", required=True, help="the ensemble file to write, e.g. runs/mix.npz")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image with its mirror (default: as the first model was trained)")
    parser.add_argument("--empty-rule", action=argparse.BooleanOptionalAction, default=None,
                        help="also tune a minimum predicted area (default: as the first model was trained)")
    parser.add_argument("--threads", type=int, help="CPU threads sharing every batch (default: every usable core)")
    parser.add_argument("--data", help="the models' data, where it lies now (default: the folder they record)")
    parser.add_argument("--max-members", type=int, metavar="K",
                        help="keep at most K members, chosen greedily by the validation score (default: all)")
    args = parser.parse_args(argv)
    try:
        combine(args.models, args.out, args.tta, args.empty_rule, args.threads, args.data, args.max_members)
    except (CheckpointError, ConfigError, DataError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
