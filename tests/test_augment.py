"""Augmentations beyond flips (--augment) and the loss on the central pixels (--loss-region central): each op's
geometry and ranges, image and mask moving together, the draws as a function of (seed, epoch), the GPU path
without host reads, a training run that resumes bit-exactly, and the boxed loss's values and gradients."""

from __future__ import annotations

import re

import numpy as np
import pytest

import cupy_standin
from helpers import assert_one_line_error, exit_code
from test_channels import npy_set
from test_own_data import blob_set
from test_training import assert_same_arrays, read_history, tiny
from tinyunet import augment, training
from tinyunet.augment import AUG_BRIGHT, AUG_CONTRAST, AUG_SCALE, Augmentation, brightness_contrast, shift, zoom
from tinyunet.backend import as_array, as_numpy
from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import parse_train_args, train_main
from tinyunet.config import ConfigError, build_config, validate
from tinyunet.gradcheck import assert_gradients_close, numerical_gradient
from tinyunet.losses import LOSSES, binary_crossentropy, loss_in_box
from tinyunet.training import train
from tinyunet.transforms import crop, pad_to_multiple, resize

ALL = ("shift", "scale", "brightness")


def batch(b=3, size=(12, 16), channels=1, seed=0):
    """Images (B, H, W, C) in [0, 1] and binary masks (B, H, W, 1), float32."""
    rng = np.random.default_rng(seed)
    x = rng.random((b, *size, channels), dtype=np.float32)
    y = (rng.random((b, *size, 1)) < 0.4).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 5])
def test_every_augmentation_keeps_shapes_dtypes_and_the_masks_binary(xp, channels):
    x, y = batch(channels=channels)
    for names in [(name,) for name in ALL] + [ALL]:
        aug = Augmentation(names, np.random.default_rng([0, 1]), 3, x.shape[1:3], xp, x.dtype)
        xa, ya = aug(as_array(x, xp), as_array(y, xp), slice(0, 3))
        assert isinstance(xa, xp.ndarray) and xa.shape == x.shape and xa.dtype == np.float32, names
        assert ya.shape == y.shape and ya.dtype == np.float32, names
        xa, ya = as_numpy(xa), as_numpy(ya)
        assert set(np.unique(ya)) <= {0.0, 1.0} and 0 <= xa.min() and xa.max() <= 1, names
        assert not np.array_equal(xa, x), names  # something happened


def test_a_shift_moves_a_marked_pixel_in_image_and_mask_alike_and_reflects_the_border(xp):
    x, y = np.zeros((2, 10, 12, 2), np.float32), np.zeros((2, 10, 12, 1), np.float32)
    x[:, 4, 5], y[:, 4, 5] = 1, 1
    moves = np.array([[2, -3], [-1, 0]])  # (down, right) per image
    both = as_numpy(shift(as_array(np.concatenate([x, y], axis=3), xp), as_array(moves, xp)))
    for i, (down, right) in enumerate(moves):
        for channel in range(3):  # both image channels and the mask
            assert np.argwhere(both[i, ..., channel]).tolist() == [[4 + down, 5 + right]]
    rng = np.random.default_rng(0)
    x = rng.random((2, 10, 12, 1))
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")  # the reference fill: np.pad's reflect
    moved = as_numpy(shift(as_array(x, xp), as_array(moves, xp)))
    for i, (down, right) in enumerate(moves):
        np.testing.assert_array_equal(moved[i], padded[i, 3 - down:13 - down, 3 - right:15 - right])


def test_a_zoom_is_the_resized_window_and_keeps_an_image_equal_to_its_mask(xp):
    x, y = batch(b=2, size=(20, 24))
    windows = np.array([[3, 2, 17, 21], [0, 0, 20, 24]])  # (top, left, height, width); the second: the whole
    zoomed = as_numpy(zoom(as_array(x, xp), windows))
    np.testing.assert_array_equal(zoomed[0], resize(x[0:1, 3:20, 2:23], (20, 24))[0])
    np.testing.assert_array_equal(zoomed[1], x[1])
    aug = Augmentation(("scale",), np.random.default_rng([0, 0]), 2, (20, 24), xp, np.float32)
    assert (aug.windows[:, 2:] < (20, 24)).any()  # a real zoom
    xa, ya = aug(as_array(y, xp), as_array(y, xp), slice(0, 2))  # the image is its mask
    np.testing.assert_array_equal(as_numpy(xa) > 0.5, as_numpy(ya) > 0.5)


