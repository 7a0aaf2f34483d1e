"""Checkpoints: one ``.npz`` of plain arrays plus JSON metadata, written atomically, read without pickle.

Layout of the file (an ordinary, uncompressed ``np.savez`` archive):

- ``param/<name>``  each model parameter (e.g. ``param/enc1.conv1.W``), float32 or float64;
- ``buffer/<name>``  each piece of state that is not trained (``buffer/enc1.bn1.moving_mean``), if any;
- ``adam_m/<name>``, ``adam_v/<name>``  the optimizer's moment estimates, when it has any;
- ``meta.json``  a uint8 array holding UTF-8 JSON::

      {"format": "tinyunet-checkpoint", "format_version": 1,
       "param_order": [names in forward order], "buffer_order": [names] (absent: no buffers),
       "optimizer": {"lr": ..., "beta_1": ..., "t": ..., "m": [names], "v": [names]} or null,
       "meta": {the caller's metadata: config, epoch, best threshold, history, ...}}

The metadata is written by Python's ``json``, which spells non-finite floats ``Infinity`` and
``NaN`` (a history with a diverged loss, a callback's initial best) and reads them back.

Writing is atomic (:func:`tinyunet.files.atomic_write`): a process killed at any moment leaves either
the old file or the new one, never a mix. Reading checks that the file starts like a zip archive, then
reads only the arrays ``meta.json`` lists, each with ``allow_pickle=False`` and only after its header
(shape x dtype) is within :data:`MAX_ARRAY_BYTES`: a file from elsewhere is data, never code. Every
failure is a :class:`CheckpointError` whose message is one line saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyunet.backend import as_numpy
from tinyunet.files import atomic_write

FORMAT = "tinyunet-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta.json"
PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"
MOMENT_PREFIXES = {"m": "adam_m/", "v": "adam_v/"}  # optimizer state key -> array name prefix

# What np.load and reading a member raise on a damaged archive (zlib: a compressed member).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_OURS = "pass a checkpoint saved by train.py"  # the fix when a file is not ours
_DAMAGED = "the file is damaged: use another checkpoint (an earlier copy) or train again"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (every .npz is one), an empty one
_NPY_MAGIC = b"\x93NUMPY"  # a single array saved by np.save

# What a checkpoint may make load_checkpoint read, checked from the headers before reading: a file from
# elsewhere is data, and a few kB claiming a huge array must cost nothing.
MAX_ARRAY_BYTES = 512 * 2**20  # one array; load_model's widest layer (3x3, 2048 -> 2048, float64) is 302 MB
MAX_TOTAL_BYTES = 4 * 2**30  # every listed array together (weights and both Adam moments)
MAX_META_BYTES = 32 * 2**20  # meta.json; a long run's history and sweeps are a few hundred kB
MAX_META_DEPTH = 32  # lists and objects nested in meta.json; train.py writes 5 levels


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says why and how to fix it."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path  # the file it was read from
    params: dict[str, np.ndarray]  # name -> array, in the saved (forward) order
    meta: dict[str, Any]  # the metadata given to save_checkpoint
    optimizer_state: dict[str, Any] | None  # as Adam.state_dict() returned it, or None
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # name -> array (BatchNorm statistics)


def _json_default(value: Any) -> Any:
    """Let NumPy scalars (np.float32, np.int64, np.bool_) into the JSON as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _host_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a NumPy array; object arrays are refused (they would need pickle to load)."""
    array = as_numpy(value)
    if array.dtype.hasobject:
        raise CheckpointError(f"cannot save {name!r}: it is an object array, which would need pickle to load")
    return array


def _collect(
    params: Mapping[str, Any], meta: Mapping[str, Any], optimizer_state: Mapping[str, Any] | None,
    buffers: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """All members of the archive, ``meta.json`` included, as NumPy arrays."""
    arrays = {PARAM_PREFIX + name: _host_array(name, value) for name, value in params.items()}
    arrays.update({BUFFER_PREFIX + name: _host_array(name, value) for name, value in buffers.items()})
    optimizer_doc = None
    if optimizer_state is not None:
        optimizer_doc = {k: v for k, v in optimizer_state.items() if k not in MOMENT_PREFIXES}
        for key, prefix in MOMENT_PREFIXES.items():
            moments = optimizer_state.get(key, {})
            optimizer_doc[key] = list(moments)
            arrays.update({prefix + name: _host_array(f"{key}[{name}]", v) for name, v in moments.items()})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "param_order": list(params),
        **({"buffer_order": list(buffers)} if buffers else {}),  # a seed U-Net's file stays as it was
        "optimizer": optimizer_doc,
        "meta": dict(meta),
    }
    try:
        text = json.dumps(doc, default=_json_default)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save the checkpoint metadata as JSON: {err}") from None
    arrays[META_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return arrays


def save_checkpoint(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    buffers: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``params`` (name -> NumPy/CuPy array, in order), ``meta``, the optimizer state and the
    model's ``buffers`` (state that is not trained, e.g. BatchNorm's moving statistics) to ``path``.

    ``meta`` must be JSON-able (NumPy scalars are accepted). ``optimizer_state`` is what
    ``Adam.state_dict()`` returns: its ``m`` and ``v`` dicts become arrays, the rest JSON. The write
    is atomic (see the module docstring); returns the path written.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a folder; give a file name such as best.npz")
    arrays = _collect(params, meta, optimizer_state, buffers or {})
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; check that {path.parent} "
                              "is a writable folder with free space, or choose another output folder") from None
    return path


def _corrupt(path: Path, err: Exception, where: str = "") -> CheckpointError:
    reason = " ".join(f"{where}{type(err).__name__}: {err}".split())  # one line, whatever numpy said
    return CheckpointError(f"{path} is not a readable .npz checkpoint (truncated or corrupt: {reason}); {_DAMAGED}")


def _open_archive(path: Path) -> zipfile.ZipFile:
    """The ``.npz`` at ``path`` as a zip archive, after checking that it starts like one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}; check its permissions") from None
    if head.startswith(_NPY_MAGIC):
        raise CheckpointError(f"{path} is a single .npy array, not a tinyunet checkpoint; {_OURS}")
    if not head.startswith(_ZIP_MAGIC):  # np.load would take it for a pickle: stop here
        raise CheckpointError(
            f"{path} is not a .npz checkpoint (empty, truncated to a few bytes, or another kind of file); "
            f"{_OURS}, or train again"
        )
    try:
        return zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise _corrupt(path, err) from None


