"""The array module: NumPy always, CuPy when the GPU is asked for.

Every op starts with ``xp = get_array_module(x)`` and then writes ``xp.something``: the same line runs
on NumPy arrays on the CPU and on CuPy arrays on the GPU. There is no second copy of any op.

CuPy imports fine on a machine without a GPU and fails only at first use, so :func:`gpu_backend`
checks for a CUDA device up front and says which of the two (CuPy, a device) is missing.
"""

from __future__ import annotations

import numpy as np


class GPUUnavailableError(RuntimeError):
    """The GPU was asked for but cannot be used; the message says why and how to fix it."""


def _cupy_or_none():
    """CuPy if it is importable, else None (never imported unless the GPU is asked for)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def get_array_module(*arrays):
    """``numpy`` or ``cupy``: the module the arrays belong to (NumPy for plain Python values)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def gpu_backend():
    """Return the ``cupy`` module after checking that CuPy and a CUDA device are both usable.

    Raises :class:`GPUUnavailableError` naming what is missing: CuPy itself, or a CUDA device/driver.
    """
    cupy = _cupy_or_none()
    if cupy is None:
        raise GPUUnavailableError(
            "--gpu needs CuPy, which is not installed: pip install 'tinyunet[gpu]' "
            "(or the cupy-cudaXXx wheel matching your CUDA), or drop --gpu to run on the CPU"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device")
        cupy.zeros(1).sum().item()  # the first real use: a driver or toolkit mismatch shows up here
    except Exception as err:  # CuPy raises several CUDA error types; all mean "no usable device"
        raise GPUUnavailableError(
            f"--gpu needs a CUDA GPU, and CuPy found none it can use ({type(err).__name__}: {err}); "
            "check nvidia-smi and the CUDA driver, or drop --gpu to run on the CPU"
        ) from None
    return cupy


def get_backend(gpu: bool = False):
    """The array module to build a model on: NumPy, or CuPy (checked) when ``gpu`` is true."""
    return gpu_backend() if gpu else np


def as_numpy(a):
    """A NumPy array with the values of ``a`` (copies from the GPU when ``a`` is a CuPy array)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def as_array(a, xp):
    """``a`` as an array of module ``xp`` (moves it to the GPU when ``xp`` is CuPy)."""
    if xp is np:
        return as_numpy(a)
    return xp.asarray(a)


def make_rng(xp, seed):
    """A random generator of module ``xp`` (``numpy.random.Generator`` or CuPy's), seeded."""
    return xp.random.default_rng(seed)
