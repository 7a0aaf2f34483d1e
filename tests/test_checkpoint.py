"""Checkpoints: round trip, atomic writes, and one clear CheckpointError for every bad file."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinyunet import checkpoint as ckpt
from tinyunet.checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from tinyunet.models import load_model
from tinyunet.unet import UNet

CONFIG = {"features": 16, "depth": 4, "lr": 1e-3}


def make_params(features=16):
    rng = np.random.default_rng(0)
    return {
        "enc1.conv1.W": rng.standard_normal((3, 3, 1, features)).astype(np.float32),
        "enc1.conv1.b": np.zeros(features, np.float32),
        "out.W": rng.standard_normal((1, 1, features, 1)),  # float64 kept as float64
        "out.b": np.array([0.25]),
    }


def make_optimizer_state(params):
    return {
        "lr": 1e-4,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "t": 42,
        "m": {name: np.full_like(a, 0.5) for name, a in params.items()},
        "v": {name: np.full_like(a, 0.25) for name, a in params.items()},
    }


def make_meta():
    return {
        "model": CONFIG,
        "epoch": 7,
        "best_threshold": np.float32(0.5),  # NumPy scalars are welcome
        "history": [{"epoch": 0, "val_loss": 0.5}, {"epoch": 1, "val_loss": math.inf}],
        "callbacks": {"early_stopping": {"wait": 2, "best": 0.31}},
    }


@pytest.fixture
def saved(tmp_path):
    """A complete checkpoint on disk, and what was written into it."""
    params = make_params()
    path = save_checkpoint(tmp_path / "best.npz", params, make_meta(), make_optimizer_state(params))
    return path, params


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def rewrite(path, drop=(), **replace):
    """Rewrite the .npz at ``path`` without the members ``drop`` and with ``replace`` swapped in."""
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files if k not in drop}
    members.update(replace)
    np.savez(path, **members)


def meta_member(doc):
    return np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_keeps_values_dtypes_order_meta_and_optimizer(saved):
    path, params = saved
    loaded = load_checkpoint(path)
    assert list(loaded.params) == list(params)
    for name, array in params.items():
        assert loaded.params[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.params[name], array)
    assert loaded.meta == json.loads(json.dumps(make_meta(), default=float))
    assert loaded.meta["best_threshold"] == 0.5 and loaded.meta["history"][1]["val_loss"] == math.inf
    state = loaded.optimizer_state
    expected = make_optimizer_state(params)
    assert {k: state[k] for k in ("lr", "beta_1", "beta_2", "epsilon", "t")} == {
        k: expected[k] for k in ("lr", "beta_1", "beta_2", "epsilon", "t")
    }
    for key in ("m", "v"):
        assert list(state[key]) == list(params)
        for name in params:
            np.testing.assert_array_equal(state[key][name], expected[key][name])
            assert state[key][name].dtype == expected[key][name].dtype


def test_file_layout_is_plain_arrays_and_json(saved):
    path, params = saved
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        doc = json.loads(npz["meta.json"].tobytes())
    assert names == {"meta.json"} | {f"{p}/{n}" for p in ("param", "adam_m", "adam_v") for n in params}
    assert doc["format"] == "tinyunet-checkpoint" and doc["format_version"] == 1
    assert doc["param_order"] == list(params)
    assert doc["optimizer"]["t"] == 42 and doc["meta"]["epoch"] == 7


def test_without_optimizer_state_and_with_empty_moments(tmp_path):
    params = make_params()
    save_checkpoint(tmp_path / "a.npz", params, {})
    assert load_checkpoint(tmp_path / "a.npz").optimizer_state is None
    fresh = {"lr": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "t": 0, "m": {}, "v": {}}
    save_checkpoint(tmp_path / "b.npz", params, {}, fresh)
    assert load_checkpoint(tmp_path / "b.npz").optimizer_state == fresh


def test_device_arrays_are_brought_to_the_host(tmp_path):
    class FakeCupyArray:  # what tinyunet.backend.as_numpy recognises as a CuPy array
        def __init__(self, host):
            self.host = host

        def get(self):
            return self.host

    FakeCupyArray.__module__ = "cupy._core.core"
    params = {"w": FakeCupyArray(np.arange(4, dtype=np.float32))}
    save_checkpoint(tmp_path / "gpu.npz", params, {})
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "gpu.npz").params["w"], np.arange(4))


def test_overwrites_an_existing_checkpoint(saved):
    path, _ = saved
    save_checkpoint(path, {"w": np.ones(2)}, {"epoch": 8})
    assert list(load_checkpoint(path).params) == ["w"]


# --- atomic writes ------------------------------------------------------------------------------


def test_failed_rename_keeps_the_old_file_and_leaves_no_temporary(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint(path, {"w": np.ones(3)}, {"epoch": 8})
    assert_one_line_error(excinfo, str(path), "No space left on device")
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(saved, monkeypatch):
    path, params = saved
    before = path.read_bytes()

    def savez_then_interrupt(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # Ctrl-C in the middle of np.savez

    monkeypatch.setattr(ckpt.np, "savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, params, {"epoch": 8})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    assert load_checkpoint(path).meta["epoch"] == 7


KILL_MID_WRITE = """
import os, signal, sys
import numpy as np
from tinyunet import checkpoint

