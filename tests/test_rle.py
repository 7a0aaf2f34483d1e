"""Tests for tinyunet.rle: hand-written examples, malformed strings by name, round trips, the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tinyunet.rle import rle_decode, rle_encode


def tgs_data_dir() -> Path:
    """The TGS Salt data: $TINYUNET_TGS_DATA, else ../shared/data/tgs-salt beside the repository."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tgs-salt"
    return Path(os.environ.get("TINYUNET_TGS_DATA", default))


# --- hand-written examples ---------------------------------------------------------------------------

# Pixels are numbered down the columns:  1 4 7 / 2 5 8 / 3 6 9.
L_SHAPE = np.array(
    [
        [0, 1, 1],
        [0, 1, 0],
        [0, 0, 0],
    ],
    dtype=bool,
)


def test_encoding_is_column_major():
    # Column 2 holds pixels 4 and 5, column 3 pixel 7. Row-major it would be "2 2 5 1".
    assert rle_encode(L_SHAPE) == "4 2 7 1"
    assert np.array_equal(rle_decode("4 2 7 1", (3, 3)), L_SHAPE)


def test_a_run_continues_from_the_bottom_of_one_column_to_the_top_of_the_next():
    mask = np.array([[0, 1], [0, 1], [1, 0]], dtype=bool)  # pixels 3 (bottom of column 1) and 4, 5
    assert rle_encode(mask) == "3 3"
    assert np.array_equal(rle_decode("3 3", (3, 2)), mask)


def test_encoding_is_1_indexed_and_covers_the_last_pixel():
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[2, 2] = True
    assert rle_encode(mask) == "1 1 9 1"
    assert rle_encode(np.ones((3, 3), dtype=bool)) == "1 9"


def test_empty_mask_is_the_empty_string():
    assert rle_encode(np.zeros((4, 5), dtype=bool)) == ""
    assert not rle_decode("", (4, 5)).any()


@pytest.mark.parametrize("empty", [None, float("nan"), np.float64("nan"), "", "   ", " \t\n"])
def test_empty_cells_decode_to_an_empty_mask(empty):
    mask = rle_decode(empty, (4, 5))
    assert mask.shape == (4, 5) and mask.dtype == bool and not mask.any()


def test_decoded_mask_is_boolean_h_by_w():
    mask = rle_decode("2 3", (2, 4))
    assert mask.dtype == bool
    assert mask.shape == (2, 4)
    assert mask.astype(int).tolist() == [[0, 1, 0, 0], [1, 1, 0, 0]]


def test_integer_and_0_1_float_masks_encode_like_bool():
    assert rle_encode(L_SHAPE.astype(np.uint16) * 65535) == "4 2 7 1"
    assert rle_encode(L_SHAPE.astype(np.uint8) * 255) == "4 2 7 1"
    assert rle_encode(L_SHAPE.astype(np.float32)) == "4 2 7 1"


def test_touching_runs_decode_as_one():
    assert rle_encode(rle_decode("1 2 3 1", (3, 3))) == "1 3"


def test_whitespace_between_numbers_is_tolerated():
    assert np.array_equal(rle_decode(" 4  2\t7 1 ", (3, 3)), L_SHAPE)


# --- malformed input, by name ------------------------------------------------------------------------


def test_odd_count_of_numbers_raises():
    with pytest.raises(ValueError, match=r"odd number of values \(3\)"):
        rle_decode("4 2 7", (3, 3))


@pytest.mark.parametrize("token", ["x", "1.5", "nan", "0x4", "99999999999999999999"])
def test_non_number_raises(token):
    with pytest.raises(ValueError, match=f"not a 64-bit integer: '{token}'"):
        rle_decode(f"4 2 7 {token}", (3, 3))


def test_zero_length_raises():
    with pytest.raises(ValueError, match=r"run 2 of 2 \(start 7, length 0\) has a length below 1"):
        rle_decode("4 2 7 0", (3, 3))


def test_negative_length_raises():
    with pytest.raises(ValueError, match=r"run 1 of 1 \(start 4, length -2\) has a length below 1"):
        rle_decode("4 -2", (3, 3))


