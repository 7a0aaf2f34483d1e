"""Atomic writes, the write-permission probe and the cleanup of a killed writer's temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tinyunet.files import atomic_write, make_writable_folder, remove_stale_temporaries, temporary_path


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "history.csv"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["history.csv"]  # no temporary left


def test_atomic_write_into_a_missing_folder_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "missing" / "a.png") as f:
            f.write(b"x")
    assert os.listdir(tmp_path) == []


def test_make_writable_folder_creates_it_and_names_a_file_in_the_way(tmp_path):
    make_writable_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []  # the probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file is a file, not a folder"):
        make_writable_folder(tmp_path / "file" / "sub")


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".best.npz.{dead_pid}.0a1b2c3d.tmp"
    live = temporary_path(tmp_path / "last.npz")  # this process: a writer still at work
    others = [tmp_path / ".hidden", tmp_path / f"best.npz.{dead_pid}.0a1b2c3d.tmp", tmp_path / "last.npz"]
    for path in [stale, live, *others]:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in others)
    assert remove_stale_temporaries(tmp_path) == []
