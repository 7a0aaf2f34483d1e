"""The two command lines, ``train`` and ``predict``: argparse and one call into the package each.

    python train.py [flags]     or  tinyunet-train [flags]      -> tinyunet.training.train
    python predict.py [flags]   or  tinyunet-predict [flags]    -> tinyunet.prediction.predict

Every flag has ``help=``; abbreviations are refused (``--epoch 3`` is an error, not ``--epochs 3``).
A mistake a user can fix ends with one line ``error: ...`` on stderr and exit status 2; ``--debug``
shows the traceback instead. So does running out of memory (with what to lower), a file the disk or
the system refuses (OSError), and a file nested too deep to parse (RecursionError). SIGTERM stops
either command as Ctrl-C does (exit status 143). The package is imported after parsing, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from tinyunet.augment import AUG_BRIGHT, AUG_CONTRAST, AUG_SCALE, AUG_SHIFT, AUGMENTATIONS
from tinyunet.blocks import BLOCKS
from tinyunet.config import (BEST, FLIP_MODES, LOSS_REGIONS, MONITORS, NAMED, QUICK, SCHEDULES, ConfigError,
                             TrainConfig, build_config, flag)
from tinyunet.losses import LOSSES
from tinyunet.pipeline import FITS, TILE

EXIT_USAGE = 2  # bad input a user can fix (flags, data, checkpoints, GPU)
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


@contextmanager
def _sigterm_as(exception: type[BaseException]):
    """Within the block SIGTERM raises ``exception`` (a KeyboardInterrupt), so it stops like Ctrl-C, and
    SIGINT raises KeyboardInterrupt:
    atomic writes clean up and the finished epochs are reported. Yields a list that is non-empty once
    SIGTERM has come."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise exception()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
        # Ctrl-C too, even where SIGINT came in ignored (a job started in the background of a
        # non-interactive shell inherits that, and Python then never raises KeyboardInterrupt)
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (train_main called from a thread): leave the signals as they are
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _one_line(err: BaseException, what: str) -> str:
    """``error: ...`` for what escapes the named errors: out of memory, an OSError, a RecursionError."""
    if isinstance(err, MemoryError):
        asked = f" ({' '.join(str(err).split())})" if str(err) else ""
        return f"error: out of memory{asked}: lower {what}"
    if isinstance(err, RecursionError):
        return "error: an input nests too deeply to read (RecursionError); check the files given"
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    return f"error: cannot use{where}: {err.strerror or err}; check free space and permissions there"


def _prog(name: str) -> str:
    """How the user started the command: ``train.py`` or ``tinyunet-train``."""
    return Path(sys.argv[0]).name if Path(sys.argv[0]).name in (f"{name}.py", f"tinyunet-{name}") else f"{name}.py"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2 like every other mistake."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

def _shown(value) -> str:
    """A setting's value as it is typed on the command line: (0.0, 0.0) -> '0,0'."""
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _typed(name: str, value) -> str:
    """A setting as a flag: ('epochs', 13) -> '--epochs 13', ('flip', False) -> '--no-flip'."""
    if isinstance(value, bool):
        return flag(name) if value else "--no-" + flag(name)[2:]
    return f"{flag(name)} {_shown(value)}"


def _default(name: str) -> str:
    """'(default: 40; quick: 12)': the recipe's default, and the quick run's when it differs."""
    value = getattr(TrainConfig(), name)
    text = f"default: {value}"
    if name in BEST:
        text += f"; --recipe best: {_shown(BEST[name])}"
    if name in QUICK:
        text += f"; quick run on the synthetic set: {_shown(QUICK[name])}"
    return f"({text})"


