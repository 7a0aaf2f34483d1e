"""The run folder: where a training run keeps its files, and how predict.py finds the newest one.

    runs/<name>/  best.npz      the best checkpoint (by the monitored value), with the tuned threshold
                  last.npz      everything ``--resume`` needs, rewritten after every epoch
                  history.csv   one row per epoch (:data:`HISTORY_COLUMNS`)
                  *.png         the plots
    runs/latest   the newest run folder's path relative to runs/, written once a new run holds its first
                  epoch (at the start when resuming; a run folder outside runs/ gets the file in its own
                  parent folder)

Every file is written atomically (:mod:`tinyunet.files`). A training holds an exclusive ``flock`` on
``<run>/.lock`` while it runs, so a second training on the same folder stops with one line instead of
mixing its files with the first one's.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock; a run folder is not locked there
    fcntl = None

from tinyunet.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from tinyunet.files import atomic_write, make_writable_folder

RUNS_DIR = Path("runs")  # default parent of the run folders, relative to the working folder
LATEST = "latest"  # runs/latest: a text file naming the newest run folder, relative to runs/
BEST = "best.npz"  # the checkpoint predict.py uses
LAST = "last.npz"  # the checkpoint a resumed run continues from
LOCK = ".lock"  # <run>/.lock: flock'd by the training writing the folder
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_score", "lr", "seconds")


class RunError(ValueError):
    """A run folder cannot be used (or none is found); the message is one line saying what to do."""


_STAMP = re.compile(r"^\d{8}-\d{6}(-\d+)?$")  # the names new_run_folder gives


def new_run_folder(runs: Path = RUNS_DIR) -> Path:
    """Create and return runs/<YYYYmmdd-HHMMSS> (with -2, -3, ... when taken): ``mkdir`` either makes a
    name or fails, so two runs started in the same second never share a folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs.mkdir(parents=True, exist_ok=True)
    run, n = runs / stamp, 2
    while True:
        try:
            run.mkdir()
            return run
        except FileExistsError:
            run, n = runs / f"{stamp}-{n}", n + 1


_HELD: dict[Path, int] = {}  # run folder (resolved) -> the descriptor of its flock'd .lock, in this process


def lock_run_folder(run: Path) -> None:
    """Take the run folder's exclusive lock (kept until :func:`release_run_folder` or the process ends);
    RunError when another process holds it."""
    where = run.resolve()
    if where in _HELD or fcntl is None:  # held already by this process; or no flock (Windows)
        return
    fd = os.open(where / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"--out {run} is in use by another training (it holds the lock on {run / LOCK}): wait "
                       "for it to end, or choose another --out") from None
    _HELD[where] = fd


