"""Reading Kaggle's layout (a folder or a zip): images, masks, ids; coverage and the stratified splits.

The TGS Salt data comes in Kaggle's layout::

    train/images/<id>.png   train/masks/<id>.png   train.csv (id,rle_mask)   depths.csv (id,z)
    test/images/<id>.png

or as the competition's download, ``tgs-salt-identification-challenge.zip``, which holds ``train.zip``
(``images/``, ``masks/``), ``test.zip`` (``images/``) and the CSVs. :func:`load_train` and
:func:`load_test` read either form, and a zip of the folder layout, straight from the zip in memory.

An image file is anything Pillow reads (gray or RGB; alpha is transparency and dropped) or a NumPy ``.npy``
array (H, W) or (H, W, C) of any channel count up to :data:`MAX_CHANNELS`, read without unpickling.

The array work after reading (resize, pad and crop, flips, batches) is :mod:`tinyunet.transforms`.

Notation: N images, H x W pixels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import stat
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from tinyunet.backend import as_numpy, get_array_module
from tinyunet.transforms import MAX_CHANNELS, as_stack, luma

LAYOUT_HINT = (
    "expected Kaggle's layout (train/images/<id>.png, train/masks/<id>.png, train.csv, "
    "test/images/<id>.png), the competition's zip (train.zip, test.zip, train.csv), or a plain "
    "DATA/images/ + DATA/masks/ pair matched by file name (and optionally DATA/test/)"
)
# What one file of the data may make the reader allocate, checked before reading or decoding it.
MAX_FILE_BYTES = 256 * 2**20  # one file on disk or in a zip (its declared size); train.csv of Kaggle's set is 4 MB
MAX_PIXELS = 2**25  # one image: 33.5 Mpx (5792 x 5792), far below Pillow's 179 Mpx
MAX_CSV_FIELD = 2**26  # one CSV field (a run-length string): a noisy mask of 10 Mpx fits; csv's default 128 kB does not
csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")  # Pillow's formats, NumPy's; any case
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every file numpy.save writes

# What PIL raises on a corrupt or truncated PNG (it has no single exception type for it).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)

# The largest value of each PNG mode PIL can return, by which pixels are scaled to [0, 1].
_FULL_SCALE = {"1": 1, "L": 255, "LA": 255, "P": 255, "PA": 255, "RGB": 255, "RGBA": 255,
               "I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535}


# The largest value of each .npy dtype tinyunet reads, keyed by (kind, itemsize) so either byte order fits:
# integers are scaled by their full range as PNGs are, floats must already lie in [0, 1].
_NPY_FULL_SCALE = {("b", 1): 1, ("u", 1): 255, ("u", 2): 65535, ("f", 2): 1, ("f", 4): 1, ("f", 8): 1}


class DataError(ValueError):
    """Bad input data; the message is one line saying what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------
# Ids and values
# --------------------------------------------------------------------------------------------

def check_id(image_id: str, where: str) -> str:
    """Return ``image_id`` if it is a plain file name (no folders, no ``..``), else raise DataError."""
    bad = (not image_id or image_id in (".", "..") or ".." in image_id
           or any(ch in image_id for ch in "/\\:\0") or not image_id.isprintable())
    if bad:
        raise DataError(f"id {image_id!r} in {where} is not a plain file name: ids name files "
                        "inside the data folder and may not hold '/', '\\', ':' or '..'")
    return image_id


def check_finite(array, what: str) -> None:
    """Raise DataError if ``array`` (NumPy or CuPy) holds NaN or infinite values."""
    xp = get_array_module(array)
    bad = ~xp.isfinite(array)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in np.unravel_index(int(xp.argmax(bad.ravel())), array.shape))
        raise DataError(f"{what} has {count} NaN or infinite values (the first at index {first}): "
                        "fix or drop those inputs")


# --------------------------------------------------------------------------------------------
# Image files -> arrays
# --------------------------------------------------------------------------------------------

class _Decoded(NamedTuple):
    """An image file's values before scaling, and how it was read."""

    raw: np.ndarray  # (H, W) or (H, W, C) float32 in 0..full
    full: int  # the full-scale value: 1, 255 or 65535
    how: str  # how it was read, for messages: "PIL mode 'L'", "a uint16 .npy array"
    name: str  # the file, in messages
    npy: bool  # an .npy array: its channels are data, never merged or converted


def _undecodable(name: str, err: Exception) -> DataError:
    return DataError(f"cannot decode {name} ({err}): the file is corrupt or truncated; re-download it or remove it")


