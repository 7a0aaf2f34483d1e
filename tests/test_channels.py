"""Images of any channel count (issue 15): .npy arrays (H, W[, C]) read without unpickling, checked from
their header, trained on and predicted with C channels; every bad array or channel count is one line."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, exit_code
from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import predict_main, train_main
from tinyunet.data import DataError, ImageFiles, image_size, load_test, load_train, read_image, read_mask

TINY = ["--features", "2", "--depth", "2", "--input-size", "16", "--epochs", "1", "--batch-size", "4",
        "--no-plots", "--no-progress", "--threads", "1"]
CHANNELS = 5


def npy_bytes(array: np.ndarray) -> bytes:
    """What numpy.save writes for ``array`` (objects pickled, as numpy.save does by default)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_set(folder, n=6, channels=CHANNELS, size=(24, 32)):
    """``n`` float32 (H, W, channels) images in [0, 1] with a bright disc, its mask as a bool (H, W) .npy,
    in folder/images + folder/masks; returns the folder."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / (3 + i % 3)) ** 2  # (H, W)
        bands = np.where(disc[..., None], 0.8, 0.2) * np.linspace(0.5, 1, channels)  # (H, W, C)
        image = np.clip(bands + rng.uniform(0, 0.1, (h, w, channels)), 0, 1).astype(np.float32)
        np.save(folder / "images" / f"cell_{i:02d}.npy", image)
        np.save(folder / "masks" / f"cell_{i:02d}.npy", disc)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 5-channel .npy set and the 1-epoch model trained on it (in a folder of its own): (data, model)."""
    root = tmp_path_factory.mktemp("channels")
    data = npy_set(root / "d")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert exit_code(train_main, ["--data", data, "--out", root / "run", *TINY]) == 0
    return data, root / "run" / "best.npz"


def test_npy_dtypes_scale_like_pngs_and_sizes_come_from_the_header():
    ones = np.ones((3, 4), np.float32)
    for array in (np.full((3, 4), 255, np.uint8), np.full((3, 4), 65535, np.uint16), np.ones((3, 4), bool),
                  ones.astype(np.float16), ones, ones.astype(np.float64), ones.astype(">f4")):
        image = read_image(npy_bytes(array), "a.npy")
        assert image.dtype == np.float32 and image.shape == (3, 4) and np.all(image == 1), array.dtype
    assert read_image(npy_bytes(np.zeros((3, 4, 1), np.uint8)), "a.npy").shape == (3, 4)  # one channel: gray
    equal = np.full((3, 4, 3), 128, np.uint8)  # equal bands: gray in a PNG, three channels in an .npy
    assert read_image(npy_bytes(equal), "a.npy").shape == (3, 4, 3)
    assert read_image(npy_bytes(np.asfortranarray(np.zeros((3, 4, 16), np.uint16))), "a.npy").shape == (3, 4, 16)
    assert image_size(npy_bytes(np.zeros((7, 9, 5), np.float32)), "a.npy") == (7, 9)
    assert read_mask(npy_bytes(np.eye(4, dtype=bool)[..., None]), "m.npy").sum() == 4
    soft = npy_bytes(np.linspace(0, 1, 16).reshape(4, 4))
    with pytest.raises(DataError, match=r"not binary: read as a float64 \.npy array"):
        read_mask(soft, "m.npy")
    assert read_mask(soft, "m.npy", threshold=0.5).sum() == 8


def test_an_rgba_png_drops_its_alpha():
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 4, 4), (10, 20, 30, 0), np.uint8), mode="RGBA").save(buffer, format="PNG")
    assert read_image(buffer.getvalue(), "a.png").shape == (3, 4, 3)


