"""Issue 6, what the per-module tests do not already show: faults and odd input end to end.

* a real ``train.py`` process SIGKILLed in the middle of a checkpoint write, and at random moments:
  the files already saved stay byte for byte, ``--resume`` finishes, and the resumed weights equal a
  straight run's bit for bit (so two processes with one seed agree too);
* images of other sizes through train.py and predict.py: a 512 x 512 set (``--fit pad`` and
  ``--fit resize``) and a non-square one (37 x 50 training images, 50 x 37 test images);
* NaN pixels reaching training (a PNG cannot hold them: the guard is ``check_finite`` in
  ``prepare_data``, exercised here through the command line with the loader patched);
* train.py mistakes made against an existing run: one ``error:`` line, exit 2, and every file of the
  run untouched (bytes and mtime);
* hypothesis: run-length decoding of arbitrary strings and objects, the metric on masks of any shape.

Everything is tiny (features 2, depth 2, a dozen small images, 1-4 epochs).
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tinyunet import prepare
from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import predict_main, train_main
from tinyunet.data import TrainSet, load_train
from tinyunet.metrics import competition_score, image_scores, iou
from tinyunet.rle import rle_decode, rle_encode
from tinyunet.synth import generate
from tinyunet.config import build_config
from tinyunet.training import train

from helpers import assert_one_line_error, exit_code

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
TINY_FLAGS = ["--features", "2", "--depth", "2", "--input-size", "16", "--no-plots", "--no-progress"]
EPOCHS = 12  # of every killed-and-resumed run; an epoch of the tiny set takes about 0.1 s
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: relative path -> (bytes, mtime in ns).

    The folder may belong to a live training: a temporary file listed here can be renamed over its
    target before it is read, so a file gone by then is left out (it was never one of the saved files).
    """
    files = {}
    for path in sorted(folder.rglob("*")):
        try:
            with open(path, "rb") as f:
                files[str(path.relative_to(folder))] = (f.read(), os.fstat(f.fileno()).st_mtime_ns)
        except (FileNotFoundError, IsADirectoryError):
            continue
    return files


def same_params(a: Path, b: Path) -> None:
    pa, pb = load_checkpoint(a).params, load_checkpoint(b).params
    assert list(pa) == list(pb)
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    # 16 images of 24 x 24: split 12 + 4, flips 24 -> 3 steps of 8 per epoch
    return generate(tmp_path_factory.mktemp("robust") / "set", n_train=16, n_test=2, size=24, seed=3)


# --------------------------------------------------------------------------------------------
# SIGKILL on a real training process
# --------------------------------------------------------------------------------------------

# Runs train.py's main in a child process whose np.savez (used only by save_checkpoint) writes half
# of the archive into the temporary file, fsyncs it, leaves a marker and sleeps: the parent kills it
# exactly there, in the middle of the K-th write of TARGET.
_SLOW_WRITE = textwrap.dedent("""
    import io, os, sys, time, runpy
    from pathlib import Path
    import numpy as np
    from tinyunet import training
    script, target, k, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    real_save, real_savez, state = training.save_checkpoint, np.savez, {"path": None, "n": 0}

    def save(path, *args, **kwargs):
        state["path"] = Path(path)
        return real_save(path, *args, **kwargs)

    def savez(file, **arrays):
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        data = buf.getvalue()
        if state["path"].name == target:
            state["n"] += 1
            if state["n"] == k:
                file.write(data[: len(data) // 2])
                file.flush()
                os.fsync(file.fileno())
                marker.with_name("part").write_text(str(len(data)))
                os.replace(marker.with_name("part"), marker)  # whole, or not there
                time.sleep(600)
        file.write(data)

    training.save_checkpoint, np.savez = save, savez
    sys.argv = [script] + sys.argv[5:]
    runpy.run_path(script, run_name="__main__")
""")


