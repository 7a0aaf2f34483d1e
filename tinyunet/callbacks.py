"""EarlyStopping, ModelCheckpoint and ReduceLROnPlateau, with the decisions of tf.keras 2.x.

The training loop calls ``callback.on_epoch_end(epoch, logs)`` once per epoch (``epoch`` counts from
0, ``logs`` maps names such as ``"val_loss"`` to floats). Each call returns True when the callback
acted this epoch (asked to stop, saved, reduced the learning rate), so the loop can say so.

- :class:`EarlyStopping` sets ``stop_training``; the loop stops after the epoch.
- :class:`ModelCheckpoint` calls the ``save(epoch, logs)`` function it was given; it knows nothing
  of models or files (lower modules never import higher ones).
- :class:`ReduceLROnPlateau` writes the new rate to ``optimizer.lr`` of the object it was given.

Every callback has ``state_dict()`` / ``load_state_dict(state)`` with plain ints, floats and bools
(``best`` may be ``inf`` before the first value: Python's JSON writes and reads it), so a resumed
run makes exactly the decisions an uninterrupted one would.

A NaN monitored value is never an improvement: every comparison with NaN is false, as in Keras,
so NaN epochs count towards patience. A monitored name missing from ``logs`` raises ``KeyError``
(Keras only warns, and would then silently never stop).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np

MODES = ("min", "max")


class HasLearningRate(Protocol):
    """Anything with a mutable learning rate ``lr`` (the Adam optimizer)."""

    lr: float


class Restartable(HasLearningRate, Protocol):
    """A learning rate and a ``reset()`` that forgets the optimizer's state (Adam's moments and step count)."""

    def reset(self) -> None: ...


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def _monitored(logs: dict, monitor: str) -> float:
    """The monitored value of ``logs`` as a float; KeyError naming what is there when absent."""
    if monitor not in logs:
        raise KeyError(f"monitored value {monitor!r} is not in the epoch logs (they have: {', '.join(logs)})")
    return float(logs[monitor])


def _initial_best(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


def _load_keys(state: dict, keys: tuple[str, ...], name: str) -> None:
    """Raise ValueError when ``state`` lacks one of ``keys`` (a state from another version)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{name} state is missing {', '.join(missing)}; it was saved by another version")


class EarlyStopping:
    """Stop when ``monitor`` has not improved for ``patience`` epochs (tf.keras 2.x semantics).

    Improvement (mode min): ``current < best - min_delta``; (mode max): ``current > best + min_delta``.
    Every epoch ``wait`` grows by one and drops back to 0 on an improvement; training stops when
    ``wait >= patience``, but never at epoch 0 (Keras's "only check after the first epoch").
    With patience 7 and no improvement after epoch 2, training stops at the end of epoch 9.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 7, min_delta: float = 0.0, mode: str = "min"):
        _check_mode(mode)
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = abs(min_delta)  # Keras takes the absolute value too
        self.mode = mode
        self.wait = 0  # epochs since the last improvement
        self.best = _initial_best(mode)  # best monitored value so far
        self.best_epoch: int | None = None  # epoch of ``best``
        self.stopped_epoch: int | None = None  # epoch at whose end training was stopped
        self.stop_training = False  # read by the training loop after each epoch

    def _is_improvement(self, current: float) -> bool:
        if self.mode == "min":
            return bool(np.less(current + self.min_delta, self.best))
        return bool(np.greater(current - self.min_delta, self.best))

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        """Update the counters with this epoch's value; True when training should stop now."""
        current = _monitored(logs, self.monitor)
        self.wait += 1
        if self._is_improvement(current):
            self.best = current
            self.best_epoch = epoch
            self.wait = 0
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.stop_training = True
        return self.stop_training

    def state_dict(self) -> dict:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "stop_training": self.stop_training,
        }

    def load_state_dict(self, state: dict) -> None:
        _load_keys(state, ("wait", "best", "best_epoch", "stopped_epoch", "stop_training"), "EarlyStopping")
        self.wait = int(state["wait"])
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.stopped_epoch = state["stopped_epoch"]
        self.stop_training = bool(state["stop_training"])


class ModelCheckpoint:
    """Call ``save(epoch, logs)`` when ``monitor`` reaches a new best (every epoch without ``save_best_only``).

    A new best (mode min) is ``current < best``, strictly, with no ``min_delta``, as in Keras. ``best``
    is updated before ``save`` is called, so a state saved from inside ``save`` already holds it.
    """

    def __init__(
        self,
        save: Callable[[int, dict], None],
        monitor: str = "val_loss",
        mode: str = "min",
        save_best_only: bool = True,
    ):
        _check_mode(mode)
        self.save = save  # writes the checkpoint; given by the training loop
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.best = _initial_best(mode)  # best monitored value so far
        self.best_epoch: int | None = None  # epoch of ``best``

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        """Save when this epoch is a new best (or always); True when ``save`` was called."""
        if self.save_best_only:
            current = _monitored(logs, self.monitor)
            better = np.less(current, self.best) if self.mode == "min" else np.greater(current, self.best)
            if not better:
                return False
            self.best = current
            self.best_epoch = epoch
        self.save(epoch, logs)
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        _load_keys(state, ("best", "best_epoch"), "ModelCheckpoint")
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]


