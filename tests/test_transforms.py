"""Array work on image stacks: bilinear resize (against PIL), pad and crop, flips, minibatches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinyunet import transforms
from tinyunet.backend import as_numpy


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's bilinear resize of a float32 (H, W) image to (OH, OW)."""
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(size[::-1], Image.BILINEAR))


def smooth_images(n: int, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (1 + k) * y) * np.cos(2 * np.pi * x + k)
                     for k in range(n)]).astype(np.float32)  # (N, S, S)


def test_resize_constant_and_identity(xp):
    x = xp.full((2, 101, 101, 3), 0.25, xp.float32)
    up = transforms.resize(x, 128)
    assert up.shape == (2, 128, 128, 3) and up.dtype == xp.float32
    assert float(abs(up - 0.25).max()) == 0
    y = xp.asarray(np.random.default_rng(0).random((2, 7, 9)).astype(np.float32))
    same = transforms.resize(y, (7, 9))
    assert same is not y
    np.testing.assert_array_equal(as_numpy(same), as_numpy(y))


def test_resize_upsampling_matches_pil():
    x = np.random.default_rng(0).random((3, 101, 101)).astype(np.float32)
    for size in [(128, 128), (150, 120)]:
        ours = transforms.resize(x, size)
        for i in range(3):
            np.testing.assert_allclose(ours[i], pil_resize(x[i], size), atol=1e-6)


def test_resize_downsampling_close_to_pil_on_smooth_images():
    """No antialiasing: close to PIL on smooth images (PIL widens its filter when downsampling)."""
    x = smooth_images(3, 128)
    ours = transforms.resize(x, 101)
    for i in range(3):
        np.testing.assert_allclose(ours[i], pil_resize(x[i], (101, 101)), atol=1e-2)


def test_resize_round_trip_and_dtypes(xp):
    x = xp.asarray(smooth_images(2, 101))[..., None]  # (2, 101, 101, 1)
    back = transforms.resize(transforms.resize(x, 128), 101)
    assert back.shape == x.shape
    assert float(abs(back - x).max()) < 5e-3
    assert transforms.resize(x.astype(xp.float64), 128).dtype == xp.float64
    assert transforms.resize(xp.zeros((1, 4, 4), xp.uint8), 8).dtype == xp.float32


def test_pad_to_multiple_and_crop(xp):
    x = xp.asarray(np.random.default_rng(0).random((2, 101, 99, 1)).astype(np.float32))
    padded, box = transforms.pad_to_multiple(x, 16)
    assert padded.shape == (2, 112, 112, 1)
    assert box == (5, 6, 101, 99)
    np.testing.assert_array_equal(as_numpy(transforms.crop(padded, box)), as_numpy(x))
    assert float(padded[0, 4, 10, 0]) == float(x[0, 1, 4, 0])  # reflected: row 4 mirrors row 1 (top pad 5)
    zeros, _ = transforms.pad_to_multiple(x, 16, mode="constant")
    assert float(zeros[:, :5].sum()) == 0
    same, box = transforms.pad_to_multiple(xp.zeros((1, 32, 32)), 16)
    assert same.shape == (1, 32, 32) and box == (0, 0, 32, 32)


def test_hflip_and_augment(xp):
    images = xp.arange(2 * 3 * 4, dtype=xp.float32).reshape(2, 3, 4)
    masks = (images > 10).astype(xp.float32)
    flipped = transforms.hflip(images)
    assert float(flipped[0, 0, 0]) == float(images[0, 0, -1])
    assert float(abs(transforms.hflip(flipped) - images).max()) == 0
    aug_images, aug_masks = transforms.augment_hflip(images, masks)
    assert aug_images.shape == (4, 3, 4)
    assert float(abs(aug_images[:2] - images).max()) == 0
    assert float(abs(aug_masks[2:] - transforms.hflip(masks)).max()) == 0


def test_minibatches():
    batches = list(transforms.minibatches(10, 4, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    again = list(transforms.minibatches(10, 4, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert np.concatenate(list(transforms.minibatches(5, 2, shuffle=False))).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        list(transforms.minibatches(5, 0, np.random.default_rng(0)))
