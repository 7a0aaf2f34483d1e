"""What post-processing buys one trained model, measured on its own validation split.

    python -m benchmarks.ablate_postprocessing --model runs/<name>/best.npz     (or an ensemble.npz)

Rebuilds the model's validation part from the settings in its checkpoint (the same split, fold and
geometry as training), predicts it with and without flip TTA, and prints a markdown table of the
competition score: at threshold 0.5, at the tuned threshold, with TTA, with the empty-mask rule
(a minimum predicted area, tuned on the same images), and with both. Everything is tuned on the
validation images it is scored on, as train.py tunes best.npz: the table ranks the ingredients, it
is not a held-out estimate.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from tinyunet.config import config_from_args
from tinyunet.ensemble import Ensemble
from tinyunet.metrics import competition_score
from tinyunet.models import for_inference, load_model
from tinyunet.pipeline import probabilities
from tinyunet.prepare import load_split
from tinyunet.training import EVAL_BATCH, tune_postprocessing
from tinyunet.transforms import canvas, take

from benchmarks.common import add_threads_flag, machine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="a best.npz written by train.py")
    add_threads_flag(parser, "predict.py")
    args = parser.parse_args(argv)

    model, ckpt = load_model(args.model)
    net = for_inference(model, args.threads)  # as predict.py runs it
    config = config_from_args(ckpt.meta.get("args"), ckpt.path)
    split = load_split(config, config.data)  # the run's images and split, at their own sizes
    images = take(split.images, split.val_idx)
    truth = canvas(take(split.masks, split.val_idx)) > 0.5  # (M, H, W); mixed sizes on one canvas
    kind = f"an ensemble of {len(model.members)}" if isinstance(model, Ensemble) else "one model"
    print(f"# {args.model} ({kind}): {len(split.val_idx)} validation images; {machine()}")
    print("| post-processing | threshold | min area | validation score |")
    print("|---|---|---|---|")
    for tta in (False, True):
        probs = canvas(probabilities(net, images, config.fit, config.input_size, batch_size=EVAL_BATCH, tta=tta))
        name = "flip TTA" if tta else "none"
        if not tta:
            plain = competition_score(truth, probs > np.float32(0.5))
            print(f"| {name}, threshold 0.5 | 0.500 | 0 | {plain:.4f} |")
        for rule in (False, True):
            area, threshold, score, _, _ = tune_postprocessing(truth, probs, replace(config, empty_rule=rule))
            label = name + (", empty-mask rule" if rule else "") + ", tuned threshold"
            print(f"| {label} | {threshold:.3f} | {area} | {score:.4f} |")


if __name__ == "__main__":
    main()