def _check_pixels(name: str, h: int, w: int) -> None:
    """DataError when an image of H x W, known from its header, is larger than :data:`MAX_PIXELS`."""
    if h * w > MAX_PIXELS:
        raise DataError(f"{name} is {w}x{h} pixels, more than tinyunet reads ({MAX_PIXELS:,} px): "
                        "cut it into smaller images")


def _is_npy(data: bytes, name: str) -> bool:
    """An .npy file, by its first bytes (numpy.save's magic string) or its name."""
    return data.startswith(NPY_MAGIC) or name.lower().endswith(".npy")


def _npy_header(data: bytes, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of an .npy file's bytes, from its header alone (no array is made), checked: (H, W)
    or (H, W, C) with 1 <= C <= :data:`MAX_CHANNELS`, H * W <= :data:`MAX_PIXELS`, a dtype tinyunet scales
    and the data bytes the header declares. DataError (one line) otherwise, and for a pickle."""
    if data[:1] == b"\x80":  # pickle protocol 2 and later start with PROTO: not numpy.save's output
        raise DataError(f"{name} is a Python pickle, not an .npy array: tinyunet never unpickles data (a pickle "
                        "can run code); save the array with numpy.save")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)  # 2.0 and 3.0: a 4-byte header length
        shape, _, dtype = read_header(fp)  # (shape, fortran_order, dtype)
    except (ValueError, TypeError, SyntaxError) as err:
        raise DataError(f"cannot read {name} as an .npy array ({err}): the file is corrupt or was not written "
                        "by numpy.save") from None
    if dtype.hasobject:
        raise DataError(f"{name} holds Python objects (dtype {dtype}), which load only by unpickling, and "
                        "tinyunet never unpickles data: save a numeric array (uint8, uint16 or float32)")
    if (dtype.kind, dtype.itemsize) not in _NPY_FULL_SCALE:
        raise DataError(f"{name} has dtype {dtype}, which tinyunet does not read: save bool, uint8 or uint16 "
                        "(scaled by 1, 255 or 65535) or float16/32/64 values in [0, 1]")
    if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= MAX_CHANNELS):
        raise DataError(f"{name} has shape {shape}: an .npy image is (H, W) or (H, W, C) with 1 to {MAX_CHANNELS} "
                        "channels, channels last (for a (C, H, W) array a, save np.moveaxis(a, 0, -1))")
    h, w = shape[:2]
    if h * w == 0:
        raise DataError(f"{name} has shape {shape}, no pixels: remove it from the data")
    _check_pixels(name, h, w)
    have, declared = len(data) - fp.tell(), math.prod(shape) * dtype.itemsize  # data bytes after the header
    if have < declared:
        raise DataError(f"{name} holds {have:,} bytes of data where its header declares {declared:,}: the file "
                        "is truncated; re-download it or remove it")
    return shape, dtype


def _check_unit_range(array: np.ndarray, name: str) -> None:
    """DataError unless a float image holds finite values in [0, 1] (floats are taken as already scaled)."""
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise DataError(f"{name} holds {bad} NaN or infinite values: replace them (e.g. np.nan_to_num) and scale "
                        "the values to [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise DataError(f"{name} holds float values in [{low:g}, {high:g}], outside [0, 1], and tinyunet takes "
                        "float images as already scaled: scale them to [0, 1] (e.g. (a - a.min()) / "
                        "(a.max() - a.min())) or save integers (uint8, uint16)")


def _decode_npy(data: bytes, name: str) -> _Decoded:
    """An .npy image's values: (H, W) for an (H, W) or (H, W, 1) array, else (H, W, C); its header is checked
    before the array is made, and a float array must hold finite values in [0, 1]."""
    shape, dtype = _npy_header(data, name)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)  # (H, W) or (H, W, C)
    except (ValueError, OSError, EOFError) as err:
        raise _undecodable(name, err) from None
    if dtype.kind == "f":
        _check_unit_range(array, name)
    raw = array.astype(np.float32)
    raw = raw[..., 0] if raw.ndim == 3 and raw.shape[2] == 1 else raw  # one channel: gray (H, W)
    return _Decoded(raw, _NPY_FULL_SCALE[dtype.kind, dtype.itemsize], f"a {dtype.name} .npy array", name, True)


def _decode_pil(data: bytes, name: str) -> _Decoded:
    """An image Pillow reads (PNG, JPEG, TIFF, BMP): (H, W) for gray, also gray stored as RGB (equal channels,
    like the TGS images: exact), else (H, W, 3). Alpha (RGBA, LA, PA) is transparency, not data, and dropped:
    an image of 4 channels, or of any count but 1 and 3, is read from an .npy file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, below
            img = Image.open(io.BytesIO(data))
        with img:
            _check_pixels(name, img.height, img.width)  # from the header: nothing decoded yet
            img.load()
            mode = img.mode
            if mode in ("CMYK", "YCbCr", "LAB", "HSV"):  # colour in another space: as RGB
                img, mode = img.convert("RGB"), "RGB"
            if mode not in _FULL_SCALE:
                raise DataError(f"{name} has PIL mode {mode!r}, which tinyunet does not read: save it as an 8- or "
                                "16-bit grayscale PNG, an RGB image or an .npy array")
            if mode in ("P", "PA"):  # palette indices mean nothing: look the colours up
                img = img.convert("RGBA" if mode == "PA" else "RGB")
            pixels = np.asarray(img)  # (H, W) or (H, W, bands)
    except DataError:  # a ValueError, but already this file's own one line
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"{name} is too large to decode ({err}): cut it into smaller images") from None
    except _DECODE_ERRORS as err:
        raise _undecodable(name, err) from None
    if pixels.ndim == 3:
        rgb = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]  # drop alpha
        gray = (rgb == rgb[..., :1]).all()  # gray stored as RGB (the TGS images): exact
        raw = rgb[..., 0].astype(np.float32) if gray else rgb.astype(np.float32)  # (H, W) or (H, W, 3)
    else:
        raw = pixels.astype(np.float32)
    full = _FULL_SCALE[mode]
    if raw.size and (raw.min() < 0 or raw.max() > full):
        raise DataError(f"{name} (PIL mode {mode!r}) holds values outside 0..{full}: "
                        "save it as an 8- or 16-bit grayscale PNG")
    return _Decoded(raw, full, f"PIL mode {mode!r}", name, False)


