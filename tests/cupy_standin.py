"""A stand-in for CuPy on machines without a GPU: NumPy underneath, only CuPy's API on top.

    cupy = install(monkeypatch)                      # sys.modules["cupy"] until the test ends
    cupy = install(monkeypatch, promotion="weak")    # CuPy 14's promotion rules instead of CuPy 13's

tinyunet's GPU path (``gpu=True``, ``--gpu``) then runs unchanged, every array a stand-in
``cupy.ndarray`` that holds a NumPy array and lets it out only the ways CuPy does. It catches, as a
real GPU would:

* **host/device mixing**: an operator, ufunc or function given a NumPy array beside a device array,
  or an ``out=`` that is a NumPy array, raises TypeError, as CuPy's "Unsupported type" does;
* **implicit conversion**: ``np.asarray(device_array)`` and everything else that calls ``__array__``
  raises TypeError; only ``.get()`` / ``cupy.asnumpy`` copy to the host, ``cupy.asarray`` to the device;
* **a missing .get()**: reductions and integer indexing give 0-d device arrays, as on CuPy, not numbers;
* **names CuPy lacks**: the module, ``ndarray``, ``random.Generator`` and ``cuda`` offer only names that
  real CuPy has (``test_gpu_standin`` checks them against CuPy itself wherever CuPy is importable, which
  it is without a GPU), so a NumPy-only function or method is an AttributeError here too;
* **promotion**: ``"legacy"`` (the default) applies NumPy 1.x's value-based casting to Python and NumPy
  scalars beside device arrays, as CuPy 13 does (a float32 array divided by an int above 65535 becomes
  float64); ``"weak"`` applies NEP 50, as CuPy 14 and NumPy 2 do. 0-d device arrays count by dtype alone
  under both, as on CuPy. Both need NumPy 2 underneath: NumPy 1.x casts by value itself, whatever the mode;
* **the GPU-only branches** of tinyunet: one shard, whole-shard inference, host syncs every
  ``GPU_SYNC_EVERY`` steps, the backend's device checks.

With ``host_reads=False`` (see :func:`refuse_host_reads`) even the reads CuPy allows, ``float()``,
``int()``, ``bool()``, ``.item()``, ``.tolist()``, ``.get()`` and ``asnumpy``, raise :class:`HostRead`:
on a GPU each is a copy and a wait, so a training step must make none.

What it cannot catch: anything only a device shows. Kernels that fail to compile or launch, missing
CUDA libraries (cuBLAS, cuRAND, NVRTC), device memory, speed; asynchrony (every call here finishes
before it returns, so a timer read without ``synchronize()`` looks right); numbers (it computes what
NumPy computes, while cuBLAS sums in another order); CuPy's random streams (a NumPy Philox stream
here, unlike both NumPy's and CuPy's); and CuPy functions that exist but take fewer arguments or
argument forms than NumPy's (the stand-in passes them on to NumPy). Where it is unsure what CuPy
accepts it refuses: indexing with a NumPy array, assigning a NumPy array into a device array.
"""

from __future__ import annotations

import sys
import types

import numpy as np

PYTHON_SCALARS = (bool, int, float, complex)
UNSUPPORTED = "Unsupported type {}"  # CuPy's message for a NumPy array among device operands
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
            "NumPy array explicitly.")  # CuPy's message, word for word
_KIND_ORDER = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3}  # NumPy 1.x's categories for value-based casting
_STATE = {"promotion": "legacy", "host_reads": True}


class HostRead(AssertionError):
    """A device value was read on the host while :func:`refuse_host_reads` was in force."""


def _host_read(what: str) -> None:
    if not _STATE["host_reads"]:
        raise HostRead(f"{what} copies a device array to the host")


# ------------------------------------------------------------------------------------------------
# Operands in, results out
# ------------------------------------------------------------------------------------------------

