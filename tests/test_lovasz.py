"""The Lovász hinge (Berman et al. 2018) and the losses built on it: gradient checks away from ties, a plain
per-pixel reference, the cases whose value is known, and choosing a loss by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyunet.backend import as_array, as_numpy
from tinyunet.gradcheck import assert_gradients_close, numerical_gradient
from tinyunet.losses import (LOSSES, bce_lovasz, binary_crossentropy, get_loss, lovasz_grad, lovasz_hinge,
                             symmetric_lovasz)


def batch(rng, n=3, size=4, salt=0.4):
    """Random float64 logits (no two hinge errors tie, none at the hinge's kink) and a binary target whose
    images all hold some salt and some background."""
    logits = rng.standard_normal((n, size, size, 1)) * 1.5
    target = (rng.random((n, size, size, 1)) < salt).astype(np.float64)
    target[:, 0, 0], target[:, 0, 1] = 1.0, 0.0
    return logits, target


def check_gradient(loss_fn, logits, target):
    _, dlogits = loss_fn(logits, target)
    numeric = numerical_gradient(lambda: float(loss_fn(logits, target)[0]), logits)
    assert_gradients_close("logits", dlogits, numeric)
    assert np.abs(as_numpy(dlogits)).max() > 0


# --- a plain reference --------------------------------------------------------------------------------

def lovasz_reference(logits, target, per_image=True, variant="relu"):
    """Berman et al.'s Lovász hinge written out one image and one pixel at a time."""
    images = list(zip(logits, target)) if per_image else [(logits.ravel(), target.ravel())]
    total = 0.0
    for z, y in images:
        z, y = [float(v) for v in z.ravel()], [float(v) for v in y.ravel()]
        errors = [1 - zi * (2 * yi - 1) for zi, yi in zip(z, y)]
        order = sorted(range(len(z)), key=lambda i: -errors[i])  # descending errors
        gts = sum(y)
        intersection, union = gts, gts  # |truth minus the pixels taken so far|, |truth or those pixels|
        previous, loss = 0.0, 0.0
        for i in order:  # take the pixels one by one, worst first
            if y[i]:
                intersection -= 1
            else:
                union += 1
            jaccard = 1 - intersection / union
            e = errors[i]
            f = max(e, 0.0) if variant == "relu" else (e + 1 if e > 0 else math.exp(e))
            loss += f * (jaccard - previous)  # the Jaccard loss's increment weighs this pixel's error
            previous = jaccard
        total += loss
    return total / len(images)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("variant", ["relu", "elu"])
def test_matches_the_plain_reference(xp, rng, per_image, variant):
    logits, target = batch(rng)
    target[1] = 0.0  # an image without salt too
    loss, _ = lovasz_hinge(as_array(logits, xp), as_array(target, xp), per_image=per_image, variant=variant)
    assert float(loss) == pytest.approx(lovasz_reference(logits, target, per_image, variant), rel=1e-12)


def test_lovasz_grad_is_the_jaccard_increments():
    gt_sorted = np.array([[1.0, 0.0, 1.0, 0.0, 0.0]])  # gts = 2
    jaccard = [1 - i / u for i, u in [(1, 2), (1, 3), (0, 3), (0, 4), (0, 5)]]  # (intersection, union) after each
    np.testing.assert_allclose(lovasz_grad(gt_sorted)[0], np.diff([0.0] + jaccard), rtol=1e-15)
    assert lovasz_grad(gt_sorted).sum() == pytest.approx(1.0)  # the increments add up to the whole loss, 1


# --- gradients, away from ties ------------------------------------------------------------------------

@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("variant", ["relu", "elu"])
def test_lovasz_hinge_gradient(xp, rng, per_image, variant):
    logits, target = batch(rng)
    check_gradient(lambda z, y: lovasz_hinge(z, y, per_image=per_image, variant=variant), as_array(logits, xp),
                   as_array(target, xp))


@pytest.mark.parametrize("variant", ["relu", "elu"])
def test_symmetric_lovasz_gradient(rng, variant):
    logits, target = batch(rng)
    check_gradient(lambda z, y: symmetric_lovasz(z, y, variant=variant), logits, target)


def test_bce_lovasz_gradient_and_value(rng):
    logits, target = batch(rng)
    check_gradient(bce_lovasz, logits, target)
    expected = float(binary_crossentropy(logits, target)[0]) + lovasz_reference(logits, target, variant="elu")
    assert float(bce_lovasz(logits, target)[0]) == pytest.approx(expected, rel=1e-12)


def test_symmetric_lovasz_scores_the_background_with_negated_logits(rng):
    logits, target = batch(rng)
    expected = (lovasz_reference(logits, target) + lovasz_reference(-logits, 1 - target)) / 2
    assert float(symmetric_lovasz(logits, target)[0]) == pytest.approx(expected, rel=1e-12)


# --- values known in advance --------------------------------------------------------------------------

def test_an_empty_truth_costs_its_worst_error(rng):
    """No salt: every Jaccard increment after the first is 0, so the loss is relu(the largest error)."""
    logits = rng.standard_normal((1, 4, 4, 1))
    target = np.zeros_like(logits)
    loss, dlogits = lovasz_hinge(logits, target)
    assert float(loss) == pytest.approx(max(0.0, 1 + logits.max()), rel=1e-14)
    worst = np.zeros_like(logits)
    worst.reshape(-1)[np.argmax(logits)] = 1.0  # only the worst pixel's logit moves the loss
    np.testing.assert_array_equal(dlogits, worst)
    assert float(lovasz_hinge(np.full((1, 2, 2, 1), -1.5), np.zeros((1, 2, 2, 1)))[0]) == 0.0  # all below margin


@pytest.mark.parametrize("per_image", [True, False])
def test_a_perfect_prediction_with_margins_costs_nothing(rng, per_image):
    _, target = batch(rng)
    logits = (2 * target - 1) * (1 + rng.random(target.shape))  # logit * sign > 1 everywhere
    loss, dlogits = lovasz_hinge(logits, target, per_image=per_image)
    assert float(loss) == 0.0 and not dlogits.any()
    assert float(symmetric_lovasz(logits, target)[0]) == 0.0
    assert float(lovasz_hinge(logits, target, variant="elu")[0]) > 0  # elu + 1 is never flat


def test_per_image_is_the_mean_of_single_images(rng):
    logits, target = batch(rng)
    singles = [float(lovasz_hinge(logits[i:i + 1], target[i:i + 1])[0]) for i in range(len(logits))]
    assert float(lovasz_hinge(logits, target)[0]) == pytest.approx(np.mean(singles), rel=1e-13)
    assert float(lovasz_hinge(logits, target, per_image=False)[0]) != pytest.approx(np.mean(singles), rel=1e-6)


def test_float32_stays_float32(xp, rng):
    logits, target = batch(rng)
    z, y = as_array(logits.astype(np.float32), xp), as_array(target.astype(np.float32), xp)
    for name, loss_fn in LOSSES.items():
        loss, dlogits = loss_fn(z, y)
        assert loss.dtype == np.float32 and dlogits.dtype == np.float32, name


# --- choosing a loss; bad input -----------------------------------------------------------------------

def test_losses_by_name():
    assert list(LOSSES) == ["bce", "lovasz", "lovasz_elu", "lovasz_symmetric", "bce_lovasz"]
    assert get_loss("bce") is binary_crossentropy and get_loss("lovasz") is lovasz_hinge
    with pytest.raises(ValueError) as err:
        get_loss("dice")
    assert "'dice'" in str(err.value) and all(name in str(err.value) for name in LOSSES)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        lovasz_hinge(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        symmetric_lovasz(np.zeros((2, 4, 4, 1)), np.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="'relu' or 'elu'"):
        lovasz_hinge(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)), variant="softplus")
