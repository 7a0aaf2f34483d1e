"""Kaggle run-length encoding of binary masks.

The pixels of an H x W mask are numbered 1..H*W column by column: down the first column, then down the
second, and so on (Fortran order, ``mask.ravel(order="F")``). Each run of salt pixels is written as
``start length``, and the pairs are joined by single spaces::

    mask (3 x 3)     pixel numbers     RLE
    0 1 1            1 4 7
    0 1 0            2 5 8             "4 2 7 1"   (pixels 4, 5 and 7)
    0 0 0            3 6 9

An empty mask is the empty string. Encoding finds the run edges where neighbours differ (``np.diff``)
in the flattened mask padded with a 0 at each end; decoding marks +1 at each run start and -1 after
each run end and takes a cumulative sum. Neither loops over pixels.

Decoding is strict: runs must be in increasing order and must not overlap (Kaggle writes them sorted);
runs that touch (the next one starting right after the last one ends) are accepted, though
:func:`rle_encode` never writes them. Numbers may be separated by any whitespace.
"""

from __future__ import annotations

import math

import numpy as np

from tinyunet.backend import as_numpy
from tinyunet.metrics import to_bool


def rle_encode(mask) -> str:
    """The run-length encoding of a 2-D mask (NumPy or CuPy; bool, integer > 0, or 0/1 float)."""
    pixels = as_numpy(to_bool(mask, "mask"))
    if pixels.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D (H, W) mask, got shape {pixels.shape}")
    flat = np.concatenate([[False], pixels.ravel(order="F"), [False]])  # (H*W + 2,) column-major
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 1-indexed: run starts, then one past run ends
    edges[1::2] -= edges[0::2]  # run ends -> run lengths
    return " ".join(map(str, edges.tolist()))


def _is_empty(rle) -> bool:
    """True for what pandas and Kaggle write for an empty mask: None, NaN, or an empty/blank string."""
    if rle is None:
        return True
    if isinstance(rle, float):  # pandas reads an empty CSV cell as NaN
        return math.isnan(rle)
    return isinstance(rle, str) and not rle.strip()


def _first_non_integer(tokens: list[str]) -> str:
    """The first token that does not convert to an int64 (only called once the whole batch failed)."""
    for token in tokens:
        try:
            np.array([token]).astype(np.int64)
        except (ValueError, OverflowError):
            return token
    raise AssertionError("every token converts on its own, but not together")


def _parse(rle: str) -> np.ndarray:
    """The numbers of an RLE string as a (runs, 2) int64 array of (start, length); ValueError if malformed."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}); expected 'start length' pairs")
    try:
        numbers = np.array(tokens).astype(np.int64)
    except (ValueError, OverflowError):
        bad = _first_non_integer(tokens)
        raise ValueError(f"RLE has a value that is not a 64-bit integer: {bad!r}") from None
    return numbers.reshape(-1, 2)  # (runs, 2)


def _check_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    """Raise ValueError naming the first run (counted from 1) that is out of range, empty, out of order or
    overlapping."""
    height, width = shape
    n_pixels = height * width
    for bad, problem in (
        (starts < 1, "starts before pixel 1 (pixels are numbered from 1)"),
        (lengths < 1, "has a length below 1"),
        # start + length - 1 > n_pixels, written so that huge values cannot overflow int64
        (lengths > n_pixels + 1 - starts, f"runs past pixel {n_pixels}, the end of a {height}x{width} image"),
    ):
        if bad.any():
            i = int(np.argmax(bad))
            run = f"RLE run {i + 1} of {len(starts)} (start {starts[i]}, length {lengths[i]})"
            raise ValueError(f"{run} {problem}")
    ends = starts + lengths - 1  # last pixel of each run, 1-indexed
    bad = starts[1:] <= ends[:-1]  # the next run starts on or before this run's last pixel
    if bad.any():
        i = int(np.argmax(bad))
        problem = "comes before" if starts[i + 1] < starts[i] else "overlaps"
        raise ValueError(
            f"RLE run {i + 2} of {len(starts)} (start {starts[i + 1]}) {problem} run {i + 1} "
            f"(start {starts[i]}, length {lengths[i]}); runs must be sorted and must not overlap"
        )


def rle_decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """The boolean (H, W) NumPy mask of an RLE string.

    None, NaN (pandas' empty cell) and empty or blank strings decode to an empty mask. A malformed
    string raises ValueError saying what is wrong: an odd count of numbers, a non-integer, a start < 1, a
    length < 1, a run past the end of the image, runs out of order or overlapping.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive sizes (H, W), got {tuple(shape)}")
    height, width = shape
    n_pixels = height * width
    if _is_empty(rle):
        return np.zeros((height, width), dtype=bool)
    if not isinstance(rle, str):
        raise TypeError(f"RLE must be a string (or None/NaN for an empty mask), got {type(rle).__name__}")
    runs = _parse(rle)  # (runs, 2)
    starts, lengths = runs[:, 0], runs[:, 1]
    _check_runs(starts, lengths, (height, width))
    steps = np.zeros(n_pixels + 1, dtype=np.int8)  # +1 where a run starts, -1 just after it ends
    steps[starts - 1] += 1
    steps[starts - 1 + lengths] -= 1
    flat = np.cumsum(steps[:n_pixels], dtype=np.int8).astype(bool)  # (H*W,) column-major
    return flat.reshape((height, width), order="F")