def test_zoom_windows_stay_inside_the_image_for_every_factor():
    factors = np.array([1.0, 1 + AUG_SCALE, 1.07, 1.15])
    where = np.array([[0.0, 0.0], [0.999, 0.999], [0.5, 0.2], [0.0, 0.999]])
    windows = augment.zoom_windows(factors, where, (112, 96))
    np.testing.assert_array_equal(windows[:, 2:], [[112, 96], [97, 83], [105, 90], [97, 83]])  # round(side / f)
    assert (windows[:, 0] >= 0).all() and (windows[:, 0] + windows[:, 2] <= 112).all()
    assert (windows[:, 1] >= 0).all() and (windows[:, 1] + windows[:, 3] <= 96).all()
    assert windows[1, 0] == 112 - 97 and windows[3, 1] == 96 - 83 and windows[0, :2].tolist() == [0, 0]


def test_brightness_and_contrast_follow_the_formula_on_every_channel_and_leave_masks_alone(xp):
    x, y = batch(b=2, channels=3)
    c, b = np.array([1.1, 0.9], np.float32), np.array([0.05, -0.1], np.float32)
    out = as_numpy(brightness_contrast(as_array(x, xp), as_array(c, xp), as_array(b, xp)))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # one mean per image, over its pixels and channels
    np.testing.assert_allclose(out, np.clip((x - mean) * c[:, None, None, None] + mean + b[:, None, None, None],
                                            0, 1), rtol=1e-6)
    aug = Augmentation(("brightness",), np.random.default_rng([3, 0]), 2, x.shape[1:3], xp, np.float32)
    gains = as_numpy(aug.gains)
    assert (np.abs(gains[:, 0] - 1) <= AUG_CONTRAST).all() and (np.abs(gains[:, 1]) <= AUG_BRIGHT).all()
    xa, ya = aug(as_array(x, xp), as_array(y, xp), slice(0, 2))
    np.testing.assert_array_equal(as_numpy(ya), y)
    assert as_numpy(xa).min() >= 0 and as_numpy(xa).max() <= 1


def test_the_draws_repeat_for_one_seed_and_epoch_and_differ_across_epochs():
    def draws(seed, epoch):
        aug = Augmentation(ALL, np.random.default_rng([seed, epoch]), 16, (112, 112), np, np.float32)
        return aug.moves, aug.windows, aug.gains

    first, again, later = draws(0, 3), draws(0, 3), draws(0, 4)
    for a, b, c in zip(first, again, later):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    moves = np.concatenate([draws(0, epoch)[0] for epoch in range(20)])
    assert moves.min() == -augment.max_shift(112) == -8 and moves.max() == 8  # whole pixels, both directions


def test_the_gpu_path_augments_and_boxes_the_loss_without_host_reads(monkeypatch):
    cupy = cupy_standin.install(monkeypatch)
    x, y = batch(b=4, size=(12, 12), channels=2)
    aug = Augmentation(ALL, np.random.default_rng([0, 0]), 4, (12, 12), cupy, np.float32)  # once per epoch
    xd, yd = cupy.asarray(x), cupy.asarray(y)
    logits = cupy.asarray(np.random.default_rng(1).standard_normal((4, 12, 12, 1)).astype(np.float32))
    mirrored = cupy.asarray(np.array([True, False, True, False]))
    cupy_standin.refuse_host_reads(monkeypatch)
    monkeypatch.setattr(cupy, "asarray", lambda *args, **kwargs: pytest.fail("a host-to-device copy in the step"))
    xa, ya = aug(xd, yd, slice(0, 4))
    loss, dlogits = loss_in_box(LOSSES["bce_lovasz"], logits, ya, (1, 2, 10, 9), mirrored)
    assert all(isinstance(a, cupy.ndarray) for a in (xa, ya, loss, dlogits)) and loss.ndim == 0


# --------------------------------------------------------------------------------------------
# Training with them
# --------------------------------------------------------------------------------------------

AUGMENTED = {"fit": "pad", "flip_mode": "random", "augment": ALL, "loss_region": "central", "loss": "bce",
             "loss2": "lovasz", "loss2_epoch": 2, "threads": 2}


