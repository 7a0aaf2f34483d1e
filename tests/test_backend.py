"""The backend: NumPy by default, and a clear error when the GPU cannot be used."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import cupy_standin
from tinyunet import backend
from tinyunet.backend import GPUUnavailableError, as_array, as_numpy, get_array_module, get_backend


def test_numpy_by_default():
    assert get_backend() is np
    assert get_backend(gpu=False) is np
    assert get_array_module(np.zeros(2)) is np
    assert get_array_module(1.0, [1, 2]) is np
    a = np.arange(3)
    assert as_numpy(a) is a and as_array(a, np) is a


def test_gpu_without_cupy_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(GPUUnavailableError, match="needs CuPy, which is not installed.*pip install"):
        get_backend(gpu=True)


def test_gpu_with_cupy_but_no_device_says_so(monkeypatch):
    """CuPy imports fine without a GPU and fails at first use: the backend checks up front."""

    class CUDARuntimeError(RuntimeError):
        pass

    def no_device():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setattr(backend, "_cupy_or_none", lambda: fake)
    with pytest.raises(GPUUnavailableError, match="needs a CUDA GPU.*no CUDA-capable device"):
        get_backend(gpu=True)


def test_gpu_with_zero_devices(monkeypatch):
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 0)))
    monkeypatch.setattr(backend, "_cupy_or_none", lambda: fake)
    with pytest.raises(GPUUnavailableError, match="no CUDA device"):
        get_backend(gpu=True)


def test_gpu_backend_passes_on_a_working_cupy(monkeypatch):
    cupy = cupy_standin.install(monkeypatch)
    assert get_backend(gpu=True) is cupy


@pytest.mark.parametrize("part, library", [("kernel", "NVRTC"), ("matmul", "cuBLAS"), ("draw", "cuRAND")])
def test_gpu_with_a_cuda_library_missing_names_it(monkeypatch, part, library):
    """A machine with only the driver: CuPy imports and finds the device, then a library fails to load."""
    cupy = cupy_standin.install(monkeypatch)

    def missing(*args, **kwargs):
        raise ImportError(f"lib{library.lower()}.so.12: cannot open shared object file: No such file or directory")

    where, name = {"kernel": (cupy, "arange"), "matmul": (cupy_standin.ndarray, "__matmul__"),
                   "draw": (cupy.random, "default_rng")}[part]
    monkeypatch.setattr(where, name, missing)
    with pytest.raises(GPUUnavailableError, match=rf"--gpu needs .*{library}.*ImportError.*"
                                                  r"pip install 'tinyunet\[gpu\]'.*or drop --gpu"):
        get_backend(gpu=True)