def savez_then_die(file, **arrays):
    file.write(b"PK\\x03\\x04 half a zip")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.np.savez = savez_then_die
checkpoint.save_checkpoint(sys.argv[1], {"w": np.ones(3)}, {"epoch": 8})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_process_killed_mid_write_leaves_the_old_checkpoint(saved):
    path, params = saved
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert list(load_checkpoint(path).params) == list(params)
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".best.npz.") and leftovers[0].endswith(".tmp")


def test_folder_that_cannot_be_written(tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file, not a folder")  # works as root too, unlike chmod
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint(not_a_folder / "best.npz", make_params(), {})
    assert_one_line_error(excinfo, str(not_a_folder), "cannot write checkpoint")
    with pytest.raises(CheckpointError, match="missing"):
        save_checkpoint(tmp_path / "missing" / "best.npz", make_params(), {})
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_unsaveable_content_is_refused_before_any_file_is_written(tmp_path):
    with pytest.raises(CheckpointError, match="object array"):
        save_checkpoint(tmp_path / "a.npz", {"w": np.array([{"x": 1}], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "a.npz", make_params(), {"config": object()})
    assert os.listdir(tmp_path) == []


# --- bad files ----------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path / "nope.npz")
    assert_one_line_error(excinfo, "nope.npz", "does not exist")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_file_names_the_file(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, str(path), "truncated")


def test_corrupted_bytes_inside_an_array_are_caught(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    start = data.index(b"param/enc1.conv1.W.npy") + 200  # well inside that member's array data
    data[start : start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, str(path), "truncated or corrupt")


def test_a_file_that_is_not_an_npz(tmp_path):
    text = tmp_path / "model.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a .npz checkpoint"):
        load_checkpoint(text)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        load_checkpoint(single)


def test_an_npz_that_is_not_a_tinyunet_checkpoint(tmp_path):
    other = tmp_path / "weights.npz"
    np.savez(other, W=np.ones((3, 3)))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(other)
    assert_one_line_error(excinfo, str(other), "not a tinyunet checkpoint", "meta.json")
    np.savez(other, **{"meta.json": meta_member({"format": "something-else"})})
    with pytest.raises(CheckpointError, match="not a tinyunet checkpoint"):
        load_checkpoint(other)


class _Trap:
    """Unpickling this runs code: the thing a checkpoint loader must never do."""

    sprung = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.sprung = True
    return "sprung"


def test_object_arrays_that_need_pickle_are_refused(saved):
    path, _ = saved
    rewrite(path, **{"param/out.b": np.array([_Trap()], dtype=object)})  # np.savez pickles it
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, str(path), "pickle", "refused", "param/out.b")
    assert not _Trap.sprung


def test_a_pickle_file_is_never_unpickled(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps(_Trap()))
    with pytest.raises(CheckpointError, match="not a .npz checkpoint"):
        load_checkpoint(path)
    assert not _Trap.sprung


def test_a_newer_format_version_asks_for_an_upgrade(saved):
    path, _ = saved
    with np.load(path) as npz:
        doc = json.loads(npz["meta.json"].tobytes())
    doc["format_version"] = 2
    rewrite(path, **{"meta.json": meta_member(doc)})
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, "format_version 2", "upgrade tinyunet")


def test_missing_parameter_listed_in_the_order(saved):
    path, _ = saved
    rewrite(path, drop=("param/out.W",))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, str(path), "incomplete", "out.W")


def test_missing_optimizer_moment(saved):
    path, _ = saved
    rewrite(path, drop=("adam_v/enc1.conv1.b",))
    with pytest.raises(CheckpointError, match="optimizer v arrays enc1.conv1.b"):
        load_checkpoint(path)


# --- compatibility with the model being built ---------------------------------------------------


def shapes(params):
    return {name: a.shape for name, a in params.items()}


def test_compatible_checkpoint_passes(saved):
    path, params = saved
    check_compatible(load_checkpoint(path), shapes(params), {"features": 16, "depth": 4})


def test_features_mismatch_names_both_configs_and_the_first_parameter(saved):
    path, _ = saved
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(load_checkpoint(path), shapes(make_params(features=8)), {"features": 8, "depth": 4})
    assert_one_line_error(
        excinfo,
        "checkpoint has features=16, depth=4; this model has features=8, depth=4",
        "enc1.conv1.W is (3, 3, 1, 16) in the checkpoint, (3, 3, 1, 8) in the model",
    )


def test_depth_mismatch_reports_different_parameter_lists(saved):
    path, params = saved
    items = list(shapes(params).items())
    deeper = dict(items[:2] + [("enc2.conv1.W", (3, 3, 16, 32))] + items[2:])
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(load_checkpoint(path), deeper, {"features": 16, "depth": 5})
    assert_one_line_error(excinfo, "depth=4; this model has features=16, depth=5", "parameter 2 is out.W")
    with pytest.raises(CheckpointError, match="the checkpoint has 4 parameters, the model 2"):
        check_compatible(load_checkpoint(path), dict(items[:2]), {"depth": 1})


