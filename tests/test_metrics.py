"""Tests for tinyunet.metrics: the edge cases by name, a plain reference loop, properties, the sweep."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyunet.metrics import (
    best_postprocessing,
    best_threshold,
    competition_score,
    drop_small,
    image_scores,
    iou,
    pixel_accuracy,
    threshold_sweep,
)


def reference_image_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """The competition score of one image, written out plainly with exact fractions."""
    t, p = truth.astype(bool), pred.astype(bool)
    if not t.any() and not p.any():
        return 1.0
    if not t.any() or not p.any():
        return 0.0
    overlap = Fraction(int((t & p).sum()), int((t | p).sum()))
    thresholds = [Fraction(50 + 5 * k, 100) for k in range(10)]  # 0.50, 0.55, ..., 0.95
    hits = [overlap > threshold for threshold in thresholds]
    return sum(hits) / len(hits)


def reference_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """The competition score of a batch: the mean of the per-image reference, one image at a time."""
    return sum(reference_image_score(t, p) for t, p in zip(truth, pred)) / len(truth)


def masks_with_overlap(n_truth: int, n_pred: int, n_shared: int, size: int = 10) -> tuple[np.ndarray, ...]:
    """A (1, size, size) truth and prediction with the given pixel counts and ``n_shared`` in common."""
    truth = np.zeros(size * size, dtype=bool)
    pred = np.zeros(size * size, dtype=bool)
    truth[:n_truth] = True
    pred[n_truth - n_shared : n_truth - n_shared + n_pred] = True
    return truth.reshape(1, size, size), pred.reshape(1, size, size)


EMPTY = np.zeros((1, 10, 10), dtype=bool)
FULL = np.ones((1, 10, 10), dtype=bool)


# --- the edge cases, by name -------------------------------------------------------------------------


def test_both_empty_scores_one():
    assert competition_score(EMPTY, EMPTY) == 1.0
    assert iou(EMPTY, EMPTY).tolist() == [1.0]


def test_empty_prediction_against_non_empty_truth_scores_zero():
    truth, _ = masks_with_overlap(n_truth=5, n_pred=0, n_shared=0)
    assert competition_score(truth, EMPTY) == 0.0


def test_empty_prediction_against_a_large_mask_scores_zero():
    """The 2-bin-histogram kernel scores this as a hit."""
    assert competition_score(FULL, EMPTY) == 0.0
    truth, _ = masks_with_overlap(n_truth=95, n_pred=0, n_shared=0)
    assert competition_score(truth, EMPTY) == 0.0


def test_non_empty_prediction_against_empty_truth_scores_zero():
    _, pred = masks_with_overlap(n_truth=0, n_pred=5, n_shared=0)
    assert competition_score(EMPTY, pred) == 0.0
    assert competition_score(EMPTY, FULL) == 0.0


def test_perfect_match_scores_one():
    truth, _ = masks_with_overlap(n_truth=37, n_pred=0, n_shared=0)
    assert competition_score(truth, truth) == 1.0
    assert competition_score(FULL, FULL) == 1.0
    assert iou(truth, truth).tolist() == [1.0]


def test_iou_exactly_half_is_not_above_threshold_half():
    truth, pred = masks_with_overlap(n_truth=2, n_pred=1, n_shared=1)  # I = 1, U = 2
    assert iou(truth, pred).tolist() == [0.5]
    assert competition_score(truth, pred) == 0.0


def test_iou_three_quarters_hits_five_of_ten_thresholds():
    truth, pred = masks_with_overlap(n_truth=4, n_pred=3, n_shared=3)  # I = 3, U = 4
    assert iou(truth, pred).tolist() == [0.75]
    assert competition_score(truth, pred) == 0.5  # hits 0.50, 0.55, 0.60, 0.65, 0.70


@pytest.mark.parametrize("k", range(10, 21))
def test_iou_landing_on_each_threshold_does_not_hit_it(k):
    """IoU = k / 20 hits exactly the thresholds below it: (k - 10) of them, the top one only at IoU 1."""
    truth, pred = masks_with_overlap(n_truth=20, n_pred=k, n_shared=k)  # I = k, U = 20
    assert iou(truth, pred).tolist() == [k / 20]
    assert competition_score(truth, pred) == (k - 10) / 10


def test_disjoint_masks_score_zero():
    truth, pred = masks_with_overlap(n_truth=5, n_pred=5, n_shared=0)
    assert iou(truth, pred).tolist() == [0.0]
    assert competition_score(truth, pred) == 0.0


def test_score_is_the_mean_over_images():
    half_truth, half_pred = masks_with_overlap(n_truth=4, n_pred=3, n_shared=3)  # 0.5
    truth = np.concatenate([EMPTY, FULL, half_truth, FULL])
    pred = np.concatenate([EMPTY, FULL, half_pred, EMPTY])  # scores 1, 1, 0.5, 0
    assert image_scores(truth, pred).tolist() == [1.0, 1.0, 0.5, 0.0]
    assert competition_score(truth, pred) == pytest.approx(2.5 / 4)
    assert isinstance(competition_score(truth, pred), float)


def test_a_single_image_may_be_given_as_h_w():
    truth, pred = masks_with_overlap(n_truth=4, n_pred=3, n_shared=3)
    assert competition_score(truth[0], pred[0]) == 0.5
    assert iou(truth[0], pred[0]).shape == (1,)


def test_integer_and_0_1_float_masks_are_accepted():
    truth, pred = masks_with_overlap(n_truth=4, n_pred=3, n_shared=3)
    assert competition_score(truth.astype(np.uint16) * 65535, pred.astype(np.uint8) * 255) == 0.5
    assert competition_score(truth.astype(np.float32), pred.astype(np.float64)) == 0.5


# --- input validation --------------------------------------------------------------------------------


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"truth has shape \(1, 10, 10\) but pred has shape \(1, 10, 9\)"):
        competition_score(EMPTY, EMPTY[:, :, :9])
    with pytest.raises(ValueError, match="shape"):
        iou(EMPTY, EMPTY[0])
    with pytest.raises(ValueError, match="probs has shape"):
        threshold_sweep(EMPTY, np.zeros((2, 10, 10)))


def test_channel_axis_must_be_squeezed():
    with pytest.raises(ValueError, match="squeeze"):
        competition_score(EMPTY[..., None], EMPTY[..., None])


def test_probabilities_are_refused_as_a_mask():
    with pytest.raises(ValueError, match="threshold probabilities first"):
        competition_score(EMPTY, np.full((1, 10, 10), 0.3))


def test_sweep_refuses_nan_and_integer_probabilities():
    with pytest.raises(ValueError, match="NaN"):
        threshold_sweep(EMPTY, np.full((1, 10, 10), np.nan))
    with pytest.raises(ValueError, match="float"):
        threshold_sweep(EMPTY, np.zeros((1, 10, 10), dtype=np.uint8))


# --- against the reference, and properties -----------------------------------------------------------


def test_matches_the_reference_loop_on_random_masks():
    rng = np.random.default_rng(0)
    # Blobs of varied coverage, so that many IoUs fall among the thresholds, plus some empty masks.
    truth = rng.random((300, 12, 12)) < rng.random((300, 1, 1))
    pred = np.where(rng.random((300, 12, 12)) < 0.1, ~truth, truth)
    truth[:20] = False
    pred[10:30] = False
    expected = [reference_image_score(t, p) for t, p in zip(truth, pred)]
    assert image_scores(truth, pred).tolist() == expected
    assert competition_score(truth, pred) == pytest.approx(reference_score(truth, pred), abs=1e-12)


mask_pairs = st.integers(1, 5).flatmap(
    lambda n: st.tuples(
        arrays(bool, (n, 6, 7)),
        arrays(bool, (n, 6, 7)),
    )
)


@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_score_properties(pair):
    truth, pred = pair
    score = competition_score(truth, pred)
    assert 0.0 <= score <= 1.0
    assert score == competition_score(pred, truth)  # symmetric
    assert competition_score(truth, truth) == 1.0
    assert score == pytest.approx(reference_score(truth, pred), abs=1e-12)
    empty = np.zeros_like(truth)
    per_image = image_scores(truth, empty)
    assert per_image.tolist() == [0.0 if t.any() else 1.0 for t in truth]
    values = iou(truth, pred)
    assert np.all((values >= 0) & (values <= 1))


@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_pixel_accuracy_counts_equal_pixels(pair):
    truth, pred = pair
    assert pixel_accuracy(truth, pred) == pytest.approx((truth == pred).mean())
    assert pixel_accuracy(truth, truth) == 1.0


# --- the threshold sweep -----------------------------------------------------------------------------


def assert_sweep_matches_loop(truth: np.ndarray, probs: np.ndarray, thresholds, scores) -> None:
    """``scores[j]`` is the score of ``probs > thresholds[j]`` (up to rounding in the mean over images)."""
    expected = [competition_score(truth, probs > t) for t in thresholds]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sweep_equals_the_score_at_each_threshold(dtype):
    rng = np.random.default_rng(1)
    truth = rng.random((64, 16, 16)) < rng.random((64, 1, 1))
    noisy = truth + rng.normal(0, 0.4, truth.shape)
    probs = np.clip(noisy, 0, 1).astype(dtype)  # many exact 0s and 1s
    probs[:8] = np.linspace(0, 1, 50)[rng.integers(0, 50, (8, 16, 16))]  # values right on the thresholds
    truth[-4:] = False  # some empty truths
    thresholds, scores = threshold_sweep(truth, probs)
    assert thresholds.shape == scores.shape == (50,)
    np.testing.assert_allclose(thresholds, np.linspace(0, 1, 50), atol=1e-7)
    assert_sweep_matches_loop(truth, probs, thresholds, scores)
    # The masks do not depend on how the threshold is written (Python float, float32, float64).
    for t in thresholds[::7]:
        assert np.array_equal(probs > t, probs > float(t))
        assert np.array_equal(probs > t, probs > np.float64(t))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            arrays(bool, (n, 5, 6)),
            arrays(np.float64, (n, 5, 6), elements=st.floats(-0.5, 1.5)),
            st.integers(1, 60),
        )
    )
)
def test_sweep_equals_the_score_at_each_threshold_property(case):
    truth, probs, n_thresholds = case
    thresholds, scores = threshold_sweep(truth, probs, n_thresholds)
    assert len(thresholds) == n_thresholds
    assert_sweep_matches_loop(truth, probs, thresholds, scores)


def test_sweep_of_a_perfect_prediction_peaks_at_one():
    rng = np.random.default_rng(2)
    truth = rng.random((10, 8, 8)) < 0.5
    thresholds, scores = threshold_sweep(truth, truth * 0.8 + 0.1)
    threshold, score = best_threshold(thresholds, scores)
    assert score == 1.0
    assert threshold == thresholds[np.argmax(scores)]
    assert 0.1 <= threshold < 0.9
    assert isinstance(threshold, float) and isinstance(score, float)


def test_best_threshold_takes_the_lowest_on_a_tie():
    assert best_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.7, 0.7])) == (0.2, 0.7)


def test_sweep_of_800_images_is_fast():
    """The issue's budget: 800 images of 101x101 and 50 thresholds well under a second (~0.1 s here).

    The best of three runs, so that a busy machine or a cold first call does not fail it."""
    rng = np.random.default_rng(3)
    truth = rng.random((800, 101, 101)) < 0.3
    probs = rng.random((800, 101, 101), dtype=np.float32)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        threshold_sweep(truth, probs)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0


def test_sweep_with_min_areas_equals_dropping_small_masks_then_scoring():
    """Every cell (area, threshold) of the grid is the plain score of drop_small(probs > t, area)."""
    rng = np.random.default_rng(5)
    probs = rng.random((12, 9, 9)) ** 3  # many small predicted masks, some empty
    truth = rng.random((12, 9, 9)) < 0.2
    truth[:4] = False  # empty truths, where the rule pays
    areas = [0, 1, 3, 10, 40]
    thresholds, grid = threshold_sweep(truth, probs, n_thresholds=11, min_areas=areas)
    assert grid.shape == (5, 11)
    for a, area in enumerate(areas):
        for j, t in enumerate(thresholds):
            plain = competition_score(truth, drop_small(probs > t, area))
            assert grid[a, j] == pytest.approx(plain, abs=1e-12), (area, t)
    np.testing.assert_allclose(grid[0], threshold_sweep(truth, probs, n_thresholds=11)[1])
    area, t, score = best_postprocessing(thresholds, grid, areas)
    assert score == grid.max() and grid[areas.index(area), list(thresholds).index(np.float32(t))] == score


def test_drop_small_empties_only_masks_below_the_area():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[1, :2, :2] = True  # 4 pixels
    masks[2, :, :2] = True  # 8 pixels
    out = drop_small(masks, 5)
    assert not out[1].any() and (out[2] == masks[2]).all() and not out[0].any()
    assert (drop_small(masks, 0) == masks).all()