class _Archive:
    """The members of an open ``.npz``, read one by one after their headers are checked."""

    def __init__(self, path: Path, archive: zipfile.ZipFile):
        self.path, self.archive = path, archive
        # member key (the name without .npy, as np.load names it) -> its zip entry
        self.entries = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}

    def header(self, key: str, limit: int) -> tuple[tuple[int, ...], np.dtype, int]:
        """``(shape, dtype, bytes)`` of member ``key`` from its .npy header alone; refused over ``limit`` bytes."""
        info = self.entries[key]
        if not info.filename.endswith(".npy"):  # a zip member that is not a .npy file
            raise CheckpointError(f"{self.path} is not a tinyunet checkpoint ({key!r} is not an array); {_OURS}")
        try:
            with self.archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                header_bytes = f.tell()
        except _READ_ERRORS as err:
            raise _corrupt(self.path, err, f"member {key!r}: ") from None
        if dtype.hasobject:
            raise CheckpointError(f"{self.path} holds an object array ({key!r}) that only pickle could load; "
                                  f"refused, because unpickling a file from elsewhere can run code; {_OURS}")
        if any(side < 0 for side in shape):
            raise _corrupt(self.path, ValueError(f"negative shape {shape}"), f"member {key!r}: ")
        size = math.prod(shape) * dtype.itemsize  # Python ints: a claimed (1e11,) cannot overflow
        if size > limit:
            raise CheckpointError(f"{self.path} holds an array {key!r} of shape {shape} ({dtype}, {size / 2**20:,.0f} "
                                  f"MiB), more than a tinyunet checkpoint holds ({limit / 2**20:,.0f} MiB at most): "
                                  f"refused unread; {_OURS}")
        if info.file_size != header_bytes + size:
            raise _corrupt(self.path, ValueError(f"the zip declares {info.file_size} bytes, its header "
                                                 f"{header_bytes + size}"), f"member {key!r}: ")
        return shape, dtype, size

    def read(self, key: str) -> np.ndarray:
        """Member ``key`` (its header already checked by :meth:`header`), read with ``allow_pickle=False``."""
        try:
            with self.archive.open(self.entries[key]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except _READ_ERRORS as err:
            raise _corrupt(self.path, err, f"member {key!r}: ") from None


def _nesting(doc: Any) -> int:
    """How deep lists and objects nest in a parsed JSON document (walked without recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack and deepest <= MAX_META_DEPTH:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest


def _parse_meta(path: Path, archive: _Archive) -> dict[str, Any]:
    """The JSON document of ``meta.json``, checked to be a tinyunet checkpoint this version can read."""
    not_ours = f"{path} is a .npz file but not a tinyunet checkpoint"
    if META_KEY not in archive.entries:
        raise CheckpointError(f"{not_ours} (it has no {META_KEY}); {_OURS}")
    shape, dtype, _ = archive.header(META_KEY, MAX_META_BYTES)
    try:
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(f"a {dtype} array of shape {shape}, not bytes")
        doc = json.loads(archive.read(META_KEY).tobytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{not_ours} (its {META_KEY} is not JSON: {err}); {_OURS}") from None
    except RecursionError:
        doc = None  # nested deeper than the parser goes: refused below like any deep document
    if doc is None or _nesting(doc) > MAX_META_DEPTH:
        raise CheckpointError(f"{not_ours} (its {META_KEY} nests lists or objects more than {MAX_META_DEPTH} "
                              f"deep); {_OURS}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f'{not_ours} (its {META_KEY} lacks "format": "{FORMAT}"); {_OURS}')
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}; {_DAMAGED}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version}, newer than this tinyunet reads "
            f"({FORMAT_VERSION}); upgrade tinyunet to load it"
        )
    for key, kind in (("param_order", list), ("meta", dict)):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(f"{path} has no valid {key!r} in its {META_KEY}; {_DAMAGED}")
    return doc


def _listed(path: Path, archive: _Archive, prefix: str, names: object, what: str) -> list[str]:
    """The member keys ``prefix + name`` of ``names``; every listed array must be there."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{path} has no valid list of {what} in its {META_KEY}; {_DAMAGED}")
    missing = [name for name in names if prefix + name not in archive.entries]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{path} is incomplete: {what} {shown} listed in its {META_KEY} are missing; {_DAMAGED}")
    return [prefix + name for name in names]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem is a one-line CheckpointError.

    Only the arrays its ``meta.json`` lists are read, each after its header is checked against
    :data:`MAX_ARRAY_BYTES` (and all of them against :data:`MAX_TOTAL_BYTES`), so a small file that
    claims a huge array costs nothing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (a run folder holds best.npz)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .npz file inside it")
    with _open_archive(path) as zipped:
        archive = _Archive(path, zipped)
        doc = _parse_meta(path, archive)
        groups = {"params": (PARAM_PREFIX, _listed(path, archive, PARAM_PREFIX, doc["param_order"], "parameters")),
                  "buffers": (BUFFER_PREFIX, _listed(path, archive, BUFFER_PREFIX, doc.get("buffer_order", []),
                                                     "buffers"))}
        optimizer_state = doc.get("optimizer")
        if optimizer_state is not None:
            if not isinstance(optimizer_state, dict):
                raise CheckpointError(f"{path} has an invalid optimizer state in its {META_KEY}; {_DAMAGED}")
            for key, prefix in MOMENT_PREFIXES.items():
                groups[key] = (prefix, _listed(path, archive, prefix, optimizer_state.get(key),
                                               f"optimizer {key} arrays"))
        keys = {key for _, listed in groups.values() for key in listed}
        total = sum(archive.header(key, MAX_ARRAY_BYTES)[2] for key in keys)
        if total > MAX_TOTAL_BYTES:
            raise CheckpointError(f"{path} lists arrays of {total / 2**30:,.1f} GiB in all, more than a tinyunet "
                                  f"checkpoint holds ({MAX_TOTAL_BYTES / 2**30:,.0f} GiB at most): refused unread; "
                                  f"{_OURS}")
        arrays = {name: {key[len(prefix):]: archive.read(key) for key in listed}
                  for name, (prefix, listed) in groups.items()}
    if optimizer_state is not None:
        optimizer_state.update(m=arrays["m"], v=arrays["v"])
    return Checkpoint(path=path, params=arrays["params"], meta=doc["meta"], optimizer_state=optimizer_state,
                      buffers=arrays["buffers"])