def _train_args(data: Path, out: str, epochs: int) -> list[str]:
    return ["--data", str(data), "--out", out, "--epochs", str(epochs), "--patience", "1000",
            "--lr-patience", "1000", *TINY_FLAGS]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path.name} appeared: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def _resume(cwd: Path, run: str, epochs: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_PY), "--resume", run, "--epochs", str(epochs)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory) -> Path:
    """EPOCHS epochs in one go, in this process: what every killed-and-resumed run must end up with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(build_config({"data": str(tiny_data), "out": str(out), "epochs": EPOCHS, "patience": 1000,
                               "lr_patience": 1000, "features": 2, "depth": 2, "input_size": 16,
                               "plots": False, "progress": False}))


@pytest.mark.parametrize("target, k", [("last.npz", 2), ("best.npz", 2)])
def test_sigkill_mid_checkpoint_write_keeps_the_saved_files(tmp_path, tiny_data, straight_run, target, k):
    marker = tmp_path / "in-the-middle"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(TRAIN_PY), target, str(k), str(marker),
                             *_train_args(tiny_data, "run", 1000)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(marker, proc)
        run = tmp_path / "run"
        before = snapshot(run)  # the child sleeps with half of the new file written
        temporaries = [p for p in run.iterdir() if p.name.startswith(f".{target}.") and p.name.endswith(".tmp")]
        assert len(temporaries) == 1 and 0 < temporaries[0].stat().st_size < int(marker.read_text())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    after = snapshot(run)
    for name in ("last.npz", "best.npz", "history.csv"):
        assert after.get(name) == before.get(name), f"{name} changed when the process was killed"
    last = load_checkpoint(run / "last.npz")  # the files already saved load fine
    best = load_checkpoint(run / "best.npz")
    # an epoch writes best.npz (when val_loss improved), then last.npz: killed in between, best is one ahead
    assert best.meta["epoch"] <= last.meta["epoch"] + (target == "last.npz")
    if target == "last.npz":
        assert last.meta["epoch"] == k - 1  # the K-th write never landed
    # the half-written temporary is hidden beside them and replaces nothing; --resume removes it
    stale = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert stale and all(p.startswith(".") for p in stale)

    done = _resume(tmp_path, "run", EPOCHS)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"removed {len(stale)} half-written temporary file(s)" in done.stdout
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(run / "last.npz").meta["epoch"] == EPOCHS
    assert 0 <= load_checkpoint(run / "best.npz").meta["best_threshold"] <= 1
    same_params(run / "last.npz", straight_run / "last.npz")  # exact resume, across processes
    same_params(run / "best.npz", straight_run / "best.npz")
    with open(run / "history.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, EPOCHS + 1))


def test_sigkill_at_random_moments_then_resume_finishes(tmp_path, tiny_data, straight_run):
    """Kill -9 twice at a random moment after an epoch landed (mid-epoch, mid-validation or mid-write)."""
    seed = int(os.environ.get("TINYUNET_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    run = tmp_path / "run"
    last_path = run / "last.npz"
    epochs_seen = []
    for attempt in range(2):
        argv = _train_args(tiny_data, "run", EPOCHS) if attempt == 0 else ["--resume", "run", "--epochs", str(EPOCHS)]
        landed = last_path.stat().st_mtime_ns if attempt else None
        proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.monotonic() + 120
        while not (last_path.exists() and last_path.stat().st_mtime_ns != landed):  # an epoch of this process
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        before = snapshot(run)
        time.sleep(rng.uniform(0.0, 0.05))  # about an epoch of the tiny set: keeps epochs left to resume
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        last = load_checkpoint(last_path)  # loads, whatever moment it was killed at
        best = load_checkpoint(run / "best.npz")
        assert 1 <= last.meta["epoch"] <= EPOCHS
        assert best.meta["epoch"] <= last.meta["epoch"] + 1  # +1: killed between the best and the last write
        if last.meta["epoch"] == load_checkpoint_bytes_epoch(before["last.npz"][0], tmp_path):
            assert snapshot(run)["last.npz"] == before["last.npz"]  # no epoch landed since: untouched
        assert not [p.name for p in run.iterdir() if not p.name.startswith(".")
                    and p.name not in ("last.npz", "best.npz", "history.csv")]
        epochs_seen.append(last.meta["epoch"])
    done = _resume(tmp_path, "run", EPOCHS)
    assert done.returncode == 0, (seed, epochs_seen, done.stderr)
    same_params(last_path, straight_run / "last.npz")


def load_checkpoint_bytes_epoch(raw: bytes, tmp: Path) -> int:
    """The epoch recorded in a checkpoint given as bytes."""
    copy = tmp / "copy.npz"
    copy.write_bytes(raw)
    return load_checkpoint(copy).meta["epoch"]


# --------------------------------------------------------------------------------------------
# Images of other sizes, through both command lines
# --------------------------------------------------------------------------------------------

def _write_set(root: Path, train_shape: tuple[int, int], test_shape: tuple[int, int], n_train: int,
               n_test: int, seed: int = 0) -> Path:
    """Kaggle's layout with discs of salt on a noisy background, written by PIL."""
    rng = np.random.default_rng(seed)
    for part, (h, w), n in (("train", train_shape, n_train), ("test", test_shape, n_test)):
        folders = ["images", "masks"] if part == "train" else ["images"]
        for folder in folders:
            (root / part / folder).mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[:h, :w]
        for i in range(n):
            radius = (0.1 + 0.3 * i / max(n - 1, 1)) * min(h, w) if i else 0  # one empty mask
            mask = (yy - h * rng.uniform(0.3, 0.7)) ** 2 + (xx - w * rng.uniform(0.3, 0.7)) ** 2 < radius ** 2
            image = np.clip(np.where(mask, 170, 80) + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)
            Image.fromarray(image, mode="L").save(root / part / "images" / f"{part}{i:02d}.png")
            if part == "train":
                Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
                    root / part / "masks" / f"{part}{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def big_set(tmp_path_factory) -> Path:
    return _write_set(tmp_path_factory.mktemp("big") / "set", (512, 512), (512, 512), n_train=3, n_test=2)