class ReduceLROnPlateau:
    """Multiply ``optimizer.lr`` by ``factor`` after ``patience`` epochs without improvement (tf.keras 2.x).

    Each epoch, in this order:

    1. in cooldown (``cooldown_counter > 0``): ``cooldown_counter -= 1`` and ``wait = 0``;
    2. improvement (mode min: ``current < best - min_delta``): ``best = current``, ``wait = 0``;
    3. otherwise, when not (or no longer) in cooldown: ``wait += 1``; once ``wait >= patience``, and
       the rate is still above ``min_lr`` (compared in float32, like Keras's float32 variable):
       ``lr = max(lr * factor, min_lr)``, ``cooldown_counter = cooldown``, ``wait = 0``.

    With patience 5 and no improvement after epoch 0, the rate drops at the end of epochs 5, 10, ...
    until it reaches ``min_lr``. With a cooldown the gap is ``patience + cooldown - 1`` epochs: the
    epoch that ends the cooldown already counts towards ``wait`` (so ``cooldown=1`` changes nothing),
    exactly as in Keras.
    """

    def __init__(
        self,
        optimizer: HasLearningRate,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 5,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 1e-5,
        mode: str = "min",
    ):
        _check_mode(mode)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if patience < 0 or cooldown < 0:
            raise ValueError(f"patience and cooldown must be >= 0, got {patience} and {cooldown}")
        self.optimizer = optimizer  # its ``lr`` is read and written here
        self.monitor = monitor
        self.factor = factor
        self.patience = patience
        self.min_delta = min_delta
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.mode = mode
        self.wait = 0  # epochs without improvement outside cooldown
        self.best = _initial_best(mode)  # best monitored value so far
        self.cooldown_counter = 0  # epochs of cooldown left after a reduction

    def _is_improvement(self, current: float) -> bool:
        if self.mode == "min":
            return bool(np.less(current, self.best - self.min_delta))
        return bool(np.greater(current, self.best + self.min_delta))

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        """Update the counters with this epoch's value; True when the learning rate was reduced."""
        current = _monitored(logs, self.monitor)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current):
            self.best = current
            self.wait = 0
            return False
        if self.cooldown_counter > 0:
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        old_lr = float(self.optimizer.lr)
        if not np.float32(old_lr) > np.float32(self.min_lr):
            return False  # already at the floor; Keras leaves ``wait`` growing here too
        self.optimizer.lr = max(old_lr * self.factor, self.min_lr)
        self.cooldown_counter = self.cooldown
        self.wait = 0
        return True

    def state_dict(self) -> dict:
        return {"wait": self.wait, "best": self.best, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        _load_keys(state, ("wait", "best", "cooldown_counter"), "ReduceLROnPlateau")
        self.wait = int(state["wait"])
        self.best = float(state["best"])
        self.cooldown_counter = int(state["cooldown_counter"])


class CosineAnnealing:
    """Cosine annealing with warm restarts (SGDR, Loshchilov and Hutter 2017), one rate per epoch:

        lr(epoch) = min_lr + (max_lr - min_lr) * (1 + cos(pi * (epoch mod cycle) / cycle)) / 2

    Every cycle of ``cycle`` epochs starts at ``max_lr`` and ends just above ``min_lr``, where the
    weights settle in a minimum worth keeping: :meth:`on_epoch_end` returns True at the last epoch
    of each cycle, when the loop saves a snapshot (an ensemble member). With ``restart_optimizer``
    every restart after the first cycle also resets the optimizer (Adam's moments and step count), so
    each cycle starts as a fine-tuning run from the last snapshot would. The rate and the reset are
    functions of the epoch alone, so the state to resume is empty.
    """

    def __init__(self, optimizer: Restartable, max_lr: float, cycle: int, min_lr: float = 1e-5,
                 restart_optimizer: bool = False):
        if cycle < 1:
            raise ValueError(f"cycle must be at least 1 epoch, got {cycle}")
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.cycle = max_lr, min_lr, cycle
        self.restart_optimizer = restart_optimizer  # optimizer.reset() at each restart (epoch k * cycle, k >= 1)

    def lr_at(self, epoch: int) -> float:
        t = (epoch % self.cycle) / self.cycle  # in [0, 1)
        return self.min_lr + (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2

    def on_epoch_begin(self, epoch: int) -> None:
        if self.restart_optimizer and epoch > 0 and epoch % self.cycle == 0:
            self.optimizer.reset()
        self.optimizer.lr = self.lr_at(epoch)

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        """True when ``epoch`` ends a cycle: the weights are a snapshot to keep."""
        return (epoch + 1) % self.cycle == 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
