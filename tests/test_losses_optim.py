"""Binary cross-entropy on logits and Adam, each against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import as_array, as_numpy
from tinyunet.gradcheck import assert_gradients_close, numerical_gradient
from tinyunet.losses import binary_crossentropy, pixel_accuracy
from tinyunet.optim import Adam


def bce_reference(logits, target):
    """The textbook formula on probabilities (fine for moderate logits)."""
    p = 1 / (1 + np.exp(-logits))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def test_bce_matches_textbook_formula_and_soft_targets(xp, rng):
    z = rng.standard_normal((2, 5, 5, 1)) * 3
    y = rng.random((2, 5, 5, 1))  # soft targets, as a resized mask gives
    loss, _ = binary_crossentropy(as_array(z, xp), as_array(y, xp))
    assert float(loss) == pytest.approx(bce_reference(z, y), rel=1e-12)


def test_bce_gradient_check(xp, rng):
    z = as_array(rng.standard_normal((2, 4, 4, 1)) * 2, xp)
    y = as_array((rng.random((2, 4, 4, 1)) > 0.5).astype(np.float64), xp)
    _, dz = binary_crossentropy(z, y)
    numeric = numerical_gradient(lambda: float(binary_crossentropy(z, y)[0]), z)
    assert_gradients_close("logits", dz, numeric)


def test_bce_stable_at_extreme_logits(xp):
    z = xp.asarray([1000.0, -1000.0, 1000.0, -1000.0], dtype=xp.float32).reshape(1, 2, 2, 1)
    y = xp.asarray([0.0, 1.0, 1.0, 0.0], dtype=xp.float32).reshape(1, 2, 2, 1)
    loss, dz = binary_crossentropy(z, y)
    assert float(loss) == pytest.approx(500.0)  # two pixels cost 1000 each, two cost 0
    np.testing.assert_allclose(as_numpy(dz).ravel(), [0.25, -0.25, 0.0, 0.0])
    assert loss.dtype == xp.float32


def test_bce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        binary_crossentropy(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4)))


def test_pixel_accuracy():
    z = np.array([2.0, -1.0, 0.5, -3.0]).reshape(1, 2, 2, 1)
    y = np.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 2, 2, 1)
    assert float(pixel_accuracy(z, y)) == 0.75


def adam_reference(p, grads, lr, b1=0.9, b2=0.999, eps=1e-7):
    """Keras's Adam, written out step by step in float64."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return p


def test_adam_matches_keras_formula(xp, rng):
    p0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(6)]
    params = {"w": as_array(p0.copy(), xp)}
    opt = Adam(params, lr=0.01)
    for g in grads:
        opt.step({"w": as_array(g, xp)})
    np.testing.assert_allclose(as_numpy(params["w"]), adam_reference(p0, grads, 0.01), rtol=1e-12)


def test_adam_state_dict_resumes_exactly(xp, rng):
    grads = [{"w": as_array(rng.standard_normal(5).astype(np.float32), xp)} for _ in range(10)]
    straight = {"w": xp.ones(5, dtype=xp.float32)}
    opt = Adam(straight, lr=0.05)
    for g in grads:
        opt.step(g)

    first = {"w": xp.ones(5, dtype=xp.float32)}
    opt1 = Adam(first, lr=0.05)
    for g in grads[:4]:
        opt1.step(g)
    state = {k: ({n: as_numpy(a).copy() for n, a in v.items()} if isinstance(v, dict) else v)
             for k, v in opt1.state_dict().items()}  # as a checkpoint would hold it, on the host
    resumed = {"w": as_array(as_numpy(first["w"]).copy(), xp)}
    opt2 = Adam(resumed, lr=123.0)
    opt2.load_state_dict(state)
    assert opt2.lr == 0.05 and opt2.t == 4
    for g in grads[4:]:
        opt2.step(g)
    np.testing.assert_array_equal(as_numpy(resumed["w"]), as_numpy(straight["w"]))


def test_adam_reset_makes_the_next_steps_those_of_a_new_adam(xp, rng):
    grads = [{"w": as_array(rng.standard_normal(5), xp)} for _ in range(7)]
    used = {"w": as_array(rng.standard_normal(5), xp)}
    opt = Adam(used, lr=0.05)
    for g in grads[:3]:
        opt.step(g)
    fresh_start = {"w": as_array(as_numpy(used["w"]).copy(), xp)}
    moments = opt.m["w"], opt.v["w"]
    opt.reset()
    assert opt.t == 0 and opt.lr == 0.05 and opt.m["w"] is moments[0] and opt.v["w"] is moments[1]  # in place
    fresh = Adam(fresh_start, lr=0.05)
    for g in grads[3:]:
        opt.step(g)
        fresh.step(g)
    np.testing.assert_array_equal(as_numpy(used["w"]), as_numpy(fresh_start["w"]))
    assert opt.t == fresh.t == 4


def test_adam_lr_change_takes_effect_and_minimises():
    params = {"w": np.array([5.0, -3.0])}
    opt = Adam(params, lr=0.1)
    for _ in range(300):
        opt.step({"w": 2 * params["w"]})  # gradient of |w|^2
    assert np.abs(params["w"]).max() < 0.05
    before = params["w"].copy()
    opt.lr = 0.0
    opt.step({"w": 2 * params["w"]})
    np.testing.assert_array_equal(params["w"], before)


def test_adam_load_rejects_wrong_shapes():
    opt = Adam({"w": np.zeros(3)})
    state = opt.state_dict() | {"m": {"w": np.zeros(4)}, "v": {"w": np.zeros(4)}}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state)
