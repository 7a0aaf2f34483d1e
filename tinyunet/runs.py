"""The run folder: where a training run keeps its files, and how predict.py finds the newest one.

    runs/<name>/  best.npz      the best checkpoint (by the monitored value), with the tuned threshold
                  last.npz      everything ``--resume`` needs, rewritten after every epoch
                  history.csv   one row per epoch (:data:`HISTORY_COLUMNS`)
                  *.png         the plots
    runs/latest   the newest run folder's path relative to runs/, written when a run starts (a run
                  folder outside runs/ gets the file in its own parent folder)

Every file is written atomically (:mod:`tinyunet.files`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tinyunet.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from tinyunet.files import atomic_write, make_writable_folder

RUNS_DIR = Path("runs")  # default parent of the run folders, relative to the working folder
LATEST = "latest"  # runs/latest: a text file naming the newest run folder, relative to runs/
BEST = "best.npz"  # the checkpoint predict.py uses
LAST = "last.npz"  # the checkpoint a resumed run continues from
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_score", "lr", "seconds")


class RunError(ValueError):
    """A run folder cannot be used (or none is found); the message is one line saying what to do."""


def new_run_folder(runs: Path = RUNS_DIR) -> Path:
    """runs/<YYYYmmdd-HHMMSS> (with -2, -3, ... when taken), not yet created."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = runs / stamp
    n = 2
    while run.exists():
        run = runs / f"{stamp}-{n}"
        n += 1
    return run


def prepare_run_folder(out: str | os.PathLike | None, resuming: bool) -> Path:
    """Create (or check) the run folder ``out`` (None: a new one under runs/) and prove it writable."""
    run = Path(out) if out is not None else new_run_folder()
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file, not a folder: choose a folder for the run")
    if not resuming and (run / LAST).exists():
        raise RunError(f"--out {run} already holds a run ({LAST}): continue it with --resume {run}, "
                       "or choose another --out")
    try:
        make_writable_folder(run)
    except OSError as err:
        raise RunError(f"cannot write to the output folder {run} ({err.strerror or err}): "
                       "choose another --out") from None
    return run


def open_resume(path: str | os.PathLike) -> tuple[Path, Checkpoint]:
    """``(run folder, last.npz Checkpoint)`` of the run to resume; CheckpointError when there is none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such run folder; give a folder written by train.py "
                              f"(it holds {LAST}), e.g. {RUNS_DIR}/<name>")
    last = path / LAST
    if not last.is_file():
        raise CheckpointError(f"--resume {path}: the folder has no {LAST} (it is saved after every epoch), so "
                              "there is nothing to resume; start a new run")
    return path, load_checkpoint(last)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_latest(run: Path) -> Path:
    """Write ``runs/latest`` holding the run folder's path relative to ``runs/``, for predict.py.

    A run folder outside ./runs gets the ``latest`` file in its own parent folder instead.
    """
    runs = RUNS_DIR.resolve()
    where = run.resolve()
    home = runs if where.is_relative_to(runs) and where != runs else where.parent
    latest = home / LATEST
    _write_text(latest, where.relative_to(home).as_posix() + "\n")
    return latest


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, one row per epoch, rewritten whole (atomically) after every epoch."""
    lines = [",".join(HISTORY_COLUMNS)]
    lines += [",".join(repr(row[column]) for column in HISTORY_COLUMNS) for row in history]
    _write_text(path, "\n".join(lines) + "\n")


def latest_model(runs: Path = RUNS_DIR) -> Path:
    """``runs/<runs/latest>/best.npz``: the best checkpoint of the newest training run."""
    pointer = runs / LATEST
    if not pointer.is_file():
        raise RunError("no trained model found: run python train.py first, or pass --model")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"cannot read {pointer} ({err}): pass --model") from None
    if not name:
        raise RunError(f"{pointer} is empty: run python train.py again, or pass --model")
    path = runs / name / BEST
    if not path.is_file():
        raise RunError(f"{pointer} names the run {runs / name}, which has no {BEST} (was its "
                       "training stopped before the first epoch ended?): run python train.py "
                       "again, or pass --model")
    return path
