"""EarlyStopping, ModelCheckpoint and ReduceLROnPlateau against hand-written tf.keras 2.x traces.

Each test feeds a scripted sequence of ``val_loss`` values, one per epoch, and checks the epoch at
which Keras would stop, save or reduce the learning rate, worked out by hand from Keras's rules.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from tinyunet.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau

NAN = math.nan


def run(callback, values, start=0, monitor="val_loss"):
    """Feed ``values`` to ``callback`` from epoch ``start``; return what each call returned."""
    return [callback.on_epoch_end(start + i, {monitor: v, "loss": 0.0}) for i, v in enumerate(values)]


def json_round_trip(state: dict) -> dict:
    """The state as it comes back out of the checkpoint's JSON."""
    return json.loads(json.dumps(state))


# --- EarlyStopping ------------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # best 0.8 at epoch 2; epoch 6 equals it (not strictly better); wait reaches 7 at epoch 9
    values = [1.0, 0.9, 0.8, 0.85, 0.9, 0.81, 0.8, 0.82, 0.83, 0.84]
    es = EarlyStopping(patience=7)
    waits = []
    for epoch, v in enumerate(values):
        stop = es.on_epoch_end(epoch, {"val_loss": v})
        waits.append(es.wait)
        assert stop == (epoch == 9)
    assert waits == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert es.stop_training and es.stopped_epoch == 9
    assert es.best == 0.8 and es.best_epoch == 2


def test_early_stopping_keeps_going_while_improving():
    es = EarlyStopping(patience=2)
    assert run(es, [1.0, 0.9, 0.95, 0.8, 0.85, 0.7, 0.75]) == [False] * 7
    assert es.wait == 1 and es.best == 0.7


def test_early_stopping_min_delta_is_a_margin_below_best():
    # improvement needs current < best - 0.1: 0.95 is not (wait 1), 0.85 is, 0.89 and 0.80 are not
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert run(es, [1.0, 0.95, 0.85, 0.89, 0.80]) == [False, False, False, False, True]
    assert es.best == 0.85 and es.stopped_epoch == 4


def test_early_stopping_never_stops_at_epoch_zero():
    # Keras checks only after the first epoch: patience 0 stops at epoch 1 even on an improvement
    es = EarlyStopping(patience=0)
    assert run(es, [1.0, 0.5]) == [False, True]


def test_early_stopping_nan_is_never_an_improvement():
    es = EarlyStopping(patience=2)
    assert run(es, [1.0, NAN, NAN]) == [False, False, True]
    assert es.best == 1.0


def test_early_stopping_mode_max():
    es = EarlyStopping(monitor="val_score", patience=2, mode="max")
    assert run(es, [0.5, 0.6, 0.6, 0.55], monitor="val_score") == [False, False, False, True]


def test_early_stopping_state_round_trip_gives_identical_decisions():
    values = [1.0, 0.9, 0.95, 0.97, 0.85, 0.9, 0.91, 0.92, 0.93]
    original = EarlyStopping(patience=3)
    run(original, values[:5])
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(json_round_trip(original.state_dict()))
    assert run(resumed, values[5:], start=5) == run(original, values[5:], start=5) == [False, False, True, True]
    assert resumed.state_dict() == original.state_dict()


# --- ModelCheckpoint ----------------------------------------------------------------------------


def test_model_checkpoint_saves_on_each_new_best_only():
    saved = []
    mc = ModelCheckpoint(lambda epoch, logs: saved.append((epoch, logs["val_loss"])))
    decisions = run(mc, [1.0, 0.9, 0.9, 0.95, 0.8, NAN, 0.7])
    assert decisions == [True, True, False, False, True, False, True]
    assert saved == [(0, 1.0), (1, 0.9), (4, 0.8), (6, 0.7)]
    assert mc.best == 0.7 and mc.best_epoch == 6


def test_model_checkpoint_best_is_updated_before_saving():
    seen = []
    mc = ModelCheckpoint(lambda epoch, logs: seen.append(mc.state_dict()))
    run(mc, [1.0, 0.5])
    assert seen == [{"best": 1.0, "best_epoch": 0}, {"best": 0.5, "best_epoch": 1}]


def test_model_checkpoint_mode_max_and_save_every_epoch():
    saved = []
    best_only = ModelCheckpoint(lambda epoch, logs: saved.append(epoch), monitor="val_score", mode="max")
    run(best_only, [0.5, 0.4, 0.6], monitor="val_score")
    assert saved == [0, 2]
    every = []
    always = ModelCheckpoint(lambda epoch, logs: every.append(epoch), save_best_only=False)
    assert run(always, [1.0, 2.0, NAN]) == [True, True, True]
    assert every == [0, 1, 2]


def test_model_checkpoint_state_round_trip():
    saved = []
    original = ModelCheckpoint(lambda epoch, logs: saved.append(epoch))
    run(original, [1.0, 0.6, 0.7])
    resumed = ModelCheckpoint(lambda epoch, logs: saved.append(epoch))
    resumed.load_state_dict(json_round_trip(original.state_dict()))
    assert run(resumed, [0.65, 0.55], start=3) == [False, True]
    assert saved == [0, 1, 4]