@pytest.fixture(scope="module")
def oblong_set(tmp_path_factory) -> Path:
    # training images 37 high x 50 wide (neither a multiple of 4), test images the other way round
    return _write_set(tmp_path_factory.mktemp("oblong") / "set", (37, 50), (50, 37), n_train=8, n_test=3)


def _train_then_predict(data: Path, tmp_path: Path, fit: str, shape: tuple[int, int], capsys,
                        processes: bool = False) -> None:
    """train.py 1 epoch, then predict.py; in this process, or as real processes (``processes``)."""
    run, out = tmp_path / "run", tmp_path / "predicted"
    train_argv = ["--data", data, "--out", run, "--epochs", "1", "--batch-size", "2", "--fit", fit, *TINY_FLAGS]
    predict_argv = ["--model", run / "best.npz", "--data", data, "--out", out, "--batch-size", "1", "--csv"]
    if processes:  # one BLAS thread: on a busy machine OpenBLAS's threads make 512 x 512 convs 10x slower
        env = {**ENV, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for script, argv in (("train.py", train_argv), ("predict.py", predict_argv)):
            done = subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300, env=env)
            assert done.returncode == 0 and "Traceback" not in done.stderr, (script, done.stderr)
    else:
        for main, argv in ((train_main, train_argv), (predict_main, predict_argv)):
            code = exit_code(main, argv)
            assert code == 0, capsys.readouterr().err
    meta = load_checkpoint(run / "best.npz").meta
    assert meta["fit"] == fit and 0 <= meta["best_threshold"] <= 1

    ids = sorted(p.stem for p in (data / "test" / "images").iterdir())
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "rle_mask"] and [row[0] for row in rows[1:]] == ids
    decoded = np.stack([rle_decode(row[1], shape) for row in rows[1:]])
    assert decoded.shape == (len(ids),) + shape and decoded.dtype == bool
    for row, mask in zip(rows[1:], decoded):
        assert rle_encode(mask) == row[1]


@pytest.mark.parametrize("fit", ["pad", "resize"])
def test_a_512_set_trains_and_predicts(big_set, tmp_path, fit, capsys):
    _train_then_predict(big_set, tmp_path, fit, (512, 512), capsys, processes=True)


@pytest.mark.parametrize("fit", ["pad", "resize"])
def test_a_non_square_set_trains_and_predicts_another_shape(oblong_set, tmp_path, fit, capsys):
    _train_then_predict(oblong_set, tmp_path, fit, (50, 37), capsys)


# --------------------------------------------------------------------------------------------
# A finished run, and the mistakes made against it
# --------------------------------------------------------------------------------------------