def test_npy_files_in_kaggles_layout_in_a_zip(tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"train/images/{i}.npy", npy_bytes(np.full((8, 6, 4), i * 80, np.uint8)))
            zf.writestr(f"train/masks/{i}.npy", npy_bytes(np.eye(8, 6, dtype=np.uint8)))
        zf.writestr("test/images/t.npy", npy_bytes(np.zeros((8, 6, 4), np.float32)))
    train = load_train(archive)
    assert train.images.shape == (3, 8, 6, 4) and train.masks.shape == (3, 8, 6)
    ids, images = load_test(archive)
    assert ids == ["t"] and images.shape == (1, 8, 6, 4)
    with ImageFiles([archive]) as files:
        assert files.sizes() == [(8, 6)]


def test_a_5_channel_set_trains_and_predicts_a_folder_and_one_file(trained, tmp_path, monkeypatch):
    data, model = trained
    assert load_train(data).images.shape == (6, 24, 32, CHANNELS)
    assert load_checkpoint(model).meta["model"]["in_channels"] == CHANNELS
    monkeypatch.chdir(tmp_path)
    assert exit_code(predict_main, ["--model", model, "--data", data / "images", "--save-masks", "--overlays",
                                    "--out", "folder", "--threads", "1"]) == 0
    assert sorted(os.listdir("folder/masks")) == [f"cell_{i:02d}.png" for i in range(6)]
    with Image.open("folder/overlays/cell_00.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (32, 24)
    assert (tmp_path / "folder" / "preview.png").is_file()
    assert exit_code(predict_main, ["--model", model, "--data", data / "images" / "cell_03.npy", "--save-masks",
                                    "--out", "one", "--threads", "1"]) == 0
    with Image.open("one/masks/cell_03.png") as mask:
        assert mask.size == (32, 24)


@pytest.mark.parametrize("content, words", [
    (pickle.dumps(np.zeros((24, 32, CHANNELS))), ["pickle", "never unpickles"]),
    (npy_bytes(np.full((24, 32), None, dtype=object)), ["Python objects", "never unpickles"]),
    (npy_bytes(np.full((24, 32, CHANNELS), np.nan, np.float32)), ["NaN", "[0, 1]"]),
    (npy_bytes(np.full((24, 32, CHANNELS), 3.0, np.float32)), ["outside [0, 1]", "scale"]),
    (npy_bytes(np.zeros((24, 32, 17), np.uint8)), ["(24, 32, 17)", "1 to 16 channels"]),
    (npy_bytes(np.zeros((24, 32, 3), np.float32)), ["cell_00.npy has 5 channel(s)", "has 3", "one channel count"]),
    (npy_bytes(np.zeros((24, 32), np.int64)), ["dtype int64"]),
    (npy_bytes(np.zeros((24, 32, CHANNELS), np.uint8))[:-10], ["truncated"]),
])
def test_a_bad_npy_image_is_a_one_line_error(tmp_path, monkeypatch, capsys, content, words):
    data = npy_set(tmp_path / "d", n=3)
    (data / "images" / "cell_01.npy").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert exit_code(train_main, ["--data", data, "--out", "run", *TINY]) == 2
    assert_one_line_error(capsys.readouterr().err, "cell_01.npy", *words)


def test_a_multichannel_npy_mask_is_refused(tmp_path):
    data = npy_set(tmp_path / "d", n=3)
    np.save(data / "masks" / "cell_02.npy", np.zeros((24, 32, 2), bool))
    with pytest.raises(DataError, match=r"cell_02\.npy has 2 channels: an \.npy mask is \(H, W\)"):
        load_train(data)


def test_predict_refuses_another_channel_count(trained, tmp_path, monkeypatch, capsys):
    _, model = trained
    np.save(tmp_path / "three.npy", np.zeros((24, 32, 3), np.float32))
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "gray.png")
    monkeypatch.chdir(tmp_path)
    for image, have in (("three.npy", 3), ("gray.png", 1)):
        capsys.readouterr()
        assert exit_code(predict_main, ["--model", model, "--data", image, "--out", "p"]) == 2
        assert_one_line_error(capsys.readouterr().err, f"{have} channel(s)", f"takes {CHANNELS}")
        assert not (tmp_path / "p").exists()  # a failed command leaves no folder behind