def _decode(source: str | Path | bytes, name: str | None) -> _Decoded:
    """Decode an image file (a path or its bytes) to raw values: an .npy array (:func:`_decode_npy`), else
    whatever Pillow reads (:func:`_decode_pil`). ``name`` names it in messages (default: the path)."""
    if isinstance(source, bytes):
        data, name = source, name or "<bytes>"
    else:
        name = name or str(source)
        data = read_regular_file(Path(source), name)
    return _decode_npy(data, name) if _is_npy(data, name) else _decode_pil(data, name)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(H, W) of an image file's bytes, read from its header (nothing decoded; an .npy header is checked)."""
    if _is_npy(data, name):
        return _npy_header(data, name)[0][:2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.height, img.width
    except _DECODE_ERRORS as err:
        raise _undecodable(name, err) from None


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read an image as float32 in [0, 1]: (H, W) when it is gray, (H, W, 3) when it has colour, (H, W, C)
    for an .npy array of C channels.

    Pillow's formats: 8-bit modes (L, P, RGB, RGBA, LA) are divided by 255, 16-bit ones (I;16, I) by 65535;
    alpha is dropped (transparency, not data) and gray stored as RGB reads as gray. An .npy array keeps its
    channels as they are: bool, uint8 and uint16 are divided by 1, 255 and 65535, floats must already lie in
    [0, 1]. ``name`` names the file in error messages (default: the path).
    """
    decoded = _decode(source, name)
    return decoded.raw / np.float32(decoded.full)


def read_mask(source: str | Path | bytes, name: str | None = None,
              threshold: float | None = None) -> np.ndarray:
    """Read a mask image as float32 (H, W) in {0, 1}; a colour mask counts by its luma, an .npy mask is
    (H, W) or (H, W, 1).

    Without ``threshold`` any value > 0 is foreground and a mask with more than two distinct values is
    a DataError that says how it was read; with it (in [0, 1)) a soft mask is binarised: foreground
    where the value, scaled to [0, 1], is above ``threshold``.
    """
    raw, full, how, name, npy = _decode(source, name)
    if npy and raw.ndim == 3:
        raise DataError(f"mask {name} has {raw.shape[2]} channels: an .npy mask is (H, W) or (H, W, 1), "
                        "one value per pixel")
    raw = luma(raw) if raw.ndim == 3 else raw
    if threshold is not None:
        return (raw / np.float32(full) > np.float32(threshold)).astype(np.float32)
    values = np.unique(raw)
    if values.size > 2:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise DataError(f"mask {name} is not binary: read as {how} (0..{full}) it holds "
                        f"{values.size} distinct values ({shown}); a mask needs two values, "
                        "0 for background and anything > 0 for the foreground, or binarise it with "
                        "--mask-threshold (e.g. 0.5)")
    return (raw > 0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Files in a folder or a zip
# --------------------------------------------------------------------------------------------

def read_regular_file(path: Path, name: str, top: Path | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most :data:`MAX_FILE_BYTES` (and, with
    ``top``, lie inside that folder once links are followed); DataError (one line) otherwise.

    Opened without blocking and checked before reading, so a FIFO named x.png, a link to /dev/zero or a
    link leaving the data folder is refused at once instead of hanging or filling the memory.
    """
    if top is not None and not path.resolve().is_relative_to(top.resolve()):
        raise DataError(f"{name} is a link to {path.resolve()}, outside the data folder {top}: copy the file "
                        "into the folder, or give the folder it lies in")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise DataError(f"cannot read {name}: {err.strerror or err}") from None
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{name} is not a regular file (a FIFO, a device or a socket): remove it from the data")
        if info.st_size > MAX_FILE_BYTES:
            raise DataError(f"{name} holds {info.st_size / 2**20:,.0f} MiB, more than tinyunet reads from one file "
                            f"({MAX_FILE_BYTES / 2**20:,.0f} MiB): remove it, or cut it into smaller files")
        try:
            return f.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise DataError(f"cannot read {name}: {err.strerror or err}") from None


class _DirTree:
    """Read-only view of a folder; relative names use '/'."""

    def __init__(self, root: Path, label: str, top: Path | None = None):
        self.root = root
        self.label = label  # how messages name it
        self.top = top or root  # the data folder: no file is read from outside it

    def has_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def has_file(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def entries(self, rel: str = "") -> list[str]:
        """Names directly in folder ``rel``: files as 'name', folders as 'name/'."""
        folder = self.root / rel
        return sorted(p.name + "/" if p.is_dir() else p.name for p in folder.iterdir())

    def read(self, rel: str) -> bytes:
        return read_regular_file(self.root / rel, f"{self.label}/{rel}", self.top)

    def sub(self, rel: str) -> _DirTree:
        return _DirTree(self.root / rel, f"{self.label}/{rel}", self.top)


class _ZipTree:
    """Read-only view of one folder of a zip, read in place (never extracted)."""

    def __init__(self, zf: zipfile.ZipFile, label: str, prefix: str = "", index=None):
        self.zf = zf
        self.label = label
        self.prefix = prefix  # '' or 'folder/'
        if index is None:  # member files, and every folder they imply (zips may omit folder entries)
            names = zf.namelist()
            index = ({n for n in names if not n.endswith("/")},
                     {n[: i + 1] for n in names for i, ch in enumerate(n) if ch == "/"})
        self.files, self.dirs = index

    def has_dir(self, rel: str) -> bool:
        return f"{self.prefix}{rel}/" in self.dirs

    def has_file(self, rel: str) -> bool:
        return self.prefix + rel in self.files

    def entries(self, rel: str = "") -> list[str]:
        """Names directly in folder ``rel``: files as 'name', folders as 'name/'."""
        start = self.prefix + (rel + "/" if rel else "")
        found = set()
        for name in self.files | self.dirs:
            if name.startswith(start) and name != start:
                rest = name[len(start):]
                found.add(rest[: rest.index("/") + 1] if "/" in rest else rest)
        return sorted(found)

    def read(self, rel: str) -> bytes:
        info = self.zf.getinfo(self.prefix + rel)
        if stat.S_ISLNK(info.external_attr >> 16):  # a Unix link stored as a member: its target is outside the data
            raise DataError(f"{self.label}/{rel} is a link inside the zip, not a file: zip the file itself "
                            "(zip without --symlinks), or unpack the zip and give the folder")
        declared = info.file_size  # the zip's word, held to it when reading
        if declared > MAX_FILE_BYTES:
            raise DataError(f"{self.label}/{rel} declares {declared / 2**20:,.0f} MiB in the zip, more than tinyunet "
                            f"reads from one file ({MAX_FILE_BYTES / 2**20:,.0f} MiB): refused unread")
        try:
            return self.zf.read(self.prefix + rel)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
                NotImplementedError) as err:  # damaged, encrypted or an unsupported compression
            raise DataError(f"cannot read {self.label}/{rel} from the zip ({err}): "
                            "re-download the zip, or unpack it and give the folder") from None

    def sub(self, rel: str) -> _ZipTree:
        return _ZipTree(self.zf, f"{self.label}/{rel}", f"{self.prefix}{rel}/",
                        (self.files, self.dirs))


def _open_zip(data: str | Path | bytes, label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"cannot open {label} as a zip ({err}): re-download it") from None


class _Layout:
    """Kaggle's layout found under a folder or in a zip; a context manager that closes the zips."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.zips: list[zipfile.ZipFile] = []
        if not path.exists():
            raise DataError(f"data path '{path}' does not exist: give a folder or zip in Kaggle's "
                            f"layout; {LAYOUT_HINT}")
        if path.is_dir():
            root = _DirTree(path, str(path))
        elif zipfile.is_zipfile(path):
            self.zips.append(_open_zip(path, str(path)))
            root = _ZipTree(self.zips[0], str(path))
        else:
            raise DataError(f"data path '{path}' is neither a folder nor a zip file: {LAYOUT_HINT}")
        top = root.entries()
        if not top:
            raise DataError(f"data {'folder' if path.is_dir() else 'zip'} '{path}' is empty: "
                            f"{LAYOUT_HINT}")
        if len(top) == 1 and top[0].endswith("/") and self._kind(root) == "other":
            root = root.sub(top[0][:-1])  # a zip (or folder) holding the layout in one folder
        self.root = root
        self.kind = self._kind(root)

    @staticmethod
    def _kind(tree) -> str:
        """'kaggle' (train/images or train.zip, test/...), 'plain' (images/ [+ masks/, test/]), 'flat'
        (image files at the top) or 'other'."""
        if any(tree.has_dir(f"{part}/images") or tree.has_file(f"{part}.zip") for part in ("train", "test")):
            return "kaggle"
        if tree.has_dir("images"):
            return "plain"
        return "flat" if any(_is_image_file(name) for name in tree.entries()) else "other"

    def part(self, part: str):
        """``(tree, folder)``: the images of ``part`` ('train' or 'test') are ``folder`` in ``tree``
        (its masks, for 'train', the folder ``masks`` beside them)."""
        root = self.root
        if self.kind == "plain" and part == "train":
            if not root.has_dir("masks"):
                raise DataError(f"data '{root.label}' has images/ but no masks/ beside it, it holds "
                                f"{', '.join(root.entries()[:8])}: a plain layout pairs DATA/images/<name> "
                                "with DATA/masks/<name> (see --mask-suffix)")
            return root, "images"
        if self.kind == "plain":
            if root.has_dir("test/images") or root.has_dir("test"):
                return root, "test/images" if root.has_dir("test/images") else "test"
            raise DataError(f"data '{root.label}' has no test/ folder of unlabelled images: pass "
                            f"--data {root.label}/images to predict the training images, or --evaluate")
        if self.kind == "flat" and part == "test":
            return root, ""
        if self.kind == "flat":
            raise DataError(f"data '{root.label}' holds images but no masks: {LAYOUT_HINT}")
        if root.has_dir(f"{part}/images"):
            return root.sub(part), "images"
        if root.has_file(f"{part}.zip"):
            label = f"{root.label}/{part}.zip"
            self.zips.append(_open_zip(root.read(f"{part}.zip"), label))
            inner = _ZipTree(self.zips[-1], label)
            if inner.has_dir("images"):  # Kaggle's train.zip holds images/ at its top
                return inner, "images"
            if inner.has_dir(f"{part}/images"):
                return inner.sub(part), "images"
            raise DataError(f"{label} has no images/ folder: Kaggle's {part}.zip holds "
                            f"images/<id>.png" + (" and masks/<id>.png" if part == "train" else ""))
        shown = ", ".join(root.entries()[:8])
        raise DataError(f"data '{root.label}' has no {part}/images (nor {part}.zip), it holds "
                        f"{shown}: {LAYOUT_HINT}")

    def __enter__(self) -> _Layout:
        return self

    def __exit__(self, *exc) -> None:
        for zf in self.zips:
            zf.close()


def _is_image_file(name: str) -> bool:
    return not name.endswith("/") and name.lower().endswith(IMAGE_SUFFIXES)


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _image_files(tree, folder: str, suffix: str = "") -> dict[str, str]:
    """id -> file name of the image files directly in ``folder``, sorted by id; the id is the file's stem
    less ``suffix`` (``cat_01_mask.png`` -> ``cat_01`` with suffix ``_mask``). Raises if there are none."""
    where = _join(tree.label, folder)
    files: dict[str, str] = {}
    for name in tree.entries(folder):
        if not _is_image_file(name):
            continue
        stem = name[: name.rindex(".")]
        image_id = check_id(stem[: len(stem) - len(suffix)] if suffix and stem.endswith(suffix) else stem, where)
        if image_id in files:
            raise DataError(f"{where} holds both {files[image_id]} and {name}, one id {image_id!r}: "
                            "keep one file per name")
        files[image_id] = name
    if not files:
        raise DataError(f"{where} holds no image files ({', '.join(IMAGE_SUFFIXES)}): {LAYOUT_HINT}")
    return dict(sorted(files.items()))


def _one_channel_count(arrays: list, names: list[str]) -> list:
    """Images (H, W[, C]) of one channel count: gray ones beside RGB ones are repeated into the three channels
    (H, W, 3); any other mix is a DataError naming two files that differ."""
    counts = [1 if a.ndim == 2 else a.shape[2] for a in arrays]
    if set(counts) == {1, 3}:
        return [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]  # (H, W, 3)
    if len(set(counts)) > 1:
        odd = next(i for i, c in enumerate(counts) if c not in (1, 3))
        other = next(i for i, c in enumerate(counts) if c != counts[odd])
        raise DataError(f"{names[odd]} has {counts[odd]} channel(s) but {names[other]} has {counts[other]}: the "
                        "images of a set need one channel count (only gray beside RGB converts)")
    return arrays


def _read_images(tree, folder: str, files: dict[str, str]):
    """Read every image file: (N, H, W) float32 for gray, (N, H, W, C) for C channels (gray ones beside RGB
    ones repeated into its three), or a list of such (H, W[, C]) arrays when sizes differ."""
    names = [_join(_join(tree.label, folder), name) for name in files.values()]
    arrays = [read_image(tree.read(_join(folder, rel)), name) for rel, name in zip(files.values(), names)]
    return as_stack(_one_channel_count(arrays, names))


def _read_masks(tree, folder: str, files: dict[str, str], images, threshold: float | None):
    """Read each image's mask (files in the images' order): (N, H, W) float32 in {0, 1}, or a list."""
    masks = []
    for name, image in zip(files.values(), images):
        where = _join(_join(tree.label, folder), name)
        mask = read_mask(tree.read(_join(folder, name)), where, threshold)  # (H, W)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {where} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image.shape[1]}x{image.shape[0]}: a mask must have its image's size")
        masks.append(mask)
    return as_stack(masks)


def _check_same_ids(image_ids: list[str], other_ids: list[str], images: str, other: str) -> None:
    """Raise DataError naming the first few ids found in only one of the two lists."""
    no_other = sorted(set(image_ids) - set(other_ids))
    no_image = sorted(set(other_ids) - set(image_ids))
    problems = []
    if no_other:
        problems.append(f"{len(no_other)} image(s) in {images} have no {other} "
                        f"({', '.join(no_other[:5])})")
    if no_image:
        problems.append(f"{len(no_image)} {other}(s) have no image in {images} "
                        f"({', '.join(no_image[:5])})")
    if problems:
        raise DataError("; ".join(problems) + ": every image needs its mask and every mask its "
                        "image; add the missing files or remove the extra ones")


def _read_csv(tree, name: str, columns: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Rows of CSV ``name`` keyed by their checked ``id``; the header must hold ``columns``."""
    where = f"{tree.label}/{name}"
    try:
        text = tree.read(name).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text ({err}): re-download it") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))  # any line ending: \n, \r\n or \r alone
    rows: dict[str, dict[str, str]] = {}
    try:
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{where} has no column {missing[0]!r} (header: {reader.fieldnames}): "
                            f"expected a header line '{','.join(columns)}'")
        for row in reader:
            image_id = check_id(row["id"] or "", where)
            if image_id in rows:
                raise DataError(f"id {image_id} appears twice in {where}: keep one row per id")
            rows[image_id] = row
    except csv.Error as err:  # a field over MAX_CSV_FIELD, a NUL byte, a quote left open
        raise DataError(f"{where} is not a readable CSV (line {reader.line_num}: {err}): fix that line") from None
    return rows


