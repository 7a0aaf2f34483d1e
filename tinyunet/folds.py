"""k-fold cross-validation: one training run per fold, scored and tuned on out-of-fold predictions.

    python train.py --data DIR --folds 5 --out runs/cv5

writes ``runs/cv5/fold1`` ... ``fold5``, each an ordinary run folder whose validation part is one
fold of a k-fold split stratified by coverage class (:func:`tinyunet.data.stratified_folds`), so
every image is validated on exactly once. Then:

* every fold's best model predicts its own validation images: the *out-of-fold* probabilities of
  the whole set;
* the threshold (and, with ``empty_rule``, the minimum area) is tuned on them, and their score at it
  is the cross-validation score;
* the k best models become ``ensemble.npz`` (:mod:`tinyunet.ensemble`) with that threshold, which
  predict.py averages at test time.

Each fold resumes like any run: starting the same command again finishes the folds that were cut
short (from their last.npz) and skips the finished ones.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tinyunet.backend import as_numpy
from tinyunet.checkpoint import load_checkpoint
from tinyunet.ensemble import save_ensemble
from tinyunet.models import load_model
from tinyunet.parallel import DataParallel
from tinyunet.pipeline import probabilities
from tinyunet.config import TrainConfig, build_config, validate
from tinyunet.prepare import load_split, resolve_data, split_indices
from tinyunet.runs import new_run_folder
from tinyunet.transforms import as_stack, canvas, take
from tinyunet.training import EVAL_BATCH, say, train, tune_postprocessing


def _finished(folder: Path) -> bool:
    """Whether the fold's run got through its threshold sweep (best.npz records its score)."""
    best = folder / "best.npz"
    return best.is_file() and load_checkpoint(best).meta.get("val_score") is not None


def train_folds(config: TrainConfig) -> Path:
    """Train ``config.folds`` runs, tune on their out-of-fold predictions, write ensemble.npz; return
    the folder holding them."""
    validate(config)
    root = Path(config.out) if config.out is not None else new_run_folder()
    root.mkdir(parents=True, exist_ok=True)
    folders = [root / f"fold{k + 1}" for k in range(config.folds)]
    for k, folder in enumerate(folders):
        say(f"=== fold {k + 1} of {config.folds}: {folder}")
        if _finished(folder):
            say("finished already")
        elif (folder / "last.npz").is_file():
            train(build_config({"resume": str(folder), "epochs": config.epochs}))
        else:
            train(replace(config, fold=k, out=str(folder)))

    # The out-of-fold probabilities: every image predicted by the one model that never trained on it.
    split = load_split(replace(config, fold=0), resolve_data(config, say))  # every image, read once
    oof, members, scores = {}, [], []  # oof: image index -> (H, W) at the image's own size
    for k, folder in enumerate(folders):
        model, best = load_model(folder / "best.npz", gpu=config.gpu)
        _, val_idx = split_indices(replace(config, fold=k), split.coverage)
        probs = probabilities(DataParallel(model, config.threads), take(split.images, val_idx), config.fit,
                              config.input_size, batch_size=EVAL_BATCH, tta=config.tta)  # (M, H, W) or a list
        oof.update((int(i), as_numpy(p)) for i, p in zip(val_idx, probs))
        members.append(best)
        scores.append(float(best.meta["val_score"]))
    order = sorted(oof)
    oof = canvas(as_stack([oof[i] for i in order]))  # (N, H, W), every image once
    truth = canvas(take(split.masks, order)) > 0.5
    min_area, threshold, score, _, _ = tune_postprocessing(truth, oof, config)
    cv = {"folds": config.folds, "fold_scores": scores, "cv_score": score}
    save_ensemble(root / "ensemble.npz", members, {**members[0].meta, "best_threshold": threshold, "val_score": score,
                                                   "min_area": min_area, "tta": config.tta, "cv": cv})
    (root / "cv.json").write_text(json.dumps({**cv, "best_threshold": threshold, "min_area": min_area}, indent=2))
    say(f"cross-validation over {config.folds} folds: out-of-fold competition score {score:.4f} at threshold "
         f"{threshold:.3f}, min area {min_area} (each fold's own tuned score: "
         + ", ".join(f"{s:.4f}" for s in scores) + f"); the {config.folds} models are {root / 'ensemble.npz'}")
    return root

