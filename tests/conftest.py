"""Shared fixtures: the array backends every engine test runs on."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import GPUUnavailableError, gpu_backend


def _cupy_reason() -> str | None:
    """None when CuPy and a CUDA device are usable, else why not."""
    try:
        gpu_backend()
    except GPUUnavailableError as err:
        return str(err)
    return None


_CUPY_SKIP = _cupy_reason()


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test: NumPy always, CuPy when a GPU is present."""
    if request.param == "numpy":
        return np
    if _CUPY_SKIP is not None:
        pytest.skip(f"CuPy backend not available: {_CUPY_SKIP}")
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
