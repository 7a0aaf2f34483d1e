"""The run folder: finding the newest run's best model, preparing a folder, reopening a run."""

from __future__ import annotations

import pytest

from tinyunet.checkpoint import CheckpointError
from tinyunet.runs import RunError, latest_model, open_resume, prepare_run_folder


def test_latest_model(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(RunError, match="no trained model found: run python train.py first"):
        latest_model(runs)
    runs.mkdir()
    (runs / "latest").write_text("")
    with pytest.raises(RunError, match="is empty"):
        latest_model(runs)
    (runs / "latest").write_text("2024-01-01_run\n")
    with pytest.raises(RunError, match="has no best.npz"):
        latest_model(runs)
    (runs / "2024-01-01_run").mkdir()
    (runs / "2024-01-01_run" / "best.npz").write_bytes(b"")  # latest_model finds it; load_model reads it
    assert latest_model(runs) == runs / "2024-01-01_run" / "best.npz"


def test_prepare_run_folder_refuses_a_file_and_a_finished_run(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a folder"):
        prepare_run_folder(tmp_path / "file", resuming=False)
    with pytest.raises(RunError, match="cannot write to the output folder"):
        prepare_run_folder(tmp_path / "file" / "run", resuming=False)
    run = prepare_run_folder(tmp_path / "run", resuming=False)
    assert run.is_dir() and [p.name for p in run.iterdir()] == [".lock"]  # the write probe is gone
    (run / "last.npz").write_bytes(b"")
    with pytest.raises(RunError, match="already holds a run.*--resume"):
        prepare_run_folder(run, resuming=False)
    assert prepare_run_folder(run, resuming=True) == run


def test_open_resume_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such run folder"):
        open_resume(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no last.npz"):
        open_resume(tmp_path)
