"""The two command lines, ``train`` and ``predict``: argparse and one call into the package each.

    python train.py [flags]     or  tinyunet-train [flags]      -> tinyunet.training.train
    python predict.py [flags]   or  tinyunet-predict [flags]    -> tinyunet.prediction.predict

Every flag has ``help=``; abbreviations are refused (``--epoch 3`` is an error, not ``--epochs 3``).
A mistake a user can fix ends with one line ``error: ...`` on stderr and exit status 2; ``--debug``
shows the traceback instead. The package is imported after parsing, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2  # bad input a user can fix (flags, data, checkpoints, GPU)


def _prog(name: str) -> str:
    """How the user started the command: ``train.py`` or ``tinyunet-train``."""
    return Path(sys.argv[0]).name if Path(sys.argv[0]).name in (f"{name}.py", f"tinyunet-{name}") else f"{name}.py"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2 like every other mistake."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------

def predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_prog("predict"), allow_abbrev=False, description="Predict salt masks with a trained tinyunet model and write a Kaggle "
                            "submission (or score a labelled set with --evaluate).")
    p.add_argument("--model", default=None,
                   help="checkpoint to use (default: runs/<name in runs/latest>/best.npz, the newest "
                        "training run's best model)")
    p.add_argument("--data", default=None,
                   help="data folder or competition zip in Kaggle's layout (default: the data the "
                        "checkpoint was trained on)")
    p.add_argument("--out", default="submission.csv",
                   help="submission CSV to write (default: submission.csv)")
    p.add_argument("--gpu", action="store_true", help="predict on the GPU with CuPy")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads sharing every batch (default: every usable core)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass (default: 32)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average with the prediction of the mirrored image "
                        "(default: as the checkpoint records, off when it records nothing)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability above which a pixel is salt, in [0, 1] (default: the "
                        "checkpoint's best threshold, else 0.5)")
    p.add_argument("--save-masks", metavar="DIR", default=None,
                   help="also save the predicted masks as <id>.png (8-bit, 0/255) in DIR")
    p.add_argument("--preview", metavar="PNG", default=None,
                   help="preview grid of inputs, probabilities and masks (default: <out "
                        "stem>_preview.png next to --out)")
    p.add_argument("--evaluate", action="store_true",
                   help="score the labelled train part of --data instead: print the competition "
                        "score, IoU, pixel accuracy and score per coverage class, and save "
                        "<out stem>_threshold.png; writes no submission")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback on errors")
    return p


def predict_main(argv: list[str] | None = None) -> int:
    """``python predict.py`` / ``tinyunet-predict``: the exit status (0, 2 for a user's mistake, 130 on Ctrl-C)."""
    args = predict_parser().parse_args(argv)
    from tinyunet.prediction import USER_ERRORS, predict  # after parsing, so --help stays fast

    try:
        predict(model=args.model, data=args.data, out=args.out, gpu=args.gpu, threads=args.threads,
                batch_size=args.batch_size, tta=args.tta, threshold=args.threshold,
                save_masks=args.save_masks, preview=args.preview, evaluate=args.evaluate)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted (a submission file is either complete or as it was before)",
              file=sys.stderr)
        return 130
    return 0
