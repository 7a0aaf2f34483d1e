"""The GPU path end to end, through the CuPy stand-in (tests/cupy_standin.py) or, on a GPU, real CuPy.

``train(gpu=True)`` with its GPU-only branches (host syncs every GPU_SYNC_EVERY steps, stacked losses),
checkpoints, exact resume, ``predict(gpu=True)`` and ``predict.py --gpu --evaluate``; the stand-in
itself (it must refuse what CuPy refuses and offer only CuPy's names); whole-shard inference and the
per-backend dropout draw. Tiny data and a tiny U-Net (features 2, depth 2, 32 x 32), as in test_training.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
from conftest import REAL_GPU, _CUPY_SKIP
from tinyunet import training
from tinyunet.backend import as_array, as_numpy
from tinyunet.checkpoint import load_checkpoint
from tinyunet.cli import predict_main
from tinyunet.layers import Dropout
from tinyunet.losses import binary_crossentropy
from tinyunet.optim import Adam
from tinyunet.parallel import DataParallel
from tinyunet.prediction import predict
from tinyunet.config import build_config
from tinyunet.training import train
from tinyunet.unet import UNet

ROOT = Path(__file__).resolve().parents[1]

TINY = {"features": 2, "depth": 2, "input_size": 32, "progress": False, "plots": False}


def tiny(data: Path, out: Path, **settings):
    return build_config({"data": str(data), "out": str(out), **TINY, **settings})


def assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# --------------------------------------------------------------------------------------------
# The whole GPU path
# --------------------------------------------------------------------------------------------

def test_train_resume_predict_and_evaluate_on_the_gpu(gpu, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "GPU_SYNC_EVERY", 2)  # 5 batches an epoch: syncs of 2, 2 and 1 losses
    straight = train(tiny(tiny_data, tmp_path / "straight", gpu=True, epochs=2))
    half = train(tiny(tiny_data, tmp_path / "half", gpu=True, epochs=1))
    assert train(build_config({"resume": str(half), "epochs": 2})) == half
    a, b = load_checkpoint(straight / "last.npz"), load_checkpoint(half / "last.npz")
    assert a.meta["args"]["gpu"] and b.optimizer_state["t"] == 2 * 5  # 38 flipped images / 8 = 5 steps
    assert_same_arrays(a.params, b.params)  # exact resume, dropout masks drawn by CuPy's generator
    for key in ("m", "v"):
        assert_same_arrays(a.optimizer_state[key], b.optimizer_state[key])
    assert without_seconds(a.meta["history"]) == without_seconds(b.meta["history"])

    # without dropout the GPU computes what one CPU thread computes: on the stand-in, to the bit
    on_gpu = train(tiny(tiny_data, tmp_path / "gpu", gpu=True, epochs=2, dropout=(0, 0)))
    on_cpu = train(tiny(tiny_data, tmp_path / "cpu", epochs=2, dropout=(0, 0), threads=1))
    gpu_run, cpu_run = load_checkpoint(on_gpu / "best.npz"), load_checkpoint(on_cpu / "best.npz")
    exact = gpu.ndarray is cupy_standin.ndarray
    for name, value in gpu_run.params.items():
        np.testing.assert_allclose(value, cpu_run.params[name], rtol=0 if exact else 1e-3,
                                   atol=0 if exact else 1e-4, err_msg=name)

    common = {"model": on_gpu / "best.npz", "data": tiny_data, "progress": False, "log": lambda line: None}
    by_gpu = predict(out=tmp_path / "gpu.csv", gpu=True, **common)
    by_cpu = predict(out=tmp_path / "cpu.csv", threads=1, **common)
    assert isinstance(by_gpu.probs, np.ndarray) and by_gpu.probs.shape == (4, 101, 101)
    np.testing.assert_allclose(by_gpu.probs, by_cpu.probs, rtol=0, atol=0 if exact else 1e-5)
    if exact:
        gpu_csv, cpu_csv = (tmp_path / name / "submission.csv" for name in ("gpu.csv", "cpu.csv"))
        assert gpu_csv.read_text() == cpu_csv.read_text()

    capsys.readouterr()
    code = predict_main(["--model", str(on_gpu / "best.npz"), "--data", str(tiny_data), "--gpu",
                             "--evaluate", "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert code == 0 and "GPU (CuPy)" in printed and "competition score" in printed
    assert (tmp_path / "eval" / "threshold.png").is_file()


def test_gpu_inference_runs_the_whole_shard_at_once(gpu):
    """INFERENCE_PIXELS pieces are for CPU caches: the GPU takes the shard whole."""
    x = np.random.default_rng(0).random((8, 128, 128, 1), dtype=np.float32)
    calls = {}
    for name, net in (("cpu", DataParallel(UNet(features=2, depth=2), threads=1)),
                      ("gpu", DataParallel(UNet(features=2, depth=2, gpu=True)))):
        forward = net.model.forward
        sizes = calls[name] = []
        net.model.forward = lambda batch, train=False: sizes.append(len(batch)) or forward(batch, train)
        net.forward(as_array(x, net.xp))
    assert calls == {"cpu": [4, 4], "gpu": [8]}


def test_dropout_draws_per_backend(gpu, monkeypatch):
    """NumPy: 16-bit integers, the stream of every earlier release; CuPy: float32 uniforms, one kernel."""
    x = np.ones((2, 16, 16, 3), np.float32)
    dropped = round(0.3 * 2 ** 16)
    on_cpu = Dropout(0.3, seed=5)
    keep = np.random.default_rng(5).integers(0, 2 ** 16, size=x.shape, dtype=np.uint16) >= dropped
    np.testing.assert_array_equal(on_cpu.forward(x, train=True), keep * np.float32(2 ** 16 / (2 ** 16 - dropped)))

    generator = type(gpu.random.default_rng(0))
    monkeypatch.setattr(generator, "integers", lambda *args, **kwargs: pytest.fail("an integer draw on CuPy"))
    on_gpu = Dropout(0.3, seed=5, xp=gpu).forward(as_array(x, gpu), train=True)
    values = as_numpy(on_gpu)
    assert on_gpu.dtype == np.float32 and set(np.unique(values)) == {0, np.float32(1 / (1 - dropped / 2 ** 16))}
    assert 0.6 < (values > 0).mean() < 0.8


def test_a_gpu_training_step_reads_nothing_on_the_host(monkeypatch):
    """The GPU path's step (one shard) makes no copy either way; test_host_transfers checks the CPU's shards."""
    cupy = cupy_standin.install(monkeypatch)
    net = DataParallel(UNet(features=2, depth=2, dropout=(0.3, 0.3), gpu=True))
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.random((4, 16, 16, 1), dtype=np.float32))
    y = cupy.asarray((rng.random((4, 16, 16, 1)) > 0.5).astype(np.float32))
    opt = Adam(net.params)
    cupy_standin.refuse_host_reads(monkeypatch)
    monkeypatch.setattr(cupy, "asarray", lambda *args, **kwargs: pytest.fail("a host-to-device copy in the step"))
    for _ in range(2):
        loss, dlogits = binary_crossentropy(net.forward(x, train=True), y)
        net.backward(dlogits, input_grad=False)
        opt.step(net.grads)
    assert isinstance(loss, cupy.ndarray) and loss.ndim == 0


# --------------------------------------------------------------------------------------------
# The stand-in itself
# --------------------------------------------------------------------------------------------

def test_the_standin_refuses_what_cupy_refuses(monkeypatch):
    cupy = cupy_standin.install(monkeypatch)
    a = cupy.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones((2, 3), np.float32)
    for mix in (lambda: a + host, lambda: host * a, lambda: cupy.maximum(a, host), lambda: np.exp(a, out=host),
                lambda: cupy.concatenate([a, host]), lambda: np.asarray(a), lambda: np.array(a),
                lambda: cupy.ascontiguousarray(host), lambda: a.__setitem__(0, host[0])):
        with pytest.raises(TypeError, match="Unsupported type|Implicit conversion|incorrect type"):
            mix()
    assert isinstance(a.sum(), cupy.ndarray) and a.sum().ndim == 0 and isinstance(a[0, 1], cupy.ndarray)
    assert isinstance(np.exp(a), cupy.ndarray) and np.concatenate([a, a]).shape == (4, 3)  # CuPy's dispatch
    assert float(a.sum()) == 15 and as_numpy(a).tolist() == [[0, 1, 2], [3, 4, 5]]
    for missing in (lambda: cupy.asmatrix, lambda: cupy.random.default_rng(0).permutation,
                    lambda: cupy.random.default_rng(0).choice, lambda: a.byteswap):
        with pytest.raises(AttributeError):
            missing()

    assert (a / 65535).dtype == np.float32 and (a / 65536).dtype == np.float64  # CuPy 13: value-based
    assert (a * np.float64(0.5)).dtype == np.float32 and (a * cupy.asarray(0.5)).dtype == np.float64
    weak = cupy_standin.install(monkeypatch, promotion="weak")
    b = weak.ones(3, dtype=np.float32)
    assert (b / 65536).dtype == np.float32 and (b * np.float64(0.5)).dtype == np.float64  # CuPy 14: NEP 50

    cupy_standin.refuse_host_reads(monkeypatch)
    for read in (float, bool, lambda v: v.item(), lambda v: v.get(), weak.asnumpy):
        with pytest.raises(cupy_standin.HostRead):
            read(b.sum())


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed (it imports without a GPU)")
def test_the_standin_has_only_names_cupy_has():
    import cupy  # the real one: this test installs no stand-in

    fake = cupy_standin.build()
    for ours, theirs in ((fake, cupy), (fake.random, cupy.random), (fake.cuda, cupy.cuda),
                         (fake.cuda.Device, cupy.cuda.Device), (fake.random.Generator, cupy.random.Generator)):
        assert {n for n in dir(ours) if not n.startswith("_")} <= set(dir(theirs)), theirs
    ours = {n for n in dir(fake.ndarray) if n.startswith("__") or not n.startswith("_")}
    assert ours - set(dir(object)) - {"__slots__", "__dict__", "__weakref__"} <= set(dir(cupy.ndarray))
    runtime = {n for n in dir(fake.cuda.runtime) if not n.startswith("_")}
    assert runtime <= set(dir(cupy.cuda.runtime))


# --------------------------------------------------------------------------------------------
# benchmarks.gpu_check without a GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(_CUPY_SKIP is None or REAL_GPU, reason="a GPU is usable here: gpu_check would run")
def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0], lines
    assert not list(tmp_path.iterdir())  # no report without a GPU
