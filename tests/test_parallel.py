"""Data parallelism (tinyunet.parallel): shards of a batch on threads give the model's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from tinyunet.gradcheck import assert_gradients_close, numerical_gradient
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet import parallel
from tinyunet.parallel import DataParallel, usable_cores
from tinyunet.unet import UNet


def _model(dropout=(0.0, 0.0), features=2, seed=3):
    model = UNet(features=features, depth=2, dropout=dropout, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for p in model.params.values():  # random biases, so their gradients are not trivially tested
        if p.ndim == 1:
            p[...] = rng.standard_normal(p.shape) * 0.1
    return model


def _batch(n: int, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, 1))
    y = (rng.random((n, size, size, 1)) > 0.6).astype(np.float64)
    return x, y


def _dropouts(net: DataParallel) -> list:
    """Every replica's dropout layers, shard 0's first."""
    return [layer for replica in net.replicas for layer in replica.dropouts]


def _step(net, x, y, input_grad: bool = True):
    """(loss, logits, dx, grads) of one forward + backward of ``net`` (a UNet or a DataParallel)."""
    logits = net.forward(x, train=True)
    loss, dlogits = binary_crossentropy(logits, y)
    dx = net.backward(dlogits, input_grad=input_grad)
    return float(loss), logits, dx, {name: g.copy() for name, g in net.grads.items()}


@pytest.mark.parametrize("threads, batch, shards", [(1, 5, 1), (2, 5, 2), (3, 5, 3), (8, 5, 5), (2, 1, 1)])
def test_shards_give_the_whole_batch_numbers(threads, batch, shards):
    """Logits, loss, input gradient and every parameter gradient equal one model on the whole batch."""
    x, y = _batch(batch)
    loss, logits, dx, grads = _step(_model(), x, y)
    net = DataParallel(_model(), threads)
    got = _step(net, x, y)
    assert len(net.splits) == shards
    sizes = [part.stop - part.start for _, part in net.splits]
    assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1
    assert got[0] == pytest.approx(loss, rel=1e-14)
    np.testing.assert_allclose(got[1], logits, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got[2], dx, rtol=1e-12, atol=1e-14)
    for name, grad in grads.items():
        np.testing.assert_allclose(got[3][name], grad, rtol=1e-10, atol=1e-14, err_msg=name)


def test_inference_in_pieces_gives_the_same_logits(monkeypatch):
    """train=False runs each shard in pieces of INFERENCE_PIXELS pixels: the same logits, no backward."""
    x, _ = _batch(7)
    expected = _model().forward(x)
    monkeypatch.setattr(parallel, "INFERENCE_PIXELS", 2 * 16 * 16)  # pieces of 2 images
    net = DataParallel(_model(), 2)
    calls = []
    for replica in net.replicas:
        forward = replica.forward

        def counting(x, train=False, forward=forward):
            calls.append(len(x))
            return forward(x, train)

        replica.forward = counting
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-12, atol=1e-14)
    assert sorted(calls) == [1, 2, 2, 2]  # shards of 4 and 3 images, in pieces of at most 2
    with pytest.raises(RuntimeError, match="needs a forward with train=True"):
        net.backward(np.ones_like(expected))


def test_no_input_gradient_when_not_asked():
    x, y = _batch(4)
    net = DataParallel(_model(), 2)
    assert _step(net, x, y, input_grad=False)[2] is None


def test_one_thread_is_the_model_itself_bit_for_bit():
    x, y = _batch(3)
    model = _model(dropout=(0.3, 0.3))
    model.reseed_dropout((0, 1))
    expected = _step(model, x, y)
    net = DataParallel(_model(dropout=(0.3, 0.3)), 1)
    net.reseed_dropout((0, 1))
    assert net.replicas == [net.model] and net.pool is None
    got = _step(net, x, y)
    np.testing.assert_array_equal(got[1], expected[1])
    for name in expected[3]:
        np.testing.assert_array_equal(got[3][name], expected[3][name])


def test_whole_network_gradient_check_through_the_shards():
    """loss -> logits -> input and every parameter, float64, three shards, dropout on with frozen masks."""
    x, y = _batch(3, size=8, seed=1)
    net = DataParallel(_model(dropout=(0.25, 0.5), features=1), 3)  # 488 parameters: a few seconds
    net.forward(x, train=True)  # every shard draws its masks once ...
    for layer in _dropouts(net):
        layer.frozen = True  # ... and keeps them for every evaluation below
    assert len(_dropouts(net)) == 3 * 4 and any(float((layer.mask == 0).mean()) > 0 for layer in _dropouts(net))

    def loss() -> float:
        return float(binary_crossentropy(net.forward(x, train=True), y)[0])

    _, _, dx, grads = _step(net, x, y)
    analytic = {"input": dx} | grads
    for name, array in ({"input": x} | net.params).items():
        assert_gradients_close(name, analytic[name], numerical_gradient(loss, array), tol=1e-6)


def test_replicas_share_the_weights_and_see_every_update():
    x, y = _batch(4)
    net = DataParallel(_model(), 2)
    replica = net.replicas[1]
    for (_, mine), (_, its) in zip(net.model.named_layers(), replica.named_layers()):
        assert all(its.params[key] is mine.params[key] for key in mine.params)
        assert all(its.grads[key] is not mine.grads[key] for key in mine.grads)
    opt = Adam(net.params, lr=0.1)
    before = {name: p.copy() for name, p in replica.params.items()}
    _step(net, x, y)
    opt.step(net.grads)
    assert all(not np.array_equal(replica.params[name], before[name]) for name in before)
    net.load_params(before)  # in place: the replica sees it too
    assert all(np.array_equal(replica.params[name], before[name]) for name in before)


def test_each_shard_draws_its_own_masks_and_reseeding_repeats_them():
    x = np.ones((4, 16, 16, 1))
    net = DataParallel(_model(dropout=(0.5, 0.5)), 2)

    def masks():
        net.forward(x, train=True)
        return [layer.mask.copy() for layer in _dropouts(net)]

    net.reseed_dropout((7, 0))
    first = masks()
    net.reseed_dropout((7, 0))
    assert all(np.array_equal(a, b) for a, b in zip(first, masks()))
    shard0, shard1 = first[:4], first[4:]  # the same layers in the two replicas
    assert not any(np.array_equal(a, b) for a, b in zip(shard0, shard1))


def test_blas_runs_single_threaded_inside_the_shards_and_is_restored():
    x, y = _batch(4)
    net = DataParallel(_model(), 2)
    seen = []
    for replica in net.replicas:  # record BLAS's thread count from inside every shard's forward
        head = replica.head.forward

        def recording(x, train=False, head=head):
            seen.append([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"])
            return head(x, train)

        replica.head.forward = recording
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    _step(net, x, y)
    assert len(seen) == 2 and all(counts and set(counts) == {1} for counts in seen)
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


def test_bad_thread_counts():
    with pytest.raises(ValueError, match="threads must be at least 1"):
        DataParallel(_model(), 0)


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    if not hasattr(parallel.os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this OS")
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {3})  # pinned to one core of many
    assert usable_cores() == 1 and DataParallel(_model(), None).threads == 1
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert DataParallel(_model(), None).threads == 3


def test_as_many_shards_as_threads_on_numpy_and_one_on_cupy(xp):
    model = UNet(features=2, depth=2, dropout=(0.0, 0.0), gpu=xp is not np)
    net = DataParallel(model, 4)
    shards = 4 if xp is np else 1  # on a GPU the device is the parallelism
    assert net.threads == shards and len(net.replicas) == shards and net.replicas[0] is model