def _masks_from_csv(rows: dict[str, dict[str, str]], ids: list[str], images):
    """Masks decoded from train.csv's run-length strings ``rows``, in the order of ``ids``, each of its
    image's size: (N, H, W) float32, or a list when sizes differ."""
    from tinyunet.rle import rle_decode  # the run-length module, needed only for this fallback

    masks = []
    for image_id, image in zip(ids, images):
        try:
            masks.append(rle_decode(rows[image_id]["rle_mask"] or "", image.shape[:2]).astype(np.float32))
        except ValueError as err:
            raise DataError(f"train.csv's run-length string for id {image_id} is invalid ({err}): "
                            "fix that row or give train/masks") from None
    return as_stack(masks)


# --------------------------------------------------------------------------------------------
# Loading a training set and a test set
# --------------------------------------------------------------------------------------------

@dataclass
class TrainSet:
    """A labelled set, sorted by id."""

    ids: list[str]
    images: np.ndarray | list  # (N, H, W) gray or (N, H, W, C) float32 in [0, 1]; a list of them if sizes differ
    masks: np.ndarray | list  # (N, H, W) float32 in {0, 1}; a list of (H, W) if sizes differ

    def __len__(self) -> int:
        return len(self.ids)


def load_train(path: str | Path, mask_suffix: str = "", mask_threshold: float | None = None,
               choose=None) -> TrainSet:
    """Read the training images and masks of Kaggle's layout, or of a plain ``images/`` + ``masks/``
    pair, from a folder or a zip.

    Images and masks are matched by file stem, a mask's stem less ``mask_suffix`` (``a_mask.png`` for
    ``a.jpg`` with ``"_mask"``). In Kaggle's layout masks come from ``train/masks``, or from
    ``train.csv``'s run-length strings where that folder is missing. ``mask_threshold`` binarises soft
    masks (:func:`read_mask`). ``choose``, given the number of images found, returns the sorted indices
    of those to read: the others are listed and matched to their masks, never decoded. Raises
    DataError (one line) on any problem with the files.
    """
    with _Layout(path) as layout:
        train, folder = layout.part("train")
        files = _image_files(train, folder)
        ids = list(files)
        if train.has_dir("masks"):
            mask_files = _image_files(train, "masks", mask_suffix)
            _check_same_ids(ids, list(mask_files), _join(train.label, folder), "mask")
        elif layout.root.has_file("train.csv"):
            rows = _read_csv(layout.root, "train.csv", ("id", "rle_mask"))
            _check_same_ids(ids, list(rows), f"{layout.root.label}/train/images", "row in train.csv")
        else:
            raise DataError(f"data '{layout.root.label}' has neither train/masks nor train.csv: "
                            "give the masks as PNGs or as run-length strings in train.csv")
        if choose is not None:
            ids = [ids[int(i)] for i in choose(len(ids))]
        images = _read_images(train, folder, {i: files[i] for i in ids})  # (N, H, W[, C]) or a list
        if train.has_dir("masks"):
            masks = _read_masks(train, "masks", {i: mask_files[i] for i in ids}, images, mask_threshold)
        else:
            masks = _masks_from_csv(rows, ids, images)
    return TrainSet(ids, images, masks)


