"""No host-device copy inside a training step, checked on the CPU with arrays that act like GPU arrays.

On CuPy a value reaches the host only when asked for: ``float(a)``, ``int(a)``, ``bool(a)``,
``a.item()``, ``a.tolist()`` (each one a copy and a wait for the device), or an explicit conversion
through ``tinyunet.backend`` (``as_numpy`` / ``as_array``). Here the step (DataParallel forward on two
shards, BCE, backward, Adam) runs on :class:`DeviceLike` arrays, NumPy arrays that refuse every one
of those, with every array the layers create made a DeviceLike too. Any host copy that creeps into
the step fails the test here, on every machine, without a GPU.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

import tinyunet
from tinyunet.layers import Conv2D, Conv2DTranspose, Dropout, MaxPooling2D, ReLU
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.unet import UNet


class HostTransfer(AssertionError):
    """A value would have been copied to the host inside the step."""


class DeviceLike(np.ndarray):
    """A NumPy array that, like a CuPy array, keeps 0-d results as arrays and refuses to become a
    Python number, bool or list (on a GPU each of those copies to the host)."""

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        return np.asarray(obj).view(DeviceLike)  # reductions stay 0-d arrays, as on CuPy

    def _refuse(self, *args, **kwargs):
        raise HostTransfer("a DeviceLike array was turned into a host value")

    __float__ = __int__ = __bool__ = __index__ = __complex__ = item = tolist = _refuse


class DeviceLikeNumPy:
    """The ``xp`` the layers get: NumPy, with every array it returns made a DeviceLike."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr  # dtypes, constants, submodules

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            return out.view(DeviceLike) if isinstance(out, np.ndarray) else out

        return call


def _refuse_conversion(*args, **kwargs):
    raise HostTransfer("tinyunet.backend converted an array between host and device")


def package_modules() -> list:
    """Every module of tinyunet, imported: the guard covers whatever a step may reach, not a list."""
    return [importlib.import_module(f"tinyunet.{info.name}") for info in pkgutil.iter_modules(tinyunet.__path__)]


def guard(monkeypatch) -> None:
    """From now on every tinyunet module that asks for the array module gets DeviceLikeNumPy, and
    every explicit host/device conversion (``as_array``, ``as_numpy``, wherever imported) raises."""
    fake = DeviceLikeNumPy()
    for module in package_modules():
        if hasattr(module, "get_array_module"):
            monkeypatch.setattr(module, "get_array_module", lambda *arrays: fake)
        for name in ("as_array", "as_numpy"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _refuse_conversion)


def _device_net(threads: int = 2) -> DataParallel:
    """A small U-Net on ``threads`` shards whose parameters and gradients are DeviceLike, as if
    uploaded to the device (built before the guard is on: building uploads the weights)."""
    net = DataParallel(UNet(features=2, depth=2, dropout=(0.3, 0.3), seed=0), threads)
    for replica in net.replicas:
        for _, layer in replica.named_layers():
            for store in (layer.params, layer.grads):  # replicas share the params dicts
                for key in store:
                    store[key] = store[key].view(DeviceLike)
    return net


def _batch():
    rng = np.random.default_rng(0)
    x = rng.random((4, 16, 16, 1), dtype=np.float32).view(DeviceLike)
    y = (rng.random((4, 16, 16, 1)) > 0.5).astype(np.float32).view(DeviceLike)
    return x, y


def test_the_guard_catches_a_host_copy():
    x, _ = _batch()
    for host_copy in (float, int, bool, lambda a: a.item(), lambda a: a.tolist()):
        with pytest.raises(HostTransfer):
            host_copy(x.mean())
    assert isinstance(x.mean(), DeviceLike) and isinstance(x @ np.ones((1, 1), np.float32), DeviceLike)


def test_a_training_step_makes_no_host_copy(monkeypatch):
    net = _device_net()
    net.reseed_dropout((0, 0))
    x, y = _batch()
    opt = Adam(net.params, lr=1e-3)
    before = {name: np.array(p) for name, p in net.params.items()}
    guard(monkeypatch)
    for _ in range(2):
        logits = net.forward(x, train=True)
        loss, dlogits = binary_crossentropy(logits, y)
        net.backward(dlogits, input_grad=False)
        opt.step(net.grads)
    assert isinstance(loss, DeviceLike) and loss.ndim == 0  # the loss stays on the "device"
    assert all(isinstance(p, DeviceLike) for p in net.params.values())
    assert all(isinstance(m, DeviceLike) for m in opt.m.values())
    for replica in net.replicas:  # what every layer kept for its backward stayed DeviceLike, all the way down
        kept = [(name, key, value) for name, layer in replica.named_layers()
                for key, value in vars(layer).items() if isinstance(value, np.ndarray)
                and not isinstance(layer, Dropout)]  # masks: drawn by NumPy's generator, which DeviceLike cannot reach
        # (the GPU stand-in's test, tests/test_gpu_standin.py, covers them with CuPy's generator)
        cached = (Conv2D, Conv2DTranspose, MaxPooling2D, ReLU)  # the layers that keep arrays for backward
        assert {name for name, _, _ in kept} >= {name for name, layer in replica.named_layers()
                                                 if isinstance(layer, cached)}
        assert all(isinstance(value, DeviceLike) for _, _, value in kept), [
            f"{name}.{key}" for name, key, value in kept if not isinstance(value, DeviceLike)]
    assert any(not np.array_equal(np.array(p), before[name]) for name, p in net.params.items())


def test_a_host_copy_in_the_step_is_caught(monkeypatch):
    """The same step with an optimizer that reads a gradient norm on the host fails."""
    step = Adam.step

    def step_with_a_host_read(self, grads):
        float((grads["head.W"] ** 2).sum())  # e.g. a gradient-norm printout
        step(self, grads)

    monkeypatch.setattr(Adam, "step", step_with_a_host_read)
    net = _device_net()
    x, y = _batch()
    opt = Adam(net.params)
    guard(monkeypatch)
    _, dlogits = binary_crossentropy(net.forward(x, train=True), y)
    net.backward(dlogits, input_grad=False)
    with pytest.raises(HostTransfer):
        opt.step(net.grads)
