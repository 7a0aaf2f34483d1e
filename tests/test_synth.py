"""Tests of tinyunet.synth: the synthetic seismic-salt set in Kaggle's layout."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet import data, synth
from tinyunet.rle import rle_decode


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def set400(tmp_path_factory) -> Path:
    """400 training and 20 test images, seed 0 (shared by the tests that only read it)."""
    return synth.generate(tmp_path_factory.mktemp("synth") / "set", n_train=400, n_test=20, seed=0)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = all_files(synth.generate(tmp_path / "a", n_train=15, n_test=4, seed=3))
    b = all_files(synth.generate(tmp_path / "b", n_train=15, n_test=4, seed=3))
    c = all_files(synth.generate(tmp_path / "c", n_train=15, n_test=4, seed=4))
    assert a == b
    assert a.keys() != c.keys()
    assert len(a) == 15 * 2 + 4 + 2


def test_image_does_not_depend_on_set_size(tmp_path):
    small = data.load_train(synth.generate(tmp_path / "s", n_train=5, n_test=0))
    large = data.load_train(synth.generate(tmp_path / "l", n_train=12, n_test=0))
    for i, image_id in enumerate(small.ids):
        j = large.ids.index(image_id)
        np.testing.assert_array_equal(small.images[i], large.images[j])


def test_layout_loads(set400):
    ts = data.load_train(set400)
    assert len(ts) == 400
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in ts.ids)
    assert ts.images.shape == (400, 101, 101)
    assert 0 <= ts.images.min() and ts.images.max() <= 1
    assert set(np.unique(ts.masks)) == {0.0, 1.0}
    assert not np.isnan(data.load_depths(set400, ts.ids)).any()
    test_ids, test_images = data.load_test(set400)
    assert test_images.shape == (20, 101, 101) and not set(test_ids) & set(ts.ids)
    mask_file = Image.open(set400 / "train" / "masks" / f"{ts.ids[0]}.png")
    assert mask_file.mode == "L" and set(np.unique(mask_file)) <= {0, 255}
    with open(set400 / "depths.csv") as f:
        assert {row["id"] for row in csv.DictReader(f)} == set(ts.ids) | set(test_ids)


def test_coverage_like_the_real_set(set400):
    classes = data.coverage_class(data.coverage(data.load_train(set400).masks))
    assert 0.3 <= np.mean(classes == 0) <= 0.5
    assert set(classes.tolist()) == set(range(11))


def test_train_csv_matches_the_masks(set400, tmp_path):
    ts = data.load_train(set400)
    with open(set400 / "train.csv") as f:
        rows = {row["id"]: row["rle_mask"] for row in csv.DictReader(f)}
    assert sorted(rows) == ts.ids
    for image_id, mask in zip(ts.ids, ts.masks):
        np.testing.assert_array_equal(rle_decode(rows[image_id], mask.shape), mask > 0)


def test_salt_is_not_a_brightness_threshold(set400):
    """No global gray threshold beats predicting 'no salt' everywhere by more than a little."""
    ts = data.load_train(set400)
    gray, salt = ts.images.ravel(), ts.masks.ravel() > 0
    baseline = max(salt.mean(), 1 - salt.mean())
    best = max(max(np.mean((gray > t) == salt), np.mean((gray <= t) == salt))
               for t in np.linspace(0, 1, 41))
    assert best < baseline + 0.02


def test_other_size(tmp_path):
    ts = data.load_train(synth.generate(tmp_path / "s", n_train=6, n_test=1, size=64))
    assert ts.images.shape == (6, 64, 64)


def test_refuses_a_folder_in_use_and_leaves_no_partial_files(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        synth.generate(tmp_path / "used", n_train=2, n_test=1)
    (tmp_path / "empty").mkdir()
    synth.generate(tmp_path / "empty", n_train=2, n_test=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "used"]
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "bad", n_train=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "used"]


def test_sample_grid_and_command_line(tmp_path, set400):
    fake = data.load_train(set400)
    out = synth.sample_grid(tmp_path / "grid.png", (fake.images, fake.masks), (fake.images, fake.masks), n=4)
    assert Image.open(out).format == "PNG"
    synth.main([str(tmp_path / "cli"), "--n-train", "8", "--n-test", "2",
                "--grid", str(tmp_path / "cli.png"), "--real", str(set400)])
    assert len(list((tmp_path / "cli" / "train" / "images").iterdir())) == 8
    assert (tmp_path / "cli.png").stat().st_size > 1000