def load_test(path: str | Path):
    """Read unlabelled images from a folder or a zip: ``(ids, images)``, images as :func:`load_train`'s.

    ``path`` is in Kaggle's layout (``test/images``), a plain layout (``test/`` or ``test/images``) or a
    folder of image files.
    """
    with _Layout(path) as layout:
        test, folder = layout.part("test")
        files = _image_files(test, folder)
        return list(files), _read_images(test, folder, files)


class ImageFiles:
    """The images to predict from folders (:func:`load_test`) and single image files, listed but not
    decoded: ``ids`` the file stems in the order given (each folder's sorted), unique; ``sizes()`` each
    image's (H, W) from its header; ``read(indices)`` decodes those images only. A context manager
    that closes the zips it opened.
    """

    def __init__(self, paths: list[str | Path]):
        self.ids: list[str] = []
        self._files: list[tuple] = []  # (tree, name in it, name in messages); tree None for a file given
        self._layouts: list[_Layout] = []
        for path in map(Path, paths):
            if path.is_file() and _is_image_file(path.name):
                self.ids.append(check_id(path.stem, str(path.parent)))
                self._files.append((None, path, str(path)))
                continue
            self._layouts.append(_Layout(path))
            test, folder = self._layouts[-1].part("test")
            files = _image_files(test, folder)
            self.ids += files
            self._files += [(test, _join(folder, name), _join(_join(test.label, folder), name))
                            for name in files.values()]
        twice = sorted({i for i in self.ids if self.ids.count(i) > 1})
        if twice:
            self.close()
            raise DataError(f"the images given share the name(s) {', '.join(twice[:5])}: predictions are saved "
                            "under the images' names, so give each name once")

    def _bytes(self, i: int) -> tuple[bytes, str]:
        tree, rel, name = self._files[i]
        return (read_regular_file(rel, name) if tree is None else tree.read(rel)), name

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image, from the headers (nothing decoded)."""
        return [image_size(*self._bytes(i)) for i in range(len(self.ids))]

    def read(self, indices) -> np.ndarray | list:
        """The images at ``indices``: (n, H, W) gray, (n, H, W, C) for C channels (gray ones beside RGB
        ones repeated into its three), or a list when sizes differ; DataError for any other mix of counts."""
        indices = [int(i) for i in indices]
        arrays = [read_image(*self._bytes(i)) for i in indices]
        return as_stack(_one_channel_count(arrays, [self._files[i][2] for i in indices]))

    def close(self) -> None:
        for layout in self._layouts:
            layout.__exit__()

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_images(paths: list[str | Path]):
    """The images of :class:`ImageFiles` ``paths``, all decoded: ``(ids, images)``."""
    with ImageFiles(paths) as files:
        return files.ids, files.read(range(len(files.ids)))


def load_depths(path: str | Path, ids: list[str]) -> np.ndarray | None:
    """depths.csv's ``z`` for each of ``ids``, (N,) float32 (NaN where it has no row), or None without
    the file. Training never uses the depths, so nothing else reads the file: a flaw in it stops only
    this call."""
    with _Layout(path) as layout:
        if not layout.root.has_file("depths.csv"):
            return None
        rows = _read_csv(layout.root, "depths.csv", ("id", "z"))
    depths = np.full(len(ids), np.nan, np.float32)  # (N,)
    for i, image_id in enumerate(ids):
        if image_id in rows:
            try:
                depths[i] = float(rows[image_id]["z"])
            except (TypeError, ValueError):
                raise DataError(f"depths.csv's z for id {image_id} is {rows[image_id]['z']!r}, "
                                "not a number: fix that row") from None
    return depths


def tgs_like(sizes, channels: int) -> bool:
    """Whether images of ``sizes`` ((H, W) each) and ``channels`` look like the TGS competition's: 101 x 101
    gray. Then the Kaggle CSV, the word "salt" and the competition's name apply."""
    return channels == 1 and set(map(tuple, sizes)) == {(101, 101)}


