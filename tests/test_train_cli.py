"""train.py as people run it: --help, one-line errors with exit code 2, Ctrl-C and SIGKILL on a real process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import train_main
from tinyunet.config import ConfigError

from helpers import assert_one_line_error, exit_code, poison_loss

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
TINY_FLAGS = ["--features", "2", "--depth", "2", "--input-size", "32", "--no-plots", "--no-progress"]


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_flag_and_the_quick_defaults(tmp_path):
    done = run_cli(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    for flag in ("--data", "--gpu", "--epochs", "--batch-size", "--features", "--depth", "--lr", "--val-split",
                 "--seed", "--out", "--resume", "--fit", "--input-size", "--patience", "--lr-patience",
                 "--lr-factor", "--min-lr", "--no-flip", "--dropout", "--limit", "--no-plots", "--debug", "--threads"):
        assert flag in done.stdout, flag
    assert "QUICK" in done.stdout and "synthetic" in done.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("args, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "-3"], "--epochs"),
    (["--epochs", "ten"], "--epochs"),
    (["--val-split", "1.5"], "--val-split"),
    (["--val-split", "0"], "--val-split"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--features", "0"], "--features"),
    (["--depth", "0"], "--depth"),
    (["--input-size", "100", "--fit", "resize"], "--input-size"),
    (["--fit", "crop"], "--fit"),
    (["--lr-factor", "1"], "--lr-factor"),
    (["--patience", "-1"], "--patience"),
    (["--min-lr", "-1"], "--min-lr"),
    (["--limit", "1"], "--limit"),
    (["--dropout", "0.1,0.2"], "--dropout"),
    (["--dropout", "a,b"], "--dropout"),
    (["--resume", "no-such-run"], "--resume"),
    (["--threads", "0"], "--threads"),
])
def test_bad_flag_values_are_one_line_errors(tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.chdir(tmp_path)  # no ./data here: the quick defaults, but nothing may be generated
    assert call_main(args + ["--data", "missing"]) == 2  # a value error is found before the data is read
    assert_one_line_error(capsys.readouterr().err, flag)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def call_main(argv: list[str]) -> int:
    """train.py's exit code, in this process."""
    return exit_code(train_main, argv)


def test_an_abbreviated_flag_is_refused(tmp_path, monkeypatch, capsys):
    """--epoch 3 is not taken for --epochs 3 (allow_abbrev=False): one line, exit 2, nothing started."""
    monkeypatch.chdir(tmp_path)
    assert call_main(["--epoch", "3", "--data", "missing"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--epoch 3")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, flag", [(["--block", "dense"], "--block"), (["--loss", "dice"], "--loss"),
                                        (["--monitor", "val_acc"], "--monitor"),
                                        (["--flip-mode", "sometimes"], "--flip-mode")])
def test_bad_block_loss_monitor_and_flip_mode_flags(tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.chdir(tmp_path)
    assert call_main(args + ["--data", "missing"]) == 2
    assert_one_line_error(capsys.readouterr().err, flag)


def test_a_bad_value_in_a_real_process(tmp_path):
    done = run_cli(["--batch-size", "0"], tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "--batch-size")
    done = run_cli(["--epochs", "x"], tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "--epochs")


def test_missing_data_folder(tmp_path):
    done = run_cli(["--data", str(tmp_path / "nowhere"), "--out", "run", *TINY_FLAGS], tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "nowhere", "does not exist")
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


def test_unwritable_output_folder(tmp_path, tiny_data):
    (tmp_path / "file").write_text("x")
    done = run_cli(["--data", str(tiny_data), "--out", "file/run", *TINY_FLAGS], tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "--out")


def test_gpu_without_cupy(tmp_path, tiny_data):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the missing-CuPy message cannot be shown")
    done = run_cli(["--gpu", "--data", str(tiny_data), "--out", "run", *TINY_FLAGS], tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "CuPy")


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        train_main(["--batch-size", "0", "--debug"])


def test_a_nan_loss_exits_non_zero_with_epoch_and_batch(tmp_path, tiny_data, monkeypatch, capsys):
    poison_loss(monkeypatch, at_call=3, factor=np.inf)
    assert call_main(["--data", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "3", *TINY_FLAGS]) == 1
    assert_one_line_error(capsys.readouterr().err, "epoch 1, batch 3", "nothing was saved", "--lr")


# --------------------------------------------------------------------------------------------
# Signals on a real training process
# --------------------------------------------------------------------------------------------

def start_training(tiny_data: Path, cwd: Path, out: str) -> subprocess.Popen:
    args = ["--data", str(tiny_data), "--out", out, "--epochs", "100000", "--patience", "100000",
            "--lr-patience", "100000", *TINY_FLAGS]
    return subprocess.Popen([sys.executable, str(TRAIN_PY), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_epochs(proc: subprocess.Popen, last: Path, epochs: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()}")
        try:
            if last.exists() and load_checkpoint(last).meta["epoch"] >= epochs:
                return
        except Exception:  # being replaced right now: look again
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path, tiny_data):
    proc = start_training(tiny_data, tmp_path, "run")
    wait_for_epochs(proc, tmp_path / "run" / "last.npz", 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err and "--resume run" in err and "holds epoch" in err
    epoch = load_checkpoint(tmp_path / "run" / "last.npz").meta["epoch"]
    # best.npz is written before last.npz in an epoch: a stop between the two leaves it one ahead
    assert load_checkpoint(tmp_path / "run" / "best.npz").meta["epoch"] <= epoch + 1


def test_sigkill_mid_training_then_resume(tmp_path, tiny_data):
    proc = start_training(tiny_data, tmp_path, "run")
    last = tmp_path / "run" / "last.npz"
    wait_for_epochs(proc, last, 2)
    time.sleep(0.05)  # somewhere in the next epoch or a checkpoint write
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    epoch = load_checkpoint(last).meta["epoch"]
    # best.npz is written before last.npz in an epoch: a kill between the two leaves it one ahead
    assert load_checkpoint(tmp_path / "run" / "best.npz").meta["epoch"] <= epoch + 1
    done = run_cli(["--resume", "run", "--epochs", str(epoch + 1)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(last).meta["epoch"] == epoch + 1
    assert 0 <= load_checkpoint(tmp_path / "run" / "best.npz").meta["best_threshold"] <= 1
    assert (tmp_path / "latest").read_text().strip() == "run"