def test_an_augmented_central_loss_run_saves_its_flags_and_resumes_bit_exactly(tiny_data, tmp_path, capsys):
    straight = train(tiny(tiny_data, tmp_path / "straight", epochs=2, **AUGMENTED))
    header = capsys.readouterr().out
    assert "augment: every training batch, redrawn each epoch: shift up to 8 x 8 px" in header  # 104 x 104
    assert "on the central 101x101 pixels only" in header
    half = train(tiny(tiny_data, tmp_path / "half", epochs=1, **AUGMENTED))
    assert load_checkpoint(half / "last.npz").meta["args"]["augment"] == list(ALL)
    with pytest.raises(ConfigError, match=r"^--augment shift differs .* \(augment=shift,scale,brightness in"):
        train(build_config({"resume": str(half), "epochs": 2, "augment": ("shift",)}))
    train(build_config({"resume": str(half), "epochs": 2}))
    a, b = load_checkpoint(straight / "last.npz"), load_checkpoint(half / "last.npz")
    assert b.meta["args"]["augment"] == list(ALL) and b.meta["args"]["loss_region"] == "central"
    assert_same_arrays(a.params, b.params)
    for key in ("m", "v"):
        assert_same_arrays(a.optimizer_state[key], b.optimizer_state[key])
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(straight)] == \
           [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(half)]
    plain = train(tiny(tiny_data, tmp_path / "plain", epochs=1, **{**AUGMENTED, "augment": ()}))
    assert read_history(plain)[0]["loss"] != read_history(straight)[0]["loss"]  # the augmentations were applied


def test_a_gpu_run_with_doubled_flips_boxes_the_mirrors_loss_mirrored(gpu, tiny_data, tmp_path, monkeypatch):
    """--flip-mode double on the GPU path: the second half of the training set are mirrors, and their loss box
    is mirrored (on the stand-in: no NumPy array meets a device array anywhere in the epoch)."""
    flags = []

    def spy(loss_fn, logits, target, box, mirrored=None):
        flags.append(None if mirrored is None else as_numpy(mirrored))
        return loss_in_box(loss_fn, logits, target, box, mirrored)

    monkeypatch.setattr(training, "loss_in_box", spy)
    run = train(tiny(tiny_data, tmp_path / "gpu", gpu=True, epochs=1, fit="pad", loss_region="central",
                     augment=ALL))
    trained = [f for f in flags if f is not None]  # the training batches (validation has no mirrors)
    assert len(trained) == 5 and sum(len(f) for f in trained) == 38 and sum(f.sum() for f in trained) == 19
    assert flags[len(trained):] == [None]  # one validation batch
    assert load_checkpoint(run / "last.npz").meta["args"]["gpu"]


def test_a_multichannel_set_trains_augmented_from_the_command_line(tmp_path, monkeypatch):
    data = npy_set(tmp_path / "d", n=6, channels=5, size=(22, 30))  # padded to 24 x 32
    monkeypatch.chdir(tmp_path)
    argv = ["--data", data, "--out", tmp_path / "run", "--augment", "brightness,shift,scale", "--fit", "pad",
            "--loss-region", "central", "--features", "2", "--depth", "2", "--epochs", "1", "--batch-size", "4",
            "--no-plots", "--no-progress", "--threads", "1"]
    assert exit_code(train_main, argv) == 0
    args = load_checkpoint(tmp_path / "run" / "best.npz").meta["args"]
    assert args["augment"] == list(ALL) and args["loss_region"] == "central"  # in the order they apply