def test_mismatch_without_a_recorded_config(tmp_path):
    bare = Checkpoint(path=tmp_path / "x.npz", params={"w": np.ones(2)}, meta={}, optimizer_state=None)
    with pytest.raises(CheckpointError, match="checkpoint has no recorded config; this model has features=8"):
        check_compatible(bare, {"w": (3,)}, {"features": 8})


# --- buffers (BatchNorm's moving statistics) ----------------------------------------------------


def make_buffers():
    rng = np.random.default_rng(1)
    return {  # not in alphabetical order: the saved order is the model's, not the archive's
        "enc1.bn2.moving_mean": rng.standard_normal(3).astype(np.float32),
        "enc1.bn2.moving_variance": rng.uniform(0.5, 2, 3).astype(np.float32),
        "enc1.bn1.moving_mean": rng.standard_normal(4),
    }


def test_buffers_round_trip_in_order(tmp_path):
    params, buffers = make_params(), make_buffers()
    path = save_checkpoint(tmp_path / "bn.npz", params, make_meta(), make_optimizer_state(params), buffers=buffers)
    loaded = load_checkpoint(path)
    assert list(loaded.buffers) == list(buffers) and list(loaded.params) == list(params)
    for name, array in buffers.items():
        assert loaded.buffers[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.buffers[name], array)
    with np.load(path, allow_pickle=False) as npz:
        doc = json.loads(npz["meta.json"].tobytes())
        assert {f"buffer/{name}" for name in buffers} <= set(npz.files)
    assert doc["buffer_order"] == list(buffers)


def test_a_checkpoint_without_buffers_keeps_the_old_format(saved, tmp_path):
    path, _ = saved
    with np.load(path, allow_pickle=False) as npz:
        doc = json.loads(npz["meta.json"].tobytes())
        assert not [name for name in npz.files if name.startswith("buffer/")]
    assert "buffer_order" not in doc
    assert load_checkpoint(path).buffers == {}
    empty = save_checkpoint(tmp_path / "empty.npz", make_params(), {}, buffers={})
    with np.load(empty, allow_pickle=False) as npz:
        assert "buffer_order" not in json.loads(npz["meta.json"].tobytes())


def test_missing_buffer_listed_in_the_order(tmp_path):
    path = save_checkpoint(tmp_path / "bn.npz", make_params(), {}, buffers=make_buffers())
    rewrite(path, drop=("buffer/enc1.bn1.moving_mean",))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_one_line_error(excinfo, str(path), "incomplete", "buffers enc1.bn1.moving_mean")


def _residual_model_file(tmp_path, buffers=None):
    """A residual U-Net with random BatchNorm statistics, saved as train.py saves best.npz."""
    model = UNet(features=2, depth=2, block="residual", seed=4)
    rng = np.random.default_rng(2)
    for name, value in model.buffers.items():  # random statistics, so that loading them matters
        value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith("variance") else rng.standard_normal(
            value.shape)
    meta = {"model": model.config, "fit": "resize", "input_size": 16, "epoch": 1, "best_threshold": 0.5}
    path = save_checkpoint(tmp_path / "best.npz", model.params, meta,
                           buffers=model.buffers if buffers is None else buffers(model.buffers))
    return model, path


def test_load_model_predicts_exactly_as_the_saved_model(tmp_path):
    model, path = _residual_model_file(tmp_path)
    loaded, checkpoint = load_model(path)
    assert loaded.config == model.config and loaded.config["block"] == "residual"
    assert list(checkpoint.buffers) == list(model.buffers)
    x = np.random.default_rng(0).random((3, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    fresh = UNet(**model.config)  # the same weights with the initial statistics (mean 0, variance 1)
    fresh.load_params(checkpoint.params, {name: b.copy() for name, b in fresh.buffers.items()})
    assert not np.allclose(fresh.predict(x), model.predict(x), atol=1e-4)  # the statistics matter


@pytest.mark.parametrize("edit", [
    lambda buffers: dict(list(buffers.items())[:-1]),  # one missing
    lambda buffers: {name: value[:1] for name, value in buffers.items()},  # wrong shapes
    lambda buffers: {},  # none at all
], ids=["missing", "shape", "none"])
def test_load_model_refuses_buffers_that_do_not_fit(tmp_path, edit):
    _, path = _residual_model_file(tmp_path, buffers=edit)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    assert_one_line_error(excinfo, str(path), "buffer")


def test_load_model_refuses_non_finite_statistics(tmp_path):
    def poisoned(buffers):
        buffers = {name: value.copy() for name, value in buffers.items()}
        buffers["bridge.bn1.moving_variance"][0] = np.nan
        return buffers

    _, path = _residual_model_file(tmp_path, buffers=poisoned)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    assert_one_line_error(excinfo, "NaN or infinite", "bridge.bn1.moving_variance")