def release_run_folder(run: Path) -> None:
    """Let go of the lock :func:`lock_run_folder` took (the .lock file stays, unlocked)."""
    fd = _HELD.pop(run.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def discard_run_folder(run: Path) -> None:
    """Remove a run folder this process created when its start failed: nothing but its lock is in it."""
    if run.is_dir() and all(p.name == LOCK for p in run.iterdir()):
        release_run_folder(run)
        (run / LOCK).unlink(missing_ok=True)
        run.rmdir()


def prepare_run_folder(out: str | os.PathLike | None, resuming: bool) -> Path:
    """Create (or check) the run folder ``out`` (None: a new one under runs/), prove it writable and lock it."""
    run = Path(out) if out is not None else None
    if run is not None and run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file, not a folder: choose a folder for the run")
    try:
        run = new_run_folder() if run is None else run
        make_writable_folder(run)
    except OSError as err:
        raise RunError(f"cannot write to the output folder {run or RUNS_DIR} ({err.strerror or err}): "
                       "choose another --out") from None
    lock_run_folder(run)
    if not resuming and (run / LAST).exists():
        release_run_folder(run)
        raise RunError(f"--out {run} already holds a run ({LAST}): continue it with --resume {run}, "
                       "or choose another --out")
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
    if not (path / BEST).is_file():  # checked now, not when the last epoch has ended and the sweep needs it
        raise CheckpointError(f"--resume {path}: the folder has {LAST} but no {BEST} (moved or deleted?), which the "
                              f"run ends by tuning; put it back, or start a new run")
    checkpoint = load_checkpoint(last)
    check_resumable(checkpoint)
    return path, checkpoint


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_resumable(checkpoint: Checkpoint) -> None:
    """CheckpointError (one line) unless ``checkpoint`` holds, well formed, everything a resumed run reads
    from a last.npz: the training settings (``args``), the optimizer's state with float moments, the
    history (one row of numbers per epoch), the callbacks' states and the data's fingerprint.
    The weights themselves are checked as predict checks them (:func:`tinyunet.models.load_into`)."""
    meta, where = checkpoint.meta, checkpoint.path

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where} cannot be resumed ({what}); the file is damaged or was edited: "
                                  "start a new run")

    if not isinstance(meta.get("args"), dict):
        raise CheckpointError(f"{where} holds no training settings (meta 'args'); it was not written by "
                              "train.py: start a new run instead of resuming")
    state = checkpoint.optimizer_state
    if state is None:
        raise CheckpointError(f"{where} has no optimizer state, so the run cannot continue exactly; start a new run")
    need(all(_number(state.get(key)) for key in ("lr", "beta_1", "beta_2", "epsilon")),
         "its optimizer's lr, beta_1, beta_2 and epsilon must be finite numbers")
    need(isinstance(state.get("t"), int) and not isinstance(state["t"], bool) and state["t"] >= 0,
         f"its optimizer's step count t={state.get('t')!r} is not a whole number >= 0")
    need(all(np.issubdtype(a.dtype, np.floating) for key in ("m", "v") for a in state[key].values()),
         "its optimizer moments must be float arrays")
    history = meta.get("history", [])
    need(isinstance(history, list) and all(
        isinstance(row, dict) and all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                                      for c in HISTORY_COLUMNS)
        and row["epoch"] == i + 1 for i, row in enumerate(history)),
        f"its history must be one row per epoch, from epoch 1, with the numbers {', '.join(HISTORY_COLUMNS)}")
    callbacks = meta.get("callbacks", {})
    need(isinstance(callbacks, dict) and all(
        isinstance(cb, dict) and all(v is None or isinstance(v, (int, float)) for v in cb.values())
        for cb in callbacks.values()), "its callbacks' states must hold numbers only")
    data = meta.get("data", {})
    need(isinstance(data, dict) and isinstance(data.get("fingerprint", ""), str),
         "its data record must hold the data's fingerprint as text")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; RunError (one line) when the disk or the folder refuses."""
    try:
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise RunError(f"cannot write {path} ({err.strerror or err}): check free space and permissions in "
                       f"{path.parent}, or choose another --out") from None


def _is_pointer(latest: Path, home: Path) -> bool:
    """Whether ``latest`` is absent or a pointer train.py wrote: one line naming a run folder in ``home``."""
    if not os.path.lexists(latest):
        return True
    if latest.is_symlink() or not latest.is_file() or latest.stat().st_size > 4096:
        return False
    try:
        lines = latest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) == 1 and ".." not in Path(lines[0]).parts and (
        (home / lines[0]).is_dir() or _STAMP.match(lines[0]) is not None)


def latest_file(run: Path) -> Path:
    """Where the pointer to ``run`` goes: ``runs/latest``, or ``latest`` in the parent of a run folder
    outside ./runs."""
    runs = RUNS_DIR.resolve()
    where = run.resolve()
    return (runs if where.is_relative_to(runs) and where != runs else where.parent) / LATEST


def write_latest(run: Path) -> bool:
    """Write :func:`latest_file` holding the run folder's path relative to its folder, for predict.py.

    A file of that name that train.py did not write (a user's own) is never replaced: then False, and
    nothing is written.
    """
    latest = latest_file(run)
    if not _is_pointer(latest, latest.parent):
        return False
    _write_text(latest, run.resolve().relative_to(latest.parent).as_posix() + "\n")
    return True


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
