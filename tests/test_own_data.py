"""A user's own data (issue 15), on generated files only: the plain layout and mask suffixes, RGB, mixed
sizes, soft masks, tiles, predicting a folder or single files, the validation-split evaluation, the
collapse warning, and that no output lands in the current folder."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from helpers import exit_code
from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import predict_main, train_main
from tinyunet.config import build_config, config_from_args
from tinyunet.data import DataError, load_images, load_train
from tinyunet.pipeline import probabilities
from tinyunet.prepare import load_split
from tinyunet.training import collapse_note

TINY = ["--features", "2", "--depth", "2", "--input-size", "16", "--epochs", "1", "--batch-size", "4",
        "--no-plots", "--no-progress", "--threads", "1"]


def blob_set(folder, n=8, sizes=((24, 32),), rgb=False, suffix="", soft=False, image_ext=".png"):
    """``n`` images with a bright disc (its mask) in folder/images + folder/masks; returns the folder."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / (3 + i % 3)) ** 2
        gray = np.where(disc, 200, 40).astype(np.uint8) + rng.integers(0, 20, (h, w)).astype(np.uint8)
        image = np.stack([gray, gray // 2, 255 - gray], axis=2) if rgb else gray
        Image.fromarray(image).save(folder / "images" / f"cell_{i:02d}{image_ext}")
        mask = np.where(disc, 255, 0).astype(np.uint8)
        if soft:  # 256 levels: a blurred edge
            mask = np.clip(mask.astype(np.int32) * 0.9 + rng.integers(0, 25, (h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(mask).save(folder / "masks" / f"cell_{i:02d}{suffix}.png")
    return folder


def test_plain_layout_with_suffix_jpeg_and_a_soft_mask_threshold(tmp_path):
    data = blob_set(tmp_path / "d", suffix="_mask", soft=True, image_ext=".jpg")
    with pytest.raises(DataError, match=r"not binary.*--mask-threshold"):
        load_train(data, mask_suffix="_mask")
    with pytest.raises(DataError, match=r"8 image\(s\) .* have no mask"):
        load_train(data, mask_threshold=0.5)  # without the suffix no name matches
    ts = load_train(data, mask_suffix="_mask", mask_threshold=0.5)
    assert ts.ids == [f"cell_{i:02d}" for i in range(8)] and ts.images.shape == (8, 24, 32)
    assert set(np.unique(ts.masks)) == {0.0, 1.0}


def test_rgb_and_mixed_sizes_train_and_the_checkpoint_knows_its_channels(tmp_path, monkeypatch, capsys):
    data = blob_set(tmp_path / "d", n=10, sizes=((24, 32), (40, 20)), rgb=True)
    ts = load_train(data)
    assert isinstance(ts.images, list) and {i.shape for i in ts.images} == {(24, 32, 3), (40, 20, 3)}
    monkeypatch.chdir(tmp_path)
    for fit in ("resize", "pad"):
        run = tmp_path / fit
        assert exit_code(train_main, ["--data", data, "--out", run, "--fit", fit, *TINY]) == 0
        meta = load_checkpoint(run / "best.npz").meta
        assert meta["model"]["in_channels"] == 3 and meta["args"]["fit"] == fit
    out = capsys.readouterr().out
    assert "3 channels" in out
    assert "validation score (competition metric)" in out and "validation competition score" not in out


def test_folds_over_a_set_of_mixed_sizes(tmp_path):
    """Cross-validation gathers the out-of-fold maps of images of different sizes, each at its own size."""
    import json

    from tinyunet.folds import train_folds

    data = blob_set(tmp_path / "d", n=10, sizes=((24, 32), (40, 20)))
    root = train_folds(build_config({"data": str(data), "out": str(tmp_path / "cv"), "folds": 2, "epochs": 1,
                                     "features": 2, "depth": 2, "input_size": 16, "batch_size": 4, "fit": "pad",
                                     "progress": False, "plots": False, "threads": 1}))
    cv = json.loads((root / "cv.json").read_text())
    assert len(cv["fold_scores"]) == 2 and 0 <= cv["cv_score"] <= 1
    assert load_checkpoint(root / "ensemble.npz").meta["cv"]["cv_score"] == cv["cv_score"]


def test_predict_a_folder_and_single_files_full_size_masks_overlays_and_no_csv(tmp_path, monkeypatch):
    data = blob_set(tmp_path / "d", n=6, sizes=((24, 32), (40, 20)))
    monkeypatch.chdir(tmp_path)
    assert exit_code(train_main, ["--data", data, "--out", "run", *TINY]) == 0
    one, two = data / "images" / "cell_00.png", data / "images" / "cell_01.png"
    before = sorted(os.listdir(tmp_path))
    assert exit_code(predict_main, ["--model", "run/best.npz", "--data", one, two, "--save-masks", "--overlays"]) == 0
    assert sorted(os.listdir(tmp_path)) == before  # nothing new in the current folder
    (out,) = (tmp_path / "run" / "predictions").iterdir()  # beside the model, not the current folder
    assert sorted(os.listdir(out / "masks")) == ["cell_00.png", "cell_01.png"]
    with Image.open(out / "masks" / "cell_01.png") as mask, Image.open(out / "overlays" / "cell_01.png") as over:
        assert mask.size == (20, 40) and over.size == (20, 40) and over.mode == "RGB"
    assert not (out / "submission.csv").exists()  # not TGS-like: no Kaggle CSV unless asked
    # a plain folder of images, and a second command: a new folder, the first one left alone
    assert exit_code(predict_main, ["--model", "run/best.npz", "--data", data / "images", "--csv"]) == 0
    second = sorted((tmp_path / "run" / "predictions").iterdir())
    assert len(second) == 2 and (second[1] / "submission.csv").is_file() and (second[0] / "masks").is_dir()
    ids, images = load_images([data / "images"])
    assert len(ids) == 6 and isinstance(images, list)


def test_a_gray_model_takes_rgb_images_by_their_luma(tmp_path, monkeypatch, capsys):
    gray = blob_set(tmp_path / "g", n=6)
    rgb = blob_set(tmp_path / "c", n=2, rgb=True)
    monkeypatch.chdir(tmp_path)
    assert exit_code(train_main, ["--data", gray, "--out", "run", *TINY]) == 0
    assert exit_code(predict_main, ["--model", "run/best.npz", "--data", rgb / "images", "--out", "p"]) == 0
    assert "converted to the model's 1 channel(s)" in capsys.readouterr().out


def test_evaluate_val_scores_exactly_the_runs_validation_part(tmp_path, monkeypatch, capsys):
    data = blob_set(tmp_path / "d", n=10)
    monkeypatch.chdir(tmp_path)
    assert exit_code(train_main, ["--data", data, "--out", "run", *TINY]) == 0
    capsys.readouterr()
    from tinyunet.prediction import predict

    result = predict(model="run/best.npz", evaluate="val", out="ev", progress=False, log=lambda m: None)
    meta = load_checkpoint(tmp_path / "run" / "best.npz").meta
    split = load_split(config_from_args(meta["args"], tmp_path), data)
    assert result.ids == [split.ids[i] for i in split.val_idx] and result.report.n_images == len(split.val_idx) < 10
    assert result.report.score == pytest.approx(meta["val_score"])  # the tuned threshold's own number
    rows = (tmp_path / "ev" / "scores.csv").read_text().splitlines()
    assert rows[0] == "id,dice,iou,competition_score" and [r.split(",")[0] for r in rows[1:]] == result.ids
    assert 0 <= result.report.set_dice <= 1 and 0 <= result.report.mean_dice <= 1


def test_tiles_cover_large_images_in_bounded_pieces():
    class Pointwise:  # a fully convolutional stand-in: its output at a pixel depends on that pixel alone
        config = {"depth": 2}
        xp, dtype = np, np.dtype(np.float32)
        seen = []

        def forward(self, x, train=False):
            self.seen.append(x.shape)
            return (x[..., :1] - 0.5) * 4

    images = np.random.default_rng(0).random((1, 150, 90), dtype=np.float32)
    model = Pointwise()
    whole = probabilities(model, images, "pad", 0, tile=4096)
    model.seen.clear()
    tiled = probabilities(model, images, "pad", 0, tile=64, batch_size=3)
    np.testing.assert_allclose(tiled, whole, rtol=1e-6)
    assert max(max(s[1:3]) for s in model.seen) <= 64 and max(s[0] for s in model.seen) <= 3


def test_a_run_whose_model_predicts_one_class_everywhere_ends_with_the_warning(tmp_path, monkeypatch, capsys):
    """The note reaches the end of train.py's report: finish() scores what the best model predicts (here,
    a stand-in predicting 0.9 everywhere) and says so."""
    from tinyunet import training

    def everywhere(model, images, *args, **kwargs):  # (M, H, W), or a list for mixed sizes
        return [np.full(image.shape[:2], 0.9, np.float32) for image in images] if isinstance(images, list) \
            else np.full(images.shape[:3], 0.9, np.float32)

    data = blob_set(tmp_path / "d", n=10, sizes=((24, 32), (40, 20)))
    monkeypatch.setattr(training, "probabilities", everywhere)
    assert train_main(["--data", str(data), "--out", str(tmp_path / "run"), *TINY]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "predicts foreground (a full mask) on all 3 validation images" in out[-1]  # 10 images: 7 + 3
    assert "more --epochs" in out[-1]  # the advice comes with it


def test_the_collapse_warning():
    assert "foreground (a full mask) on all 4 validation images" in collapse_note(100, 30, 100, 4)
    assert "more --epochs" in collapse_note(0, 30, 100, 4)
    assert collapse_note(50, 30, 100, 4) is None
    assert collapse_note(0, 0, 100, 4) is None  # the truth is empty too: nothing collapsed
