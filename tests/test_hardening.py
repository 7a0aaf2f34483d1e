"""Issue 17: hostile files cost no memory, a run folder has one writer, and every failure is one line.

* checkpoints that claim huge arrays, hide an unlisted one, nest their metadata 100000 deep, carry a
  32 MB+ meta.json or describe a 3000-filter model: refused (or the extra member ignored) unread,
  in a subprocess whose address space is capped (RLIMIT_AS), so a regression fails instead of
  taking the machine's memory;
* the run folder: a second training on one folder, two default folders in one second, a user's own
  ``latest`` file, a failed start, a history that cannot be written;
* ``--resume`` from a last.npz whose optimizer state, history, callbacks, args, data record or weights
  were edited, or whose best.npz is gone: one line each, before any epoch;
* train.py with stdout closed or full, SIGTERM, and what escapes the named errors (MemoryError,
  OSError, RecursionError).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinyunet import runs
from tinyunet.checkpoint import load_checkpoint, save_checkpoint
from tinyunet.cli import predict_main, train_main
from tinyunet.config import build_config
from tinyunet.data import DataError, load_test, load_train, read_regular_file
from tinyunet.runs import RunError, new_run_folder, prepare_run_folder, release_run_folder, write_history, write_latest
from tinyunet.training import train
from tinyunet.unet import UNet

from helpers import assert_one_line_error, exit_code

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
TINY_FLAGS = ["--features", "2", "--depth", "2", "--input-size", "16", "--no-plots", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------
# Checkpoints that claim more than they hold
# --------------------------------------------------------------------------------------------

def _npy(array: np.ndarray | None = None, *, shape=None, dtype="<f4", data: bytes = b"") -> bytes:
    """A .npy member: ``array``'s, or a header claiming ``shape`` followed by only ``data``."""
    buffer = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(buffer, array, allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
        buffer.write(data)
    return buffer.getvalue()


def _rezip(source: Path, target: Path, **members: bytes) -> Path:
    """``source``'s members (as .npy bytes), with ``members`` (name -> bytes, without .npy) put in or replaced."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            if info.filename.removesuffix(".npy") not in members:
                zout.writestr(info.filename, zin.read(info))
        for name, raw in members.items():
            zout.writestr(name + ".npy", raw)
    return target


def _meta_bytes(path: Path, **model) -> bytes:
    with zipfile.ZipFile(path) as z:
        doc = json.loads(np.lib.format.read_array(io.BytesIO(z.read("meta.json.npy"))).tobytes())
    doc["meta"]["model"].update(model)
    return _npy(np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8))


HOSTILE = {
    # name: (what it is, what load_model must say: a fragment of the error, or "ok")
    "huge listed array": "refused unread",
    "huge unlisted array": "ok",
    "meta nested 100000 deep": "nests lists or objects more than 32 deep",
    "meta.json claiming 40 MB": "meta.json",
    "features=3000": "features=3000",
    "in_channels='1'": "in_channels='1'",
}

_LOAD_UNDER_A_CAP = textwrap.dedent("""
    import json, resource, sys
    from tinyunet.checkpoint import CheckpointError
    from tinyunet.models import load_model
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    vm = int(status["VmSize"].split()[0]) * 1024
    cap = vm + 512 * 2**20  # whatever is already mapped, and half a GiB more
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        try:
            load_model(path)
            out[name] = "ok"
        except CheckpointError as err:
            out[name] = str(err)
        except BaseException as err:
            out[name] = f"{type(err).__name__}: {err}"
    print(json.dumps(out))
""")


def test_hostile_checkpoints_are_refused_without_reading_what_they_claim(tmp_path):
    model = UNet(features=2, depth=2, dropout=(0.0, 0.0), seed=0)
    good = save_checkpoint(tmp_path / "good.npz", model.params,
                           {"model": dict(model.config), "fit": "resize", "input_size": 16})
    first = "param/" + next(iter(model.params))
    claim = {"shape": (10 ** 11,), "data": bytes(64)}  # 373 GiB claimed, 64 bytes held
    paths = {
        "huge listed array": _rezip(good, tmp_path / "a.npz", **{first: _npy(**claim)}),
        "huge unlisted array": _rezip(good, tmp_path / "b.npz", **{"param/extra": _npy(**claim)}),
        "meta nested 100000 deep": _rezip(good, tmp_path / "c.npz", **{"meta.json": _npy(
            np.frombuffer(b"[" * 100000 + b"]" * 100000, dtype=np.uint8))}),
        "meta.json claiming 40 MB": _rezip(good, tmp_path / "d.npz", **{"meta.json": _npy(
            shape=(40 * 2 ** 20,), dtype="|u1", data=b"{}")}),
        "features=3000": _rezip(good, tmp_path / "e.npz", **{"meta.json": _meta_bytes(good, features=3000)}),
        "in_channels='1'": _rezip(good, tmp_path / "f.npz", **{"meta.json": _meta_bytes(good, in_channels="1")}),
    }
    done = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_CAP, json.dumps({k: str(v) for k, v in paths.items()})],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    for name, expected in HOSTILE.items():
        assert expected in said[name] and "\n" not in said[name], (name, said[name])
        assert "MemoryError" not in said[name], (name, said[name])


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------

def test_a_second_training_on_one_folder_is_refused_while_the_first_holds_it(tmp_path, monkeypatch):
    run = prepare_run_folder(tmp_path / "run", resuming=False)
    try:
        with monkeypatch.context() as m:
            m.setattr(runs, "_HELD", {})  # as another process sees it: the lock is not its own
            with pytest.raises(RunError, match=r"is in use by another training .*\.lock.*choose another --out"):
                prepare_run_folder(run, resuming=False)
    finally:
        release_run_folder(run)
    assert prepare_run_folder(run, resuming=False) == run  # free again once the first lets go
    release_run_folder(run)


def test_two_default_run_folders_started_in_one_second_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20260101-120000")
    first, second = new_run_folder(tmp_path / "runs"), new_run_folder(tmp_path / "runs")
    assert (first.name, second.name) == ("20260101-120000", "20260101-120000-2")
    assert first.is_dir() and second.is_dir()


def test_latest_never_replaces_a_users_own_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "experiments"
    (home / "new").mkdir(parents=True)
    (home / "old").mkdir()
    (home / "latest").write_text("my notes\nabout the runs\n")
    assert write_latest(home / "new") is False
    assert (home / "latest").read_text() == "my notes\nabout the runs\n"
    (home / "latest").write_text("old\n")  # a pointer train.py wrote
    assert write_latest(home / "new") is True and (home / "latest").read_text() == "new\n"


def test_a_failed_start_leaves_no_run_folder_and_no_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError):
        train(build_config({"data": str(tmp_path / "nowhere"), "epochs": 1}))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failure_in_the_first_epoch_leaves_no_run_folder_and_latest_as_it_was(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").write_text("older\n")  # a pointer train.py wrote for an earlier run

    def crash(*args, **kwargs):
        raise MemoryError("out of memory in the first batch")

    monkeypatch.setattr("tinyunet.training.train_epoch", crash)
    with pytest.raises(MemoryError):
        train(build_config({"data": str(tiny_data), "epochs": 1, "features": 2, "depth": 2, "input_size": 32}))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest"]
    assert (tmp_path / "runs" / "latest").read_text() == "older\n"


def test_a_history_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "history.csv").mkdir()  # EISDIR, as EFBIG or EPERM would be
    with pytest.raises(RunError, match=r"cannot write .*history.csv .*check free space and permissions"):
        write_history(tmp_path / "history.csv", [])


# --------------------------------------------------------------------------------------------
# --resume checks all of last.npz before any epoch
# --------------------------------------------------------------------------------------------

def _edit_last(run: Path, meta=None, optimizer=None, params=None) -> None:
    last = load_checkpoint(run / "last.npz")
    state = dict(last.optimizer_state)
    if optimizer:
        state.update(optimizer(state))
    save_checkpoint(run / "last.npz", params(last.params) if params else last.params,
                    meta(dict(last.meta)) if meta else last.meta, state, last.buffers)


RESUME_DAMAGE = {
    "optimizer t": (dict(optimizer=lambda s: {"t": "many"}), "step count t='many'"),
    "optimizer lr": (dict(optimizer=lambda s: {"lr": float("nan")}), "lr, beta_1, beta_2 and epsilon"),
    "int moments": (dict(optimizer=lambda s: {"m": {k: v.astype(np.int32) for k, v in s["m"].items()}}),
                    "moments must be float"),
    "history row": (dict(meta=lambda m: {**m, "history": [{"epoch": 1, "loss": "low"}]}), "its history"),
    "history order": (dict(meta=lambda m: {**m, "history": [{**m["history"][0], "epoch": 5}]}), "its history"),
    "callbacks": (dict(meta=lambda m: {**m, "callbacks": {"early_stopping": {"wait": "x"}}}), "callbacks"),
    "args": (dict(meta=lambda m: {**m, "args": ["features", 2]}), "no training settings"),
    "data record": (dict(meta=lambda m: {**m, "data": {"fingerprint": [1, 2]}}), "fingerprint"),
    "int weights": (dict(params=lambda p: {k: (v * 100).astype(np.int64) for k, v in p.items()}),
                    "expected one float dtype"),
    "complex weights": (dict(params=lambda p: {k: v.astype(np.complex64) for k, v in p.items()}),
                        "expected one float dtype"),
    "best.npz gone": (None, "no best.npz"),
}


@pytest.fixture(scope="module")
def done(tiny_data, tmp_path_factory) -> Path:
    """A finished 1-epoch run of the tiny set; tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("hardening") / "done"
    assert exit_code(train_main, ["--data", tiny_data, "--out", run, "--epochs", "1", *TINY_FLAGS]) == 0
    return run


def test_resume_refuses_every_damaged_last_npz_in_one_line(done, tmp_path, capsys):
    for case, (edit, words) in RESUME_DAMAGE.items():
        run = shutil.copytree(done, tmp_path / case.replace(" ", "-"))
        if edit is None:
            (run / "best.npz").unlink()
        else:
            _edit_last(run, **edit)
        capsys.readouterr()
        assert exit_code(train_main, ["--resume", run, "--epochs", "2"]) == 2, case
        err = capsys.readouterr().err
        assert_one_line_error(err, words)
        assert len(load_checkpoint(run / "last.npz").meta["history"]) in (0, 1), case  # no epoch was added


def test_predict_never_writes_over_its_model_or_its_images(done, tiny_data, tmp_path, capsys):
    """Every output goes into one new or empty folder, so none can land on the model or an input."""
    model = shutil.copy(done / "best.npz", tmp_path / "best.npz")
    images = tiny_data / "test" / "images"
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for argv, words in [(["--out", model], ["--out", "is a file: give a folder"]),
                        (["--out", images], ["--out", "already holds files"]),
                        (["--out", tmp_path], ["--out", "already holds files"])]:
        capsys.readouterr()
        assert exit_code(predict_main, ["--model", model, "--data", tiny_data, "--save-masks", *argv]) == 2
        assert_one_line_error(capsys.readouterr().err, *words)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert load_checkpoint(model).params


# --------------------------------------------------------------------------------------------
# train.py's output and signals; what escapes the named errors
# --------------------------------------------------------------------------------------------

def _train_cmd(data, out: str, epochs: int) -> list[str]:
    return [sys.executable, str(TRAIN_PY), "--data", str(data), "--out", out, "--epochs", str(epochs), *TINY_FLAGS]


def test_a_closed_or_full_stdout_stops_the_report_not_the_training(tiny_data, tmp_path):
    with open("/dev/full", "w") as full:
        done = subprocess.run(_train_cmd(tiny_data, "full", 2), cwd=tmp_path, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=ENV)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    proc = subprocess.Popen(_train_cmd(tiny_data, "piped", 2), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().startswith("run folder:")
    proc.stdout.close()  # train.py | head -1
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == ""
    for run in ("full", "piped"):
        assert load_checkpoint(tmp_path / run / "best.npz").meta["best_threshold"] is not None


def test_sigterm_stops_training_like_ctrl_c(tiny_data, tmp_path):
    proc = subprocess.Popen(_train_cmd(tiny_data, "run", 500), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "last.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # our own child only
    assert proc.wait(timeout=60) == 143
    err = proc.stderr.read().strip()
    assert err.startswith("terminated (SIGTERM);") and "Continue with: python train.py --resume run" in err, err
    load_checkpoint(tmp_path / "run" / "last.npz")


@pytest.mark.parametrize("raised, words", [
    (MemoryError("Unable to allocate 25.8 GiB for an array with shape (10, 13000, 13000)"),
     ["out of memory", "25.8 GiB", "--batch-size"]),
    (OSError(27, "File too large", "runs/x/history.csv"), ["runs/x/history.csv", "File too large"]),
    (RecursionError("maximum recursion depth exceeded"), ["nests too deeply"]),
])
def test_what_escapes_the_named_errors_is_one_line(monkeypatch, capsys, raised, words):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("tinyunet.training.train", fail)
    monkeypatch.setattr("tinyunet.prediction.predict", fail)
    assert exit_code(train_main, ["--epochs", "1"]) == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert exit_code(predict_main, []) == 2
    assert_one_line_error(capsys.readouterr().err, *words[:2])


# --------------------------------------------------------------------------------------------
# Data files: special files, links out, huge declared sizes and pixel counts, odd CSVs
# --------------------------------------------------------------------------------------------

def _kaggle_copy(tiny_data: Path, target: Path) -> Path:
    """A copy of the tiny set with train.csv as its masks (train/masks removed)."""
    copy = shutil.copytree(tiny_data, target)
    shutil.rmtree(copy / "train" / "masks")
    return copy


def test_limit_chooses_the_subset_before_decoding(tiny_data, monkeypatch):
    """--limit decodes only the images (and masks) it keeps, the same ones the seed chose before."""
    from tinyunet import data
    from tinyunet.prepare import load_split

    full = load_train(tiny_data)
    decoded = []
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda source, name: decoded.append(name) or decode(source, name))
    split = load_split(build_config({"data": str(tiny_data), "limit": 5, "seed": 3}), tiny_data)
    keep = np.sort(np.random.default_rng(3).choice(len(full.ids), 5, replace=False))
    assert split.ids == [full.ids[i] for i in keep]
    np.testing.assert_array_equal(split.images, full.images[keep])
    np.testing.assert_array_equal(split.masks, full.masks[keep])
    assert len(decoded) == 10  # five images and their five masks


def test_a_float_tiff_is_refused_by_its_mode_not_called_corrupt():
    from PIL import Image

    from tinyunet.data import read_image

    tiff = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(tiff, format="TIFF")
    with pytest.raises(DataError) as info:
        read_image(tiff.getvalue(), "x.tif")
    assert "PIL mode 'F'" in str(info.value) and "corrupt" not in str(info.value)


def test_special_files_and_links_leaving_the_data_are_refused_at_once(tiny_data, tmp_path):
    for name, make in [("fifo", lambda p: os.mkfifo(p)), ("zero", lambda p: p.symlink_to("/dev/zero")),
                       ("outside", lambda p: p.symlink_to(tmp_path / "elsewhere.png"))]:
        data = shutil.copytree(tiny_data, tmp_path / name)
        shutil.copy(next((data / "test" / "images").iterdir()), tmp_path / "elsewhere.png")
        make(data / "test" / "images" / "0000.png")  # sorted first
        with pytest.raises(DataError) as info:
            load_test(data)
        words = {"fifo": "not a regular file", "zero": "a link to /dev/zero, outside the data folder",
                 "outside": "outside the data folder"}
        assert words[name] in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(DataError, match="is not a regular file"):  # an image file given directly
        read_regular_file(tmp_path / "zero" / "test" / "images" / "0000.png", "x.png")


def test_a_link_inside_a_zip_is_refused(tiny_data, tmp_path):
    archive = tmp_path / "linked.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tiny_data / "test" / "images").iterdir()):
            z.write(path, f"test/images/{path.name}")
        link = zipfile.ZipInfo("test/images/0000.png")  # sorted first
        link.external_attr = (0o120777 << 16)  # S_IFLNK, as zip --symlinks stores one
        z.writestr(link, "/etc/passwd")
    with pytest.raises(DataError) as info:
        load_test(archive)
    assert "0000.png is a link inside the zip" in str(info.value) and "\n" not in str(info.value)


def test_a_small_file_claiming_many_pixels_or_bytes_is_refused_unread(tiny_data, tmp_path):
    from PIL import Image

    data = shutil.copytree(tiny_data, tmp_path / "bomb")
    Image.new("1", (13000, 13000)).save(data / "test" / "images" / "0000.png")  # 20 kB, 169 Mpx
    with pytest.raises(DataError, match=r"13000x13000 pixels, more than tinyunet reads"), _no_warnings():
        load_test(data)
    archive = tmp_path / "data.zip"
    source = _kaggle_copy(tiny_data, tmp_path / "csv-masks")
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(source).as_posix())
        z.getinfo("train.csv").file_size = 2 ** 31  # the central directory will declare 2 GiB
    with pytest.raises(DataError, match=r"train.csv declares 2,048 MiB in the zip.*refused unread"):
        load_train(archive)


class _no_warnings:
    """No warning (Pillow's decompression-bomb one included) may escape the block."""

    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        assert not self.caught, [str(w.message) for w in self.caught]
        return False


@pytest.mark.parametrize("case, words", [
    ("CR line endings", None),
    ("a stray CR", "train.csv is not a plain file name"),
    ("a field of 200000 characters", "train.csv's run-length string for id"),  # read: only its runs are wrong
    ("a field over the cap", "train.csv is not a readable CSV (line 1: field larger than field limit"),
])
def test_odd_csv_files_read_or_fail_in_one_line(tiny_data, tmp_path, case, words):
    import csv

    data = _kaggle_copy(tiny_data, tmp_path / "set")
    text = (data / "train.csv").read_text()
    first_id = text.splitlines()[1].split(",")[0]
    if case == "CR line endings":
        (data / "train.csv").write_bytes(text.replace("\n", "\r").encode())
        assert len(load_train(data).ids) == 24
        return
    if case == "a stray CR":
        edited = text.replace(f"\n{first_id},", f"\n{first_id}\r,", 1)
    else:
        edited = text.replace(f"\n{first_id},", f"\n{first_id}," + "1 1 " * 50000, 1)
    (data / "train.csv").write_text(edited)
    limit = csv.field_size_limit(100000 if case == "a field over the cap" else csv.field_size_limit())
    try:  # a cap of 100000 stops this field as MAX_CSV_FIELD stops one of 64 MiB
        with pytest.raises(DataError) as info:
            load_train(data)
    finally:
        csv.field_size_limit(limit)
    message = str(info.value).replace(str(data) + "/", "")
    assert words in message and "\n" not in message, message