def test_bad_augment_and_loss_region_settings_are_one_line(tiny_data, tmp_path, capsys):
    assert parse_train_args(["--augment", "scale,shift,scale"])[0]["augment"] == ("shift", "scale")
    assert parse_train_args(["--augment", "none"])[0]["augment"] == ()
    assert exit_code(train_main, ["--augment", "shift,rotate"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'rotate' is not an augmentation", "shift,scale,brightness")
    assert exit_code(train_main, ["--data", tiny_data, "--out", tmp_path / "r", "--loss-region", "central"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--loss-region central needs --fit pad", "--fit resize")
    assert not (tmp_path / "r").exists()
    for settings, words in (({"augment": ("shift", "shift")}, "--augment ('shift', 'shift') is invalid"),
                            ({"augment": ("rotate",)}, "--augment ('rotate',) is invalid"),
                            ({"loss_region": "inner"}, "--loss-region 'inner' is invalid")):
        with pytest.raises(ConfigError, match="^" + re.escape(words)):
            validate(build_config({"data": str(tiny_data), **settings}))


def test_the_central_loss_refuses_images_of_mixed_sizes(tmp_path, capsys):
    data = blob_set(tmp_path / "d", n=6, sizes=((24, 32), (40, 20)))
    argv = ["--data", data, "--out", tmp_path / "run", "--fit", "pad", "--loss-region", "central",
            "--features", "2", "--depth", "2", "--epochs", "1", "--no-plots", "--no-progress"]
    assert exit_code(train_main, argv) == 2
    assert_one_line_error(capsys.readouterr().err, "--loss-region central takes images of one size",
                          "--loss-region all")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# The loss on a box
# --------------------------------------------------------------------------------------------

def padded_batch(rng, n=3, size=(5, 5), multiple=4):
    """float64 logits and binary targets (n, H', W', 1) padded from (n, H, W, 1) as --fit pad pads, and the box:
    logits without ties (the Lovász sort), every image with salt and background inside the box."""
    logits = rng.standard_normal((n, *size, 1)) * 1.5
    target = (rng.random((n, *size, 1)) < 0.4).astype(np.float64)
    target[:, 0, 0], target[:, 0, 1] = 1.0, 0.0
    (logits, box), (target, _) = pad_to_multiple(logits, multiple), pad_to_multiple(target, multiple)
    logits = logits + rng.standard_normal(logits.shape) * 1e-3  # the padded copies tie no more
    return np.ascontiguousarray(logits), np.ascontiguousarray(target), box


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_boxed_loss_is_the_loss_of_the_crop_with_no_gradient_outside(xp, rng, name):
    logits, target, box = padded_batch(rng)
    assert box == (1, 1, 5, 5) and logits.shape == (3, 8, 8, 1)  # 5 x 5 -> 8 x 8: the odd pixel bottom, right
    loss, dlogits = loss_in_box(LOSSES[name], as_array(logits, xp), as_array(target, xp), box)
    inner_loss, inner_d = LOSSES[name](*(np.ascontiguousarray(crop(a, box)) for a in (logits, target)))
    assert float(loss) == float(inner_loss)
    dlogits = as_numpy(dlogits)
    np.testing.assert_array_equal(crop(dlogits, box), inner_d)
    outside = np.ones(dlogits.shape, bool)
    outside[:, 1:6, 1:6] = False
    assert (dlogits[outside] == 0).all() and np.abs(inner_d).max() > 0

    mirrored = np.array([True, False, True])  # those images mirrored after padding: their box is columns 2..6

    def flipped(a):
        return np.where(mirrored[:, None, None, None], a[:, :, ::-1], a)

    loss_m, d_m = loss_in_box(LOSSES[name], as_array(flipped(logits), xp), as_array(flipped(target), xp), box,
                              as_array(mirrored, xp))
    assert float(loss_m) == pytest.approx(float(loss), rel=1e-12)
    np.testing.assert_allclose(flipped(as_numpy(d_m)), dlogits, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_boxed_loss_gradient_matches_central_differences(rng, name):
    logits, target, box = padded_batch(rng)
    mirrored = np.array([False, True, False])
    upstream = rng.standard_normal()  # a random upstream gradient of the scalar loss

    def loss() -> float:
        return upstream * float(loss_in_box(LOSSES[name], logits, target, box, mirrored)[0])

    _, dlogits = loss_in_box(LOSSES[name], logits, target, box, mirrored)
    numeric = numerical_gradient(loss, logits)
    assert_gradients_close("logits", upstream * dlogits, numeric)
    assert np.abs(numeric[:, 0]).max() == 0 and np.abs(numeric[0, :, 6]).max() == 0  # the border: no gradient
    assert np.abs(numeric[1, :, 1]).max() == 0 and np.abs(numeric[1, 1:6, 6]).max() > 0  # image 1's box: mirrored


def test_bce_on_the_box_averages_the_central_pixels_only():
    logits, target = np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 8, 1))
    logits[:, :2] = 50.0  # a confident mistake on the padded rows only
    loss, dlogits = loss_in_box(binary_crossentropy, logits, target, (2, 1, 6, 6))
    assert float(loss) == pytest.approx(np.log(2))  # every central logit is 0: BCE log 2, the border unseen
    np.testing.assert_allclose(dlogits[:, 2:8, 1:7], 0.5 / 72)  # (p - y) / the 72 central pixels