# --------------------------------------------------------------------------------------------
# Coverage and the stratified split
# --------------------------------------------------------------------------------------------

def coverage(masks):
    """Fraction of foreground pixels of each mask: (N, H, W), (N, H, W, 1) or a list of (H, W) -> (N,) float64."""
    if isinstance(masks, list):
        return np.array([float((as_numpy(m) > 0.5).mean()) for m in masks], np.float64)
    xp = get_array_module(masks)
    return (masks.reshape(len(masks), -1) > 0.5).mean(axis=1, dtype=xp.float64)


def coverage_class(cov):
    """Coverage class ``ceil(coverage * 10)``: 0 for an empty mask, 1..10 otherwise; (N,) int64."""
    xp = get_array_module(cov)
    return xp.ceil(xp.round(cov * 10, 6)).astype(xp.int64)  # round: 0.1 must stay class 1


def stratified_split(classes, val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(train_idx, val_idx)``, stratified by class, reproducible by ``seed``.

    Each class goes to validation in proportion (largest remainders, ties broken by the seed), and
    every class with at least two members has at least one in each part, even where that moves the
    validation size off ``round(val_fraction * N)``. Both parts are non-empty, sorted int64.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classes = as_numpy(classes).ravel()
    n = len(classes)
    if n < 2:
        raise ValueError(f"cannot split {n} item(s) into a training and a validation part")
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(classes, return_counts=True)
    target = min(max(round(val_fraction * n), 1), n - 1)
    ideal = counts * target / n  # (K,) validation share of each class
    n_val = np.floor(ideal).astype(np.int64)
    order = np.lexsort((rng.random(len(labels)), -(ideal - n_val)))  # largest remainders first
    n_val[order[: target - n_val.sum()]] += 1
    low = np.where(counts >= 2, 1, 0)  # a class of two or more keeps a member in each part
    high = np.where(counts >= 2, counts - 1, counts)
    n_val = np.clip(n_val, low, high)
    while n_val.sum() != target:  # clipping moved the total: move the most off class back
        step = 1 if n_val.sum() < target else -1
        room = (n_val + step >= low) & (n_val + step <= high)
        if not room.any():
            break
        n_val[np.flatnonzero(room)[np.argmax(step * (ideal - n_val)[room])]] += step
    val = [rng.permutation(np.flatnonzero(classes == label))[:k] for label, k in zip(labels, n_val)]
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(n), val_idx).astype(np.int64)
    return train_idx, val_idx