def _wrap(value):
    """NumPy results as device arrays: arrays, NumPy scalars (CuPy keeps 0-d arrays) and tuples of them."""
    if isinstance(value, np.ndarray):
        return ndarray._of(value)
    if isinstance(value, (np.generic, bool)):
        return ndarray._of(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def _operand(value):
    """The NumPy value behind a ufunc operand; a NumPy array (or a list) is refused, as by CuPy."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, PYTHON_SCALARS + (np.generic,)):
        return value
    raise TypeError(UNSUPPORTED.format(type(value)))


def _argument(value):
    """The NumPy value behind a function argument: device arrays unwrapped (inside lists and tuples
    too), NumPy arrays refused, anything else (shapes, axes, dtypes, modes) passed on."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        raise TypeError(UNSUPPORTED.format(type(value)))
    if isinstance(value, (list, tuple)):
        return type(value)(_argument(v) for v in value)
    return value


def _promote(values: list) -> list:
    """Under "legacy", NumPy 1.x's value-based casting: a scalar whose kind is not above every array's
    counts only as the smallest dtype that holds its value (np.min_scalar_type) when the loop's dtype
    is chosen, and is then cast to that dtype; under "weak" NumPy 2 itself applies NEP 50 (Python
    scalars adapt, NumPy scalars keep their dtype)."""
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    if _STATE["promotion"] == "weak" or not arrays or len(arrays) == len(values):
        return values
    top = max(_KIND_ORDER[a.dtype.kind] for a in arrays)
    counted = []
    for v in values:
        if not isinstance(v, np.ndarray):
            own = np.asarray(v).dtype  # a Python int is int64, a float float64; a NumPy scalar its own
            counted.append(np.min_scalar_type(v) if _KIND_ORDER[own.kind] <= top else own)
    loop = np.result_type(*(a.dtype for a in arrays), *counted)
    return [v if isinstance(v, np.ndarray) else np.asarray(v, loop) for v in values]


def _elementwise(fn, *args, out=None, **kwargs):
    """``fn`` (a NumPy ufunc, ``np.where``, ``np.clip``) on device operands, CuPy's promotion applied."""
    values = [_operand(a) for a in args]
    if "dtype" not in kwargs:
        values = _promote(values)
    if out is None:
        return _wrap(fn(*values, **kwargs))
    if not isinstance(out, ndarray):
        raise TypeError(UNSUPPORTED.format(type(out)))
    fn(*values, out=out._a, **kwargs)
    return out


class ufunc:
    """A CuPy ufunc: called on device arrays and scalars only."""

    def __init__(self, np_ufunc):
        self._np = np_ufunc
        self.__name__ = np_ufunc.__name__

    def __call__(self, *args, out=None, **kwargs):
        return _elementwise(self._np, *args, out=out, **kwargs)

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


# ------------------------------------------------------------------------------------------------
# cupy.ndarray
# ------------------------------------------------------------------------------------------------

def _binary(np_ufunc):
    """``a op b``, ``b op a`` and ``a op= b`` through the ufunc."""
    return (lambda self, other: _elementwise(np_ufunc, self, other),
            lambda self, other: _elementwise(np_ufunc, other, self),
            lambda self, other: _elementwise(np_ufunc, self, other, out=self))


def _method(name):
    def method(self, *args, **kwargs):
        return _wrap(getattr(self._a, name)(*_argument(args), **{k: _argument(v) for k, v in kwargs.items()}))

    method.__name__ = name
    return method


class ndarray:
    """A device array: a NumPy array that leaves only through ``.get()`` / ``cupy.asnumpy``."""

    __module__ = "cupy"  # what tinyunet.backend.get_array_module looks at
    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, shape, dtype=float, order="C"):
        self._a = np.empty(shape, dtype, order)

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    # --- what CuPy refuses ---

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, np_ufunc, method, *inputs, out=None, **kwargs):
        if method != "__call__":
            return NotImplemented
        return _elementwise(np_ufunc, *inputs, out=out[0] if out else None, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        ours = _FUNCTIONS.get(func.__name__)  # CuPy dispatches np.f(device arrays) to cupy.f
        return NotImplemented if ours is None else ours(*args, **kwargs)

    # --- to the host, as CuPy allows ---

    def get(self, stream=None, order="C", out=None, blocking=True):
        _host_read(".get()")
        return self._a.copy(order=order)

    def item(self, *args):
        _host_read(".item()")
        return self._a.item(*args)

    def tolist(self):
        _host_read(".tolist()")
        return self._a.tolist()

    def __float__(self):
        _host_read("float()")
        return float(self._a)

    def __int__(self):
        _host_read("int()")
        return int(self._a)

    def __bool__(self):
        _host_read("bool()")
        return bool(self._a)

    def __complex__(self):
        _host_read("complex()")
        return complex(self._a)

    def __repr__(self):
        return f"cupy-standin {self._a!r}"

    # --- shape and layout ---

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray._of(row) for row in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_argument(key)])

    def __setitem__(self, key, value):
        self._a[_argument(key)] = _operand(value)

    (all, any, argmax, argmin, astype, clip, copy, cumsum, fill, flatten, max, mean, min, nonzero, prod,
     ravel, repeat, reshape, round, squeeze, std, sum, swapaxes, take, transpose, var) = map(_method, (
        "all", "any", "argmax", "argmin", "astype", "clip", "copy", "cumsum", "fill", "flatten", "max",
        "mean", "min", "nonzero", "prod", "ravel", "repeat", "reshape", "round", "squeeze", "std", "sum",
        "swapaxes", "take", "transpose", "var"))

    # --- operators: CuPy's ufuncs ---

    __add__, __radd__, __iadd__ = _binary(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply)
    __truediv__, __rtruediv__, __itruediv__ = _binary(np.true_divide)
    __floordiv__, __rfloordiv__, __ifloordiv__ = _binary(np.floor_divide)
    __mod__, __rmod__, __imod__ = _binary(np.remainder)
    __pow__, __rpow__, __ipow__ = _binary(np.power)
    __and__, __rand__, __iand__ = _binary(np.bitwise_and)
    __or__, __ror__, __ior__ = _binary(np.bitwise_or)
    __xor__, __rxor__, __ixor__ = _binary(np.bitwise_xor)
    __matmul__, __rmatmul__, _ = _binary(np.matmul)  # CuPy has no in-place @=
    __eq__ = _binary(np.equal)[0]
    __ne__ = _binary(np.not_equal)[0]
    __lt__ = _binary(np.less)[0]
    __le__ = _binary(np.less_equal)[0]
    __gt__ = _binary(np.greater)[0]
    __ge__ = _binary(np.greater_equal)[0]
    __neg__ = lambda self: _elementwise(np.negative, self)  # noqa: E731
    __pos__ = lambda self: _elementwise(np.positive, self)  # noqa: E731
    __abs__ = lambda self: _elementwise(np.absolute, self)  # noqa: E731
    __invert__ = lambda self: _elementwise(np.invert, self)  # noqa: E731
    del _