@pytest.fixture
def finished(tiny_data, tmp_path, monkeypatch) -> Path:
    """A 1-epoch run in ./runs/done of a fresh working folder (so runs/latest exists too)."""
    monkeypatch.chdir(tmp_path)
    assert exit_code(train_main, ["--data", tiny_data, "--out", "runs/done", "--epochs", "1", *TINY_FLAGS]) == 0
    return tmp_path


def test_nan_pixels_stop_training_in_one_line_and_damage_nothing(finished, tiny_data, monkeypatch, capsys):
    """No PNG decodes to NaN (read_image divides integers; float modes are refused), so the guard in
    prepare_data is reached here by giving the loader's arrays a NaN and an infinity."""
    capsys.readouterr()
    before = snapshot(finished)

    def poisoned(path, *settings):
        data = load_train(path)
        images = data.images.copy()
        images[3, 5, 7] = np.nan
        images[0, 0, 1] = np.inf
        return TrainSet(data.ids, images, data.masks)

    monkeypatch.setattr(prepare, "load_train", poisoned)
    assert exit_code(train_main, ["--resume", "runs/done", "--epochs", "3"]) == 2
    assert_one_line_error(capsys.readouterr().err, "2 NaN or infinite values", "(0, 0, 1)")
    assert snapshot(finished) == before
    assert exit_code(train_main, ["--data", tiny_data, "--out", "runs/new", "--epochs", "1", *TINY_FLAGS]) == 2
    assert_one_line_error(capsys.readouterr().err, "NaN or infinite")
    assert snapshot(finished) == before and not (finished / "runs" / "new").exists()


def _other_data(tmp: Path) -> Path:
    return generate(tmp / "other", n_train=6, n_test=1, size=24, seed=9)


RUN_MISTAKES = {
    # name: (argv, words of the one error line)
    "--out over a run": (lambda tmp: ["--data", tmp / "other", "--out", "runs/done", *TINY_FLAGS],
                         ["already holds a run", "--resume runs/done"]),
    "resume with other features": (lambda tmp: ["--resume", "runs/done", "--features", "4"],
                                   ["--features 4", "features=2"]),
    "resume with other depth": (lambda tmp: ["--resume", "runs/done", "--depth", "3"], ["--depth 3", "depth=2"]),
    "resume on other data": (lambda tmp: ["--resume", "runs/done", "--data", tmp / "other", "--epochs", "2"],
                             ["fingerprint"]),
    "resume with batch size 0": (lambda tmp: ["--resume", "runs/done", "--batch-size", "0"], ["--batch-size"]),
    "resume with negative epochs": (lambda tmp: ["--resume", "runs/done", "--epochs", "-1"], ["--epochs"]),
    "resume with val split 1": (lambda tmp: ["--resume", "runs/done", "--val-split", "1"], ["--val-split"]),
    "resume elsewhere": (lambda tmp: ["--resume", "runs/done", "--out", "runs/else"], ["--out"]),
    "resume a folder without last.npz": (lambda tmp: ["--resume", "runs"], ["no last.npz"]),
}