def _describe(config: Mapping[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{key}={config.get(key, '?')}" for key in keys)


def _first_difference(saved: list[tuple[str, tuple]], wanted: list[tuple[str, tuple]]) -> str:
    """Where two ``(name, shape)`` lists part, in words."""
    for i, ((s_name, s_shape), (w_name, w_shape)) in enumerate(zip(saved, wanted)):
        if s_name == w_name and s_shape != w_shape:
            return f"first difference: {s_name} is {s_shape} in the checkpoint, {w_shape} in the model"
        if s_name != w_name:
            return (
                f"first difference: parameter {i} is {s_name} {s_shape} in the checkpoint, "
                f"{w_name} {w_shape} in the model"
            )
    return f"the checkpoint has {len(saved)} parameters, the model {len(wanted)}"


def check_compatible(
    checkpoint: Checkpoint,
    expected_shapes: Mapping[str, tuple[int, ...]],
    model_config: Mapping[str, Any],
) -> None:
    """Raise CheckpointError unless the checkpoint has exactly the model's parameter names and shapes.

    ``expected_shapes`` is the model's ``{name: shape}`` in forward order; ``model_config`` holds the
    settings that decide them (e.g. ``{"features": 8, "depth": 4}``). The message names both
    configurations (the checkpoint's from ``meta["model"]``, for the same keys) and the first
    parameter that differs.
    """
    saved = [(name, tuple(a.shape)) for name, a in checkpoint.params.items()]
    wanted = [(name, tuple(shape)) for name, shape in expected_shapes.items()]
    if saved == wanted:
        return
    keys = list(model_config)
    saved_config = checkpoint.meta.get("model")
    saved_text = _describe(saved_config, keys) if isinstance(saved_config, Mapping) else "no recorded config"
    if saved_text == _describe(model_config, keys):  # the model was built from this file's own settings
        raise CheckpointError(
            f"{checkpoint.path} does not fit its own model settings ({saved_text}): "
            f"{_first_difference(saved, wanted)}; the file is damaged or was edited: use another checkpoint "
            "or train again")
    raise CheckpointError(
        f"checkpoint {checkpoint.path} does not fit this model: checkpoint has {saved_text}; this model has "
        f"{_describe(model_config, keys)} ({_first_difference(saved, wanted)}); "
        "build the model with the checkpoint's settings, or train a new one"
    )