# ------------------------------------------------------------------------------------------------
# The module's functions
# ------------------------------------------------------------------------------------------------

UFUNCS = ("absolute", "add", "bitwise_and", "bitwise_or", "ceil", "divide", "equal", "exp", "floor",
          "floor_divide", "greater", "greater_equal", "invert", "isfinite", "isinf", "isnan", "less",
          "less_equal", "log", "log1p", "logical_and", "logical_not", "logical_or", "matmul", "maximum",
          "minimum", "multiply", "negative", "not_equal", "power", "sign", "sqrt", "square", "subtract",
          "tanh", "true_divide")
ON_DEVICE_ARRAYS = ("all", "allclose", "any", "argmax", "argsort", "around", "array_equal", "bincount",
                    "broadcast_to", "concatenate", "count_nonzero", "cumsum", "expand_dims", "flatnonzero",
                    "flip", "isin", "mean", "nonzero", "pad", "ravel", "reshape", "round", "searchsorted",
                    "sort", "squeeze", "stack", "sum", "take", "take_along_axis", "put_along_axis", "tile",
                    "transpose", "unique")
CREATE = ("arange", "empty", "full", "linspace", "ones", "zeros")
LIKE = ("empty_like", "full_like", "ones_like", "zeros_like")
FROM_NUMPY = ("bool_", "complex64", "complex128", "dtype", "finfo", "float16", "float32", "float64", "iinfo",
              "inf", "int8", "int16", "int32", "int64", "issubdtype", "min_scalar_type", "nan", "newaxis",
              "pi", "promote_types", "uint8", "uint16", "uint32", "uint64")


def _on_device(np_fn):
    def fn(*args, **kwargs):
        return _wrap(np_fn(*_argument(args), **{k: _argument(v) for k, v in kwargs.items()}))

    fn.__name__ = np_fn.__name__
    return fn


def _like(np_fn):
    def fn(a, *args, **kwargs):
        if not isinstance(a, ndarray):
            raise TypeError(UNSUPPORTED.format(type(a)))
        return _wrap(np_fn(a._a, *args, **kwargs))

    fn.__name__ = np_fn.__name__
    return fn


def asarray(a, dtype=None, order=None, *, blocking=False):
    """The device copy of ``a`` (a NumPy array, list or scalar); a device array stays itself."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray._of(np.array(a, dtype=dtype, order=order or "K"))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    return ndarray._of(np.array(obj._a if isinstance(obj, ndarray) else obj, dtype=dtype, copy=True,
                                order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got {type(a).__name__})")
    return ndarray._of(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        _host_read("cupy.asnumpy")
        return a._a.copy(order=order)
    return np.asarray(a, order=order)


def result_type(*arrays_and_dtypes):
    """CuPy's: device arrays count by dtype alone."""
    return np.result_type(*(a.dtype if isinstance(a, ndarray) else a for a in arrays_and_dtypes))


def where(condition, x, y):
    return _elementwise(np.where, condition, x, y)


def clip(a, a_min, a_max, out=None):
    return _elementwise(np.clip, a, a_min, a_max, out=out)


def copy(a, order="K"):
    return _like(np.copy)(a, order=order)