@pytest.mark.parametrize("case", list(RUN_MISTAKES))
def test_mistakes_against_a_run_leave_it_untouched(finished, capsys, case):
    _other_data(finished)
    capsys.readouterr()
    make_argv, words = RUN_MISTAKES[case]
    before = snapshot(finished / "runs")
    assert exit_code(train_main, make_argv(finished)) == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert snapshot(finished / "runs") == before
    assert not (finished / "runs" / "else").exists()


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "needs pickle"])
def test_resume_from_a_damaged_last_npz_keeps_best_npz(finished, capsys, damage):
    run = finished / "runs" / "done"
    last = run / "last.npz"
    raw = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(raw[: len(raw) // 2])
        words = ["truncated or corrupt"]
    elif damage == "not a checkpoint":
        last.write_text("hello")
        words = ["not a .npz checkpoint"]
    else:
        np.savez(last, **{"meta.json": np.array([{"a": 1}], dtype=object)})
        words = ["pickle", "refused"]
    capsys.readouterr()
    before = snapshot(finished / "runs")
    assert exit_code(train_main, ["--resume", "runs/done"]) == 2
    assert_one_line_error(capsys.readouterr().err, "last.npz", *words)
    assert snapshot(finished / "runs") == before
    load_checkpoint(run / "best.npz")


def test_train_py_process_error_prints_no_traceback_but_debug_does(finished):
    """One real process each way: the message is the same error, --debug adds the traceback."""
    args = [sys.executable, str(TRAIN_PY), "--resume", "runs/done", "--features", "4"]
    plain = subprocess.run(args, cwd=finished, capture_output=True, text=True, timeout=120, env=ENV)
    assert plain.returncode == 2
    assert_one_line_error(plain.stderr, "--features 4")
    debug = subprocess.run(args + ["--debug"], cwd=finished, capture_output=True, text=True, timeout=120, env=ENV)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_predict_with_a_model_of_another_depth_than_it_records(finished, capsys):
    """A best.npz whose weights were swapped for another depth's: both settings named, no traceback."""
    from tinyunet.checkpoint import save_checkpoint
    from tinyunet.unet import UNet

    best = finished / "runs" / "done" / "best.npz"
    meta = load_checkpoint(best).meta
    other = save_checkpoint(finished / "other.npz", UNet(features=2, depth=3, dropout=(0.1,) * 3).params, meta)
    (finished / "submission.csv").write_text("id,rle_mask\nold,1 1\n")
    before = snapshot(finished)
    capsys.readouterr()
    assert exit_code(predict_main, ["--model", other]) == 2
    assert_one_line_error(capsys.readouterr().err, "features=2, depth=2", "other.npz")
    assert snapshot(finished) == before


# --------------------------------------------------------------------------------------------
# Properties: run-length decoding of anything, the metric on masks of any shape
# --------------------------------------------------------------------------------------------

small_shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
rle_like = st.text(alphabet="0123456789 \t\n-+.e_x", max_size=40)  # near-misses of valid strings


def _decode_or_refuse(rle, shape) -> None:
    try:
        mask = rle_decode(rle, shape)
    except (ValueError, TypeError) as err:
        assert str(err) and "\n" not in str(err)  # one line, for a DataError that quotes it
        return
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == shape
    assert np.array_equal(rle_decode(rle_encode(mask), shape), mask)
    if isinstance(rle, str) and rle.strip():
        assert int(mask.sum()) == sum(int(n) for n in rle.split()[1::2])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), rle_like), small_shapes)
def test_decoding_an_arbitrary_string_gives_a_bool_mask_or_a_value_error(rle, shape):
    _decode_or_refuse(rle, shape)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 90), max_size=8).map(lambda ns: " ".join(map(str, ns))), small_shapes)
def test_decoding_arbitrary_integers_gives_a_bool_mask_or_a_value_error(rle, shape):
    _decode_or_refuse(rle, shape)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.floats(), st.integers(), st.binary(max_size=8), st.booleans(),
                 st.lists(st.integers(), max_size=3)), small_shapes)
def test_decoding_a_non_string_gives_an_empty_mask_or_a_type_error(value, shape):
    _decode_or_refuse(value, shape)


masks_of_any_shape = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8)).flatmap(
    lambda shape: st.tuples(arrays(bool, shape), arrays(bool, shape)))


@settings(max_examples=200, deadline=None)
@given(masks_of_any_shape)
def test_metric_on_random_masks_of_any_shape(pair):
    truth, pred = pair
    score = competition_score(truth, pred)
    assert 0.0 <= score <= 1.0
    assert score == competition_score(pred, truth)
    per_image = image_scores(truth, pred)
    assert np.all((per_image >= 0) & (per_image <= 1)) and per_image.tolist() == image_scores(pred, truth).tolist()
    assert competition_score(truth[0], pred[0]) == per_image[0]  # (H, W) is one image
    empty = np.zeros_like(truth)
    assert competition_score(empty, empty) == 1.0  # both empty
    assert image_scores(truth, empty).tolist() == [0.0 if t.any() else 1.0 for t in truth]
    assert image_scores(empty, pred).tolist() == [0.0 if p.any() else 1.0 for p in pred]
    assert iou(truth, truth).tolist() == [1.0] * len(truth)