def stratified_folds(classes, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` ``(train_idx, val_idx)`` pairs for k-fold cross-validation, stratified by class.

    Every index is in exactly one validation part. Each class is shuffled (by ``seed``) and dealt
    round-robin over the folds, the next class continuing where the last stopped, so every fold holds
    1/k of each class and the fold sizes differ by at most one. Sorted int64 indices.
    """
    classes = as_numpy(classes).ravel()
    n = len(classes)
    if not 2 <= k <= n:
        raise ValueError(f"cannot split {n} item(s) into {k} folds: need 2 <= k <= {n}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)  # (N,) the fold whose validation part holds each item
    start = 0
    for label in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == label))
        fold_of[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


# --------------------------------------------------------------------------------------------
# The data fingerprint
# --------------------------------------------------------------------------------------------

def fingerprint(ids: list[str], images, masks) -> str:
    """A short sha256 hex (16 chars) of ids, images (as float32) and masks (as {0, 1} bytes); a set of
    mixed sizes (lists) image by image."""
    digest = hashlib.sha256("\n".join(ids).encode())
    for stack, dtype in ((images, "<f4"), (masks, "u1")):
        for array in (stack if isinstance(stack, list) else [stack]):
            array = as_numpy(array) > 0.5 if dtype == "u1" else as_numpy(array)
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest()[:16]
