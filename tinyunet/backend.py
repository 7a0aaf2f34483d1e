"""The array module: NumPy always, CuPy when the GPU is asked for.

Every op starts with ``xp = get_array_module(x)`` and then writes ``xp.something``: the same line runs
on NumPy arrays on the CPU and on CuPy arrays on the GPU. There is no second copy of any op.

CuPy imports fine on a machine without a GPU and fails only at first use, so :func:`gpu_backend`
tries each part --gpu needs up front (a device, a compiled kernel, cuBLAS, cuRAND) and says which
is missing, before any data is read.
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


# pip installs these with CuPy: cupy-cuda12x[ctk] brings CUDA 12's libraries as wheels
CUDA_LIBRARIES = "pip install 'tinyunet[gpu]' (or install the CUDA Toolkit 12)"


def _device_parts(cupy):
    """(what --gpu needs, its cheapest use, the fix) for each part CuPy loads only when first used."""

    def device():
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")

    def kernel():  # an elementwise kernel, compiled at first use by NVRTC, then run
        (cupy.arange(4, dtype=cupy.float32) * 2).sum().item()

    def matmul():
        a = cupy.ones((4, 4), dtype=cupy.float32)
        (a @ a).sum().item()

    def draw():
        cupy.random.default_rng(0).random(4, dtype=cupy.float32).sum().item()

    return ((device, "a CUDA GPU, and CuPy found none it can use", "check nvidia-smi and the CUDA driver"),
            (kernel, "CuPy to compile and run a kernel (CUDA's NVRTC compiler and a driver for CUDA 12)",
             CUDA_LIBRARIES),
            (matmul, "cuBLAS, CUDA's matrix-product library", CUDA_LIBRARIES),
            (draw, "cuRAND, CUDA's random-number library (the dropout masks)", CUDA_LIBRARIES))


def gpu_backend():
    """Return the ``cupy`` module after checking that CuPy, a CUDA device and the CUDA libraries
    training uses (NVRTC, cuBLAS, cuRAND) all work.

    Raises :class:`GPUUnavailableError` naming what is missing and how to install it.
    """
    cupy = _cupy_or_none()
    if cupy is None:
        raise GPUUnavailableError(
            "--gpu needs CuPy, which is not installed: pip install 'tinyunet[gpu]' "
            "(or the cupy-cudaXXx wheel matching your CUDA), or drop --gpu to run on the CPU"
        )
    for use, need, fix in _device_parts(cupy):
        try:
            use()
        except Exception as err:  # CuPy raises CUDA errors, ImportError or OSError for a missing library
            raise GPUUnavailableError(f"--gpu needs {need} ({type(err).__name__}: {err}); {fix}, "
                                      "or drop --gpu to run on the CPU") from None
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


def map_batches(fn, x, batch_size: int, xp, dtype, progress=None):
    """``fn`` on ``x`` (N, ...) ``batch_size`` items at a time, each batch moved to ``xp`` as ``dtype``
    first; the results joined along the batch in one array (N, ...) on ``xp``.

    The one inference loop: UNet.predict, DataParallel's CPU pieces and the pipeline's probabilities.
    ``progress``, if given, is called with the number of items done after each batch.
    """
    out = None
    for start in range(0, max(len(x), 1), batch_size):  # an empty x: one empty batch
        part = fn(as_array(x[start:start + batch_size], xp).astype(dtype, copy=False))
        if progress is not None:
            progress(len(part))
        if out is None:
            out = xp.empty((len(x),) + part.shape[1:], dtype=part.dtype)
        out[start:start + batch_size] = part
    return out