@pytest.mark.parametrize("start", ["0", "-3"])
def test_start_below_1_raises(start):
    with pytest.raises(ValueError, match="starts before pixel 1"):
        rle_decode(f"{start} 2", (3, 3))


def test_overlapping_runs_raise():
    with pytest.raises(ValueError, match=r"run 2 of 2 \(start 5\) overlaps run 1 \(start 4, length 2\)"):
        rle_decode("4 2 5 1", (3, 3))


def test_out_of_order_runs_raise():
    """Kaggle writes runs sorted; an out-of-order string is refused even when its runs do not overlap."""
    with pytest.raises(ValueError, match=r"run 2 of 2 \(start 4\) comes before run 1 \(start 7, length 1\)"):
        rle_decode("7 1 4 2", (3, 3))


def test_run_past_the_end_of_the_image_raises():
    with pytest.raises(ValueError, match="runs past pixel 9, the end of a 3x3 image"):
        rle_decode("8 3", (3, 3))
    with pytest.raises(ValueError, match="runs past pixel 9"):
        rle_decode("10 1", (3, 3))
    with pytest.raises(ValueError, match="runs past pixel 9"):
        rle_decode("1 9223372036854775807", (3, 3))  # start + length would overflow int64


def test_bad_shape_and_types_raise():
    with pytest.raises(ValueError, match="shape must be"):
        rle_decode("1 1", (0, 3))
    with pytest.raises(ValueError, match="shape must be"):
        rle_decode("1 1", (3, 3, 1))
    with pytest.raises(TypeError, match="must be a string"):
        rle_decode(5, (3, 3))
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="threshold probabilities first"):
        rle_encode(np.full((3, 3), 0.7))


# --- round trips -------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=300, deadline=None)
@given(shapes.flatmap(lambda shape: arrays(bool, shape)))
def test_encode_then_decode_gives_the_mask_back(mask):
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@st.composite
def valid_rle(draw) -> tuple[str, tuple[int, int]]:
    """A canonical RLE string (sorted runs with gaps between them) and a shape it fits in."""
    height, width = draw(shapes)
    n_pixels = height * width
    position, pairs = 1, []
    while position <= n_pixels and draw(st.booleans()):
        start = draw(st.integers(position, n_pixels))
        length = draw(st.integers(1, n_pixels - start + 1))
        pairs += [start, length]
        position = start + length + 1  # leave a gap: touching runs would be merged by rle_encode
    return " ".join(map(str, pairs)), (height, width)


@settings(max_examples=300, deadline=None)
@given(valid_rle())
def test_decode_then_encode_gives_the_string_back(case):
    rle, shape = case
    mask = rle_decode(rle, shape)
    assert rle_encode(mask) == rle
    assert mask.sum() == sum(map(int, rle.split()[1::2]))


# --- the real competition data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tgs_train() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """train.csv and every training mask PNG as a boolean array (> 0 is salt, whatever the PNG mode)."""
    root = tgs_data_dir()
    if not (root / "train.csv").is_file():
        pytest.skip(f"TGS Salt data not found at {root} (set TINYUNET_TGS_DATA to its folder)")
    table = pd.read_csv(root / "train.csv", dtype={"id": str})  # some ids are all digits
    masks = {}
    for image_id in table["id"]:
        with Image.open(root / "train" / "masks" / f"{image_id}.png") as png:
            masks[image_id] = np.asarray(png) > 0
    return table, masks


def test_decoding_train_csv_reproduces_every_mask_png(tgs_train):
    table, masks = tgs_train
    assert len(table) == len(masks) > 0
    for image_id, rle in zip(table["id"], table["rle_mask"]):
        truth = masks[image_id]
        assert np.array_equal(rle_decode(rle, truth.shape), truth), image_id


def test_encoding_every_mask_png_reproduces_train_csv(tgs_train):
    table, masks = tgs_train
    for image_id, rle in zip(table["id"], table["rle_mask"].fillna("")):
        assert rle_encode(masks[image_id]) == rle, image_id
