"""Writing files safely: every file tinyunet writes goes through :func:`atomic_write`.

An atomic write goes to a hidden temporary file beside the target (``.<name>.<pid>.<hex>.tmp``), is
flushed and fsynced, then renamed onto the target with ``os.replace``: a process killed at any moment
leaves either the old file or the new one, never a mix. Any failure (Ctrl-C included) removes the
temporary; only SIGKILL or a power cut can leave one behind, and :func:`remove_stale_temporaries` tells
such a file (its writer's pid is gone) from a live writer's. Checkpoints, the run folder's text files,
the submission and the plots all use it.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")  # what temporary_path makes


def temporary_path(path: Path) -> Path:
    """The hidden file an atomic write of ``path`` goes through: ``.<name>.<pid>.<hex>.tmp`` beside it."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args) -> Iterator[IO]:
    """``with atomic_write(path) as f: ...``: ``f`` is a new temporary beside ``path`` (opened with
    ``open``'s ``"x"`` for the ``"w"`` of ``mode``), renamed onto ``path`` once the block ends cleanly.

    Raises the OSError of whatever failed (the folder missing or read-only, the disk full); the
    temporary is gone then, and an earlier file at ``path`` is as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removed after any failure
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform allows opening a folder."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder; its rename is durable enough without
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the file itself is already synced
        pass
    finally:
        os.close(fd)


def make_writable_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) if needed and prove a file can be created in it.

    Raises NotADirectoryError when ``folder`` or a parent is a file, else the OSError of the failed
    step, so each caller can say what it was about to write.
    """
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder", str(blocker))
    folder.mkdir(parents=True, exist_ok=True)
    probe = temporary_path(folder / "write-test")  # a killed process's probe is a stale temporary
    probe.touch(exist_ok=False)
    probe.unlink()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files that a killed writer left in ``directory``; return them.

    A temporary is stale when the process named in it is no longer alive; a live writer's file is
    left alone.
    """
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        if match is None or _alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
