"""Shared fixtures: the array backends every engine test runs on.

``xp`` is NumPy, then CuPy: real CuPy where a CUDA GPU is usable, else the NumPy-backed stand-in of
``cupy_standin.py``. ``TINYUNET_TEST_GPU=1`` (``python -m benchmarks.gpu_check`` sets it) demands the
real thing: every CuPy test then runs on the GPU, and fails rather than falls back when it cannot.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import cupy_standin
from tinyunet.backend import GPUUnavailableError, gpu_backend


def _cupy_reason() -> str | None:
    """None when CuPy and a CUDA device are usable, else why not."""
    try:
        gpu_backend()
    except GPUUnavailableError as err:
        return str(err)
    return None


_CUPY_SKIP = _cupy_reason()


REAL_GPU = os.environ.get("TINYUNET_TEST_GPU") == "1"


def cupy_under_test(monkeypatch):
    """Real CuPy when a GPU is usable (required under TINYUNET_TEST_GPU=1), else the stand-in."""
    if _CUPY_SKIP is None:
        import cupy

        return cupy
    if REAL_GPU:
        pytest.fail(f"TINYUNET_TEST_GPU=1 but the GPU is not usable: {_CUPY_SKIP}")
    return cupy_standin.install(monkeypatch)


@pytest.fixture(params=["numpy", "cupy"])
def xp(request, monkeypatch):
    """The array module under test: NumPy, then CuPy (real on a GPU, else the stand-in)."""
    return np if request.param == "numpy" else cupy_under_test(monkeypatch)


@pytest.fixture
def gpu(monkeypatch):
    """What ``gpu=True`` runs on in this test: real CuPy on a GPU, else the stand-in."""
    return cupy_under_test(monkeypatch)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 synthetic training and 4 test images of 101 x 101 (split 19 + 5), generated once for every
    test file that trains on it; tests read it and never write into it."""
    from tinyunet.synth import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "set", n_train=24, n_test=4, seed=0)