_FUNCTIONS = {
    **{name: ufunc(getattr(np, name)) for name in UFUNCS},
    "abs": ufunc(np.absolute),
    **{name: _on_device(getattr(np, name)) for name in ON_DEVICE_ARRAYS},
    **{name: _on_device(getattr(np, name)) for name in CREATE},
    **{name: _like(getattr(np, name)) for name in LIKE},
    **{fn.__name__: fn for fn in (asarray, array, ascontiguousarray, asnumpy, result_type, where, clip, copy)},
}


# ------------------------------------------------------------------------------------------------
# cupy.random and cupy.cuda
# ------------------------------------------------------------------------------------------------

class XORWOW:
    """The bit generator ``default_rng`` uses (CuPy's name; underneath, NumPy's Philox)."""

    def __init__(self, seed=None, *, size=-1):
        self._np = np.random.Generator(np.random.Philox(seed))


class Generator:
    """CuPy's ``random.Generator``, with the few of its methods tinyunet may call (CuPy has more)."""

    def __init__(self, bit_generator):
        self.bit_generator = bit_generator

    def random(self, size=None, dtype=np.float64, out=None):
        values = self.bit_generator._np.random(size, dtype=np.float32 if np.dtype(dtype) == np.float32
                                               else np.float64)
        return _wrap(np.asarray(values))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        """As CuPy draws them: 32 (or 64) random bits, then a second pass adding ``low`` into ``dtype``."""
        low, high = (0, low) if high is None else (low, high)
        diff = int(high) - int(low) - (0 if endpoint else 1)
        bits = np.uint32 if diff <= 0xFFFFFFFF else np.uint64
        drawn = self.bit_generator._np.integers(0, diff, size=size, dtype=bits, endpoint=True)
        return _wrap(np.add(int(low), np.asarray(drawn), dtype=dtype))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return _wrap(np.asarray(self.bit_generator._np.uniform(low, high, size)).astype(dtype))

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return _wrap(np.asarray(self.bit_generator._np.standard_normal(size, dtype=np.dtype(dtype).type)))


def default_rng(seed=None):
    return Generator(XORWOW(seed))


class Device:
    """``cupy.cuda.Device``: device 0 of one."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    compute_capability = "90"

    def synchronize(self) -> None:
        """Nothing to wait for: every stand-in call has finished when it returns."""

    def use(self) -> None:
        pass


def _runtime() -> types.ModuleType:
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.runtimeGetVersion = lambda: 12080
    runtime.driverGetVersion = lambda: 12080
    runtime.getDeviceProperties = lambda device: {"name": b"CuPy stand-in (NumPy)", "multiProcessorCount": 1,
                                                  "totalGlobalMem": 2 ** 30, "major": 9, "minor": 0}
    return runtime


# ------------------------------------------------------------------------------------------------
# Installing it
# ------------------------------------------------------------------------------------------------

def build(promotion: str = "legacy") -> types.ModuleType:
    """A fresh ``cupy`` module (with ``cupy.random``, ``cupy.cuda``, ``cupy.cuda.runtime``)."""
    if promotion not in ("legacy", "weak"):
        raise ValueError(f"promotion must be 'legacy' (CuPy 13) or 'weak' (CuPy 14), got {promotion!r}")
    _STATE.update(promotion=promotion, host_reads=True)
    cupy = types.ModuleType("cupy", "A NumPy-backed stand-in for CuPy (tests/cupy_standin.py)")
    cupy.__version__ = "0+numpy-standin"
    cupy.ndarray, cupy.ufunc = ndarray, ufunc
    for name, fn in _FUNCTIONS.items():
        setattr(cupy, name, fn)
    for name in FROM_NUMPY:
        setattr(cupy, name, getattr(np, name))
    cupy.random = types.ModuleType("cupy.random")
    cupy.random.default_rng, cupy.random.Generator, cupy.random.XORWOW = default_rng, Generator, XORWOW
    cupy.cuda = types.ModuleType("cupy.cuda")
    cupy.cuda.Device, cupy.cuda.runtime = Device, _runtime()
    cupy.cuda.is_available = lambda: True
    return cupy


def install(monkeypatch, promotion: str = "legacy") -> types.ModuleType:
    """Make ``import cupy`` give a fresh stand-in for the rest of the test; returns it."""
    cupy = build(promotion)
    for name, module in (("cupy", cupy), ("cupy.random", cupy.random), ("cupy.cuda", cupy.cuda),
                         ("cupy.cuda.runtime", cupy.cuda.runtime)):
        monkeypatch.setitem(sys.modules, name, module)
    return cupy


def refuse_host_reads(monkeypatch) -> None:
    """From now on (until the test ends) every device-to-host read raises :class:`HostRead`."""
    monkeypatch.setitem(_STATE, "host_reads", False)