def _rates(text: str) -> tuple[float, ...]:
    """'0.25,0.3,0.4,0.5' -> (0.25, 0.3, 0.4, 0.5)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates, "
                                         "e.g. 0.25,0.3,0.4,0.5") from None


def _augmentations(text: str) -> tuple[str, ...]:
    """'scale,shift' -> ('shift', 'scale'): once each, in the order they apply; 'none' -> ()."""
    names = [] if text == "none" else [part.strip() for part in text.split(",")]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not an augmentation: give some of "
                                         f"{','.join(AUGMENTATIONS)}, comma-separated, or none")
    return tuple(name for name in AUGMENTATIONS if name in names)


def parse_train_args(argv: list[str] | None = None) -> tuple[dict, bool]:
    """The flags actually given, as TrainConfig field -> value, and --debug."""
    quick = ", ".join(_typed(key, value) for key, value in QUICK.items())
    parser = _Parser(
        prog=_prog("train"),
        description="Train the seed U-Net for binary segmentation (the TGS Salt recipe) and write a run "
                    "folder: best.npz, last.npz, history.csv and plots.",
        epilog="Defaults: the seed recipe (Adam 1e-3, batch 8, 40 epochs, resize 101->128, early stopping 7, "
               "reduce LR x0.1 after 5, min 1e-5). With no --data and no data under ./data, the built-in "
               f"synthetic set is generated into ./data/synthetic and the QUICK defaults apply: {quick} "
               "(4000 training images, 101->64 resize, no flips, no dropout); any flag overrides them.",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach build_config
        allow_abbrev=False,  # --epoch 3 is an error, not a silent --epochs 3
    )
    parser.add_argument("--recipe", dest="preset", choices=("seed", *NAMED), help="the defaults: "
                        "'seed', the walkthrough's recipe (0.725 here); 'best', the first command of the measured "
                        "best of docs/accuracy.md, and 'finetune' its second, from the first's model (--init "
                        "RUN/best.npz: Lovasz, 60 epochs of cosine restarts at 2e-4 every 12, the last 4 snapshots "
                        "averaged; 0.80 here) "
                        "(every flag below still overrides them; default: seed, or the quick run when there is "
                        "no data)")
    parser.add_argument("--data", help="folder or zip: a plain DATA/images + DATA/masks pair matched by name, "
                        "or Kaggle's layout (train/images, train/masks, train.csv, test/images) or the "
                        "competition's zip; default: ./data/tgs-salt-identification-challenge.zip or "
                        "./data/tgs-salt if present, else the built-in synthetic set")
    parser.add_argument("--mask-suffix", help="a plain layout's mask names: the image's name plus this "
                        "(images/cat_01.jpg <-> masks/cat_01_mask.png with --mask-suffix _mask; default: none)")
    parser.add_argument("--mask-threshold", type=float, help="binarise soft masks: foreground where the value, "
                        "as a share of the mask's full scale, is above this (e.g. 0.5; default: any value > 0, "
                        "and a mask with more than two values is refused)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU with CuPy (default: CPU, NumPy)")
    parser.add_argument("--threads", type=int, help="CPU threads sharing every batch, each running the whole "
                        "network on its share (default: every usable core; results differ slightly with the "
                        "thread count, as dropout masks are drawn per thread)")
    parser.add_argument("--epochs", type=int, help=f"total number of epochs, counting those a resumed run "
                        f"already did {_default('epochs')}")
    parser.add_argument("--batch-size", type=int, help=f"images per training step {_default('batch_size')}")
    parser.add_argument("--features", type=int, help=f"filters of the top level, doubled per level down "
                        f"{_default('features')}")
    parser.add_argument("--depth", type=int, help=f"levels down and up {_default('depth')}")
    parser.add_argument("--dropout", type=_rates, metavar="RATES", help="dropout rate per level, top level "
                        "first, comma-separated, one per level (default: 0.25,0.3,0.4,0.5 at depth 4; other "
                        f"depths cut it, or extend it with 0.5; quick run on the synthetic set: "
                        f"{_shown(QUICK['dropout'])})")
    parser.add_argument("--block", choices=BLOCKS, help="each level's two convolutions: 'double' conv-ReLU x2 "
                        "(the seed), 'double_bn' conv-BN-ReLU x2, 'residual' a ResNet block (conv-BN-ReLU, "
                        f"conv-BN, + shortcut, ReLU) {_default('block')}")
    parser.add_argument("--loss", choices=list(LOSSES), help=f"the training loss {_default('loss')}")
    parser.add_argument("--loss2", choices=list(LOSSES), help="a second loss, from epoch --loss2-epoch on "
                        "(e.g. --loss bce --loss2 lovasz --loss2-epoch 25; default: none)")
    parser.add_argument("--loss2-epoch", type=int, help="the first epoch (counting from 1) trained with --loss2 "
                        f"{_default('loss2_epoch')}")
    parser.add_argument("--loss-region", choices=LOSS_REGIONS, help="which pixels the loss sees: 'all' of the "
                        "network input, or with --fit pad the 'central' ones only, the image itself (101x101 of "
                        "112x112 for TGS): its reflect-padded border gets no loss and no gradient, in training "
                        f"and in the validation loss {_default('loss_region')}")
    parser.add_argument("--monitor", choices=list(MONITORS), help="what early stopping, the best checkpoint and "
                        "the LR cut watch: val_loss (lower is better) or val_score (the competition score at "
                        f"threshold 0.5; higher is better; use it when the loss changes) {_default('monitor')}")
    parser.add_argument("--lr", type=float, help=f"Adam's learning rate {_default('lr')}; on --resume it "
                        "replaces the saved rate")
    parser.add_argument("--val-split", type=float, help=f"validation share, stratified by coverage class, "
                        f"in (0, 1) {_default('val_split')}")
    parser.add_argument("--folds", type=int, metavar="K", help="k-fold cross-validation instead of one split: "
                        "one run per fold in --out/fold1 ... foldK, then the out-of-fold predictions tune the "
                        "threshold and give the CV score, and the K models become --out/ensemble.npz "
                        f"{_default('folds')}")
    parser.add_argument("--seed", type=int, help=f"seed of the weights, split, shuffles and dropout "
                        f"{_default('seed')}")
    parser.add_argument("--out", help="run folder to write (default: runs/<YYYYmmdd-HHMMSS>); its parent "
                        "gets a 'latest' file naming it")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last.npz, "
                        "exactly where it stopped (its settings are reused; --epochs may raise the total)")
    parser.add_argument("--init", metavar="MODEL", help="start from the weights and BatchNorm statistics of "
                        "this checkpoint (a best.npz) instead of random ones, with a fresh optimizer, schedule and "
                        "epoch count: fine-tuning, e.g. with another loss or schedule; the model flags must "
                        "describe its network (default: random weights)")
    parser.add_argument("--fit", choices=FITS, help=f"how images meet the network: 'resize' to --input-size "
                        f"or reflect-'pad' to a multiple of 2**depth {_default('fit')}")
    parser.add_argument("--input-size", type=int, help=f"network input side for --fit resize, a multiple of "
                        f"2**depth {_default('input_size')}")
    parser.add_argument("--patience", type=int, help=f"early stopping: epochs without a better --monitor value "
                        f"{_default('patience')}")
    parser.add_argument("--lr-patience", type=int, help=f"reduce the learning rate after this many epochs "
                        f"without a better --monitor value {_default('lr_patience')}")
    parser.add_argument("--lr-factor", type=float, help=f"factor of that reduction, in (0, 1) "
                        f"{_default('lr_factor')}")
    parser.add_argument("--min-lr", type=float, help=f"the learning rate's floor {_default('min_lr')}")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="add (or, with --no-flip, do not add) the left-right mirror of every training image, "
                        "as --flip-mode says (default: add them; quick run on the synthetic set: not)")
    parser.add_argument("--schedule", choices=SCHEDULES, help="the learning rate: 'plateau' cuts it by "
                        "--lr-factor after --lr-patience flat epochs (the seed); 'cosine' anneals it from --lr to "
                        "--min-lr over every --cycle epochs, then restarts, saving snapshot<k>.npz at each cycle's "
                        f"end and, with two or more, ensemble.npz (give --patience of a cycle or more) "
                        f"{_default('schedule')}")
    parser.add_argument("--cycle", type=int, help=f"epochs per cosine cycle {_default('cycle')}")
    parser.add_argument("--ensemble-size", type=int, metavar="K", help="with --schedule cosine: ensemble.npz "
                        "averages the last K snapshots, e.g. to keep the file small and the early, weaker ones "
                        f"out; 0: all of them {_default('ensemble_size')}")
    parser.add_argument("--restart-optimizer", action=argparse.BooleanOptionalAction, help="with --schedule "
                        "cosine: at every restart Adam also starts afresh (moments and step count zeroed), as a "
                        "new --init run from the last snapshot would (default: off)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, help="tune the threshold on "
                        "validation predictions averaged with those of the mirrored images, and record it so "
                        "predict.py does the same (default: off; --recipe best: on)")
    parser.add_argument("--empty-rule", action=argparse.BooleanOptionalAction, help="also tune a minimum "
                        "predicted area on validation: a smaller predicted mask becomes empty (default: off; "
                        "--recipe best: on)")
    parser.add_argument("--flip-mode", choices=FLIP_MODES, help="'double': append every training image's "
                        "mirror (the seed); 'random': mirror each image of every batch with probability 1/2, "
                        f"so an epoch costs half {_default('flip_mode')}")
    parser.add_argument("--augment", type=_augmentations, metavar="LIST", help="augment every training batch, "
                        "redrawn each epoch from the seed (validation images never): comma-separated, any of "
                        f"'shift' (image and mask moved by up to {AUG_SHIFT * 100:g}%% of the side in whole pixels, "
                        f"the border reflect-filled), 'scale' (both zoomed x1-{1 + AUG_SCALE:g} about a random centre, "
                        f"bilinear, the mask re-binarised at 0.5), 'brightness' (per image x' = (x - mean) * c + mean "
                        f"+ b, c in [{1 - AUG_CONTRAST:g}, {1 + AUG_CONTRAST:g}], b in [-{AUG_BRIGHT:g}, "
                        f"{AUG_BRIGHT:g}], clipped to [0, 1]; images only); applied in that order after the "
                        "mirrors; a resumed run keeps them (default: none)")
    parser.add_argument("--limit", type=int, help="train on a random subset of this many images (by --seed) "
                        "(default: all)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it also hides itself when the output is not a terminal)")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="skip the PNG plots after training (default: write them)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = vars(parser.parse_args(argv))
    if args.get("preset") == "seed":
        args["preset"] = "recipe"  # the seed recipe is TrainConfig's own defaults
    debug = args.pop("debug", False)
    return args, debug


def train_main(argv: list[str] | None = None) -> int:
    """``python train.py`` / ``tinyunet-train``: the exit status (0, 2 for a user's mistake, 1 when the
    loss diverged, 130 on Ctrl-C)."""
    given, debug = parse_train_args(argv)
    # Imported after parsing, so --help stays fast and light.
    from tinyunet.backend import GPUUnavailableError
    from tinyunet.checkpoint import CheckpointError
    from tinyunet.data import DataError
    from tinyunet.runs import RunError
    from tinyunet.training import Terminated, TrainingDiverged, TrainingInterrupted, train

    try:
        with _sigterm_as(Terminated) as terminated:
            config = build_config(given)
            if config.folds > 1 and config.fold is None:
                from tinyunet.folds import train_folds

                train_folds(config)
            else:
                train(config)
    except (ConfigError, RunError, DataError, CheckpointError, GPUUnavailableError) as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as err:
        if debug:
            raise
        print(f"\n{err}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before training started (e.g. while reading the data)
        if debug:
            raise
        how = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        print(f"\n{how} before training started; no checkpoint was written or changed", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except (MemoryError, RecursionError, OSError) as err:
        if debug:
            raise
        print(_one_line(err, "--batch-size, --features or --input-size (or train on fewer images, --limit)"),
              file=sys.stderr)
        return EXIT_USAGE
    return 0


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------

def predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_prog("predict"), allow_abbrev=False, description="Predict masks with a trained tinyunet "
                "model: a preview, full-size mask PNGs, overlays, the Kaggle CSV for TGS-like data (or score a "
                "labelled set with --evaluate). Every output goes into one new folder.")
    p.add_argument("--model", default=None,
                   help="checkpoint to use (default: runs/<name in runs/latest>/best.npz, the newest "
                        "training run's best model)")
    p.add_argument("--data", default=None, nargs="+", metavar="PATH",
                   help="what to predict: a folder or zip (Kaggle's layout: test/images; a plain layout: "
                        "test/; or a folder of images), or one or more image files (default: the data the "
                        "checkpoint was trained on)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for every output, new or empty (default: a new predictions/<YYYYmmdd-HHMMSS> "
                        "beside the model; never the current folder)")
    p.add_argument("--gpu", action="store_true", help="predict on the GPU with CuPy")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads sharing every batch (default: every usable core)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass (default: 32)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average with the prediction of the mirrored image "
                        "(default: as the checkpoint records, off when it records nothing)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability above which a pixel is foreground, in [0, 1] (default: the "
                        "checkpoint's best threshold, else 0.5)")
    p.add_argument("--save-masks", action="store_true",
                   help="also save each predicted mask at its image's size as masks/<name>.png (8-bit, 0/255)")
    p.add_argument("--overlays", action="store_true",
                   help="also save each image with its mask's outline in red as overlays/<name>.png")
    p.add_argument("--csv", dest="kaggle_csv", action=argparse.BooleanOptionalAction, default=None,
                   help="write Kaggle's submission.csv (id,rle_mask) (default: only for TGS-like images, "
                        "101x101 gray, and not with --evaluate)")
    p.add_argument("--tile", type=int, default=TILE,
                   help="with a padded model, predict images larger than this on a side in overlapping "
                        "tiles of this side, bounding memory (default: %(default)s)")
    p.add_argument("--evaluate", nargs="?", const="all", default=False, choices=("all", "val"),
                   help="score labelled images instead: 'all' (the default) every image of --data, 'val' "
                        "exactly the validation part of the model's own training split; prints Dice, IoU "
                        "(per image and over the set), the competition score and pixel accuracy, and saves "
                        "scores.csv and threshold.png")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback on errors")
    return p


def predict_main(argv: list[str] | None = None) -> int:
    """``python predict.py`` / ``tinyunet-predict``: the exit status (0, 2 for a user's mistake, 130 on Ctrl-C)."""
    args = predict_parser().parse_args(argv)
    from tinyunet.prediction import USER_ERRORS, predict  # after parsing, so --help stays fast

    try:
        with _sigterm_as(KeyboardInterrupt) as terminated:
            predict(model=args.model, data=args.data, out=args.out, gpu=args.gpu, threads=args.threads,
                    batch_size=args.batch_size, tta=args.tta, threshold=args.threshold,
                    save_masks=args.save_masks, overlays=args.overlays, kaggle_csv=args.kaggle_csv,
                    evaluate=args.evaluate, tile=args.tile, keep=False)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"error: {how} (a submission file is either complete or as it was before)", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except (MemoryError, RecursionError, OSError) as err:
        if args.debug:
            raise
        print(_one_line(err, "--batch-size"), file=sys.stderr)
        return EXIT_USAGE
    return 0