# --- ReduceLROnPlateau --------------------------------------------------------------------------


def make_reduce(lr=1e-3, **kwargs):
    optimizer = SimpleNamespace(lr=lr)
    return optimizer, ReduceLROnPlateau(optimizer, **kwargs)


def lr_trace(optimizer, callback, values):
    """The learning rate after each epoch's ``on_epoch_end``."""
    trace = []
    for epoch, v in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": v})
        trace.append(optimizer.lr)
    return trace


def test_reduce_lr_after_patience_epochs_down_to_min_lr():
    # defaults: factor 0.1, patience 5, min_lr 1e-5. Flat after epoch 0: reduced at epochs 5 and 10,
    # then 1e-5 is the floor (compared in float32, as Keras's variable is) and nothing changes.
    optimizer, rl = make_reduce()
    trace = lr_trace(optimizer, rl, [1.0] * 17)
    expected = [1e-3] * 5 + [1e-4] * 5 + [1e-5] * 7
    assert trace == pytest.approx(expected, rel=1e-12)
    reduced_at = [e for e in range(1, 17) if trace[e] < trace[e - 1]]
    assert reduced_at == [5, 10]
    assert rl.wait == 6  # at the floor Keras leaves wait growing: 1..5 after epoch 10, then 6


def test_reduce_lr_min_delta_ignores_tiny_improvements():
    # each value is lower than the last, but never by more than 1e-4 below best = 1.0
    optimizer, rl = make_reduce()
    reduced = run(rl, [1.0, 0.99999, 0.99998, 0.99997, 0.99996, 0.99995])
    assert reduced == [False] * 5 + [True]
    assert rl.best == 1.0 and optimizer.lr == pytest.approx(1e-4)


def test_reduce_lr_improvement_resets_wait():
    _, rl = make_reduce(patience=3)
    reduced = run(rl, [1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6])
    assert reduced == [False, False, False, False, False, False, True]


def test_reduce_lr_cooldown():
    # patience 2, cooldown 2: reduce at 2; epoch 3 in cooldown; epoch 4 ends it and counts (wait 1);
    # reduce at 5; epochs 6-7 the same; at epoch 8 the rate is already at min_lr
    optimizer, rl = make_reduce(patience=2, cooldown=2)
    reduced = run(rl, [1.0] * 10)
    assert [e for e, r in enumerate(reduced) if r] == [2, 5]
    assert optimizer.lr == pytest.approx(1e-5)


def test_reduce_lr_cooldown_one_changes_nothing_as_in_keras():
    _, no_cooldown = make_reduce(patience=2, min_lr=1e-9)
    _, cooldown_1 = make_reduce(patience=2, cooldown=1, min_lr=1e-9)
    assert run(no_cooldown, [1.0] * 9) == run(cooldown_1, [1.0] * 9)


def test_reduce_lr_improvement_during_cooldown_sets_best():
    _, rl = make_reduce(patience=1, cooldown=3, min_lr=1e-9)
    run(rl, [1.0, 1.0, 0.5])  # reduce at 1, then an improvement in cooldown
    assert rl.best == 0.5 and rl.wait == 0 and rl.cooldown_counter == 2


def test_reduce_lr_is_floored_at_min_lr():
    optimizer, rl = make_reduce(lr=2e-5, patience=1)
    run(rl, [1.0, 1.0])
    assert optimizer.lr == 1e-5


def test_reduce_lr_nan_counts_as_no_improvement():
    _, rl = make_reduce(patience=2)
    assert run(rl, [1.0, NAN, NAN]) == [False, False, True]
    assert rl.best == 1.0


def test_reduce_lr_state_round_trip_gives_identical_decisions():
    values = [1.0, 0.9, 0.9, 0.9, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
    opt_a, original = make_reduce(patience=2, cooldown=2)
    run(original, values[:5])  # reduced at epoch 3, so it stops mid-cooldown
    assert original.cooldown_counter == 1
    opt_b, resumed = make_reduce(lr=opt_a.lr, patience=2, cooldown=2)  # the lr comes back with Adam's state
    resumed.load_state_dict(json_round_trip(original.state_dict()))
    decisions = run(resumed, values[5:], start=5)
    assert decisions == run(original, values[5:], start=5)
    assert True in decisions
    assert opt_b.lr == opt_a.lr and resumed.state_dict() == original.state_dict()


# --- shared behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: EarlyStopping(), lambda: ModelCheckpoint(lambda e, logs: None), lambda: make_reduce()[1]]
)
def test_missing_monitor_is_an_error_naming_what_is_there(make):
    with pytest.raises(KeyError, match="val_loss.*loss"):
        make().on_epoch_end(0, {"loss": 1.0})


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="auto")
    with pytest.raises(ValueError, match="factor"):
        make_reduce(factor=1.0)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)


def test_load_state_dict_rejects_an_incomplete_state():
    with pytest.raises(ValueError, match="cooldown_counter"):
        make_reduce()[1].load_state_dict({"wait": 0, "best": 1.0})
