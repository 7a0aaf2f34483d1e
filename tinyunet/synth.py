"""The built-in data set: synthetic seismic sections with salt bodies, in Kaggle's layout.

Each image is built like a seismic section (depth down the rows):

1. **Layers**: a blocky impedance log along geologic time, turned into reflectivity and convolved with a
   Ricker wavelet (band-limited, like a seismic trace); every pixel looks the trace up at its own
   geologic time, which is depth bent by a regional dip, folds, an optional fault and a small wiggle.
2. **Salt**: a smooth random field (a few low-frequency waves, a trend and a rough edge) thresholded at
   the quantile that gives the drawn coverage; ``(field - threshold) / |gradient|`` is about the signed
   distance to the salt edge, in pixels. The sediments are dragged along the salt flank, the salt
   holds chaotic, speckled texture instead of layers (fine, isotropic, about half the layers'
   amplitude), and its edge is a strong, sharp reflector.
3. **Noise** band-limited along the layers, then a random brightness and contrast, as in the TGS set.

Coverage classes follow the real training set: 39 % empty masks, and classes 1..10 in its
proportions; about 2 % of the images are blank (all black), a quirk of the real set kept on purpose.
The salt is told apart by its texture and its edge, not by its brightness. The signal is set so that the
quick run (``python train.py``) learns it in minutes on a CPU: a weaker texture (smooth, a quarter of the
layers' amplitude), noise as strong as the layers and slivers down to 0.2 % coverage kept a U-Net below
0.6 after the same training; the real set is harder, and ``--data`` trains on it.

Everything is drawn from ``np.random.default_rng([seed, part, index])``: the same seed writes
byte-identical files, and image ``i`` does not depend on how many images are drawn.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# Share of each coverage class 0..10 in the 3200 real training masks (class 0 = empty).
CLASS_SHARES = np.array([1250, 461, 237, 179, 149, 180, 164, 139, 118, 127, 196]) / 3200
BLANK_SHARE = 68 / 3200  # all-black images with empty masks, as in the real set

_TRAIN, _TEST = 0, 1  # the ``part`` in each image's seed


def _pow2(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest power-of-two sizes that hold ``shape`` (FFTs of those are fast)."""
    return tuple(1 << (n - 1).bit_length() for n in shape)


def _gaussian_pow2(array: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Gaussian smoothing (widths in pixels) of a (PH, PW) array of power-of-two sides, by FFT.

    FFTs rather than matrix products: BLAS threads can make small products very slow on a busy machine.
    """
    fy = np.fft.fftfreq(array.shape[0]).astype(np.float32)[:, None]  # (PH, 1) cycles per pixel
    fx = np.fft.rfftfreq(array.shape[1]).astype(np.float32)[None, :]  # (1, PW//2+1)
    gain = np.exp(np.float32(-2 * (np.pi * sigma_y) ** 2) * fy**2) \
        * np.exp(np.float32(-2 * (np.pi * sigma_x) ** 2) * fx**2)  # (PH, PW//2+1)
    return np.fft.irfft2(np.fft.rfft2(array) * gain, s=array.shape)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_y: float,
                  sigma_x: float) -> np.ndarray:
    """Gaussian noise (H, W) float32 smoothed by a Gaussian of the given widths (pixels), std 1."""
    noise = rng.standard_normal(_pow2(shape), dtype=np.float32)  # (PH, PW): no wrap-around inside
    out = _gaussian_pow2(noise, sigma_y, sigma_x)[: shape[0], : shape[1]]  # (H, W)
    return out / (out.std() + 1e-12)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W) image, reflected at its edges."""
    pads = [(0, p - n) for p, n in zip(_pow2(image.shape), image.shape)]
    padded = np.pad(image, pads, mode="reflect")  # (PH, PW); each pad is shorter than its side
    return _gaussian_pow2(padded, sigma, sigma)[: image.shape[0], : image.shape[1]]


def _ricker(t: np.ndarray, period: float) -> np.ndarray:
    """Ricker wavelet of peak period ``period`` (pixels) at times ``t``; 1 at t = 0."""
    a = (np.pi * t / period) ** 2
    return (1 - 2 * a) * np.exp(-a)


def _trace(rng: np.random.Generator, t_min: float, t_max: float,
           period: float) -> tuple[np.ndarray, np.ndarray]:
    """A seismic trace over geologic time: ``(times, amplitudes)``, std 1, sampled every 0.25 px."""
    times = np.arange(t_min - 2 * period, t_max + 2 * period, 0.25)
    # blocky impedance: layers of random thickness, each a random step from the last
    thickness = period * rng.uniform(0.3, 1.0)  # mean, pixels
    count = int((times[-1] - times[0]) / thickness * 3) + 10  # more layers than the range needs
    bounds = times[0] + np.cumsum(rng.exponential(thickness, count) + 0.5)
    at = np.searchsorted(times, bounds[bounds < times[-1]])
    reflectivity = np.zeros_like(times)
    np.add.at(reflectivity, at, rng.laplace(size=len(at)))
    kernel_t = np.arange(-2 * period, 2 * period + 0.25, 0.25)
    trace = np.convolve(reflectivity, _ricker(kernel_t, period), mode="same")
    return times, trace / (trace.std() + 1e-12)


def _salt_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray,
                size: int) -> np.ndarray:
    """A smooth random field (H, W) whose upper level sets look like salt bodies."""
    field = np.zeros_like(y)
    for _ in range(4):  # low-frequency waves: the body's overall shape
        wavelength = rng.uniform(0.8, 3.0) * size
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / wavelength
        field += rng.uniform(0.5, 1.0) * np.cos(k * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    angle = rng.uniform(0, 2 * np.pi)  # a trend: salt below, above or beside a flank
    field += rng.uniform(0, 2.5) * (x * np.cos(angle) + y * np.sin(angle)) / size
    rough = _smooth_noise(rng, y.shape, rng.uniform(3, 6), rng.uniform(3, 6))
    return field + rng.uniform(0.0, 0.05) * rough  # a rough edge


def _coverage(rng: np.random.Generator) -> float:
    """A salt coverage drawn so that coverage classes follow the real set (0.0 = no salt)."""
    cls = rng.choice(11, p=CLASS_SHARES)
    if cls == 0:
        return 0.0
    if cls == 1:  # the real class 1 is mostly small bodies and slivers: draw it log-uniform from 1 %
        return float(np.exp(rng.uniform(np.log(0.01), np.log(0.1))))
    return float(rng.uniform((cls - 1) / 10, min(cls / 10, 0.995)))


def section(rng: np.random.Generator, size: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic seismic section and its salt mask: ``(image (H, W) uint8, mask (H, W) bool)``."""
    if rng.random() < BLANK_SHARE:
        return np.zeros((size, size), np.uint8), np.zeros((size, size), bool)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)  # (H, W) depth and lateral position
    period = np.exp(rng.uniform(np.log(4), np.log(14)))  # dominant wavelength of the layers

    # salt: signed distance to its edge (> 0 inside)
    cov = _coverage(rng)
    if cov > 0:
        field = _salt_field(rng, y, x, size)
        k = max(1, round(cov * size * size))
        threshold = np.partition(field.ravel(), -k)[-k]  # the k-th largest value
        gy, gx = np.gradient(field)
        dist = (field - threshold) / (np.hypot(gy, gx) + 1e-9)  # pixels, > 0 inside
        mask = field >= threshold
    else:
        dist = np.full((size, size), -np.inf)
        mask = np.zeros((size, size), bool)

    # geologic time of each pixel: dip, folds, a fault, drag along the salt, a wiggle
    dip = np.deg2rad(np.clip(rng.normal(0, 25), -70, 70))
    time = y * np.cos(dip) + x * np.sin(dip)
    for _ in range(2):
        wavelength = rng.uniform(0.4, 2.5) * size
        amplitude = rng.uniform(0, 0.12) * wavelength * (1 + rng.uniform(-0.8, 0.8) * y / size)
        time += amplitude * np.sin(2 * np.pi * x / wavelength + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.3:
        angle = rng.uniform(-0.6, 0.6)  # a steep fault through a random point
        side = (x - rng.uniform(0, size)) * np.cos(angle) - (y - size / 2) * np.sin(angle)
        time += rng.uniform(3, 15) * rng.choice([-1, 1]) / (1 + np.exp(-side / 0.7))
    if cov > 0:
        outside = np.maximum(-dist, 0)
        time += rng.uniform(-5, 5) * np.exp(-outside / rng.uniform(8, 25))
    time += rng.uniform(0, 1.5) * _smooth_noise(rng, (size, size), 3, 10)
    times, trace = _trace(rng, time.min(), time.max(), period)
    layers = np.interp(time, times, trace)  # (H, W)
    for sigma_y, sigma_x in ((20, 20), (3, 8)):  # amplitude varying along the layers
        layers *= 1 + rng.uniform(0, 0.5) * _smooth_noise(rng, (size, size), sigma_y, sigma_x)

    # salt: fine chaotic texture inside, a strong, sharp reflector on its edge
    if cov > 0:
        texture = _smooth_noise(rng, (size, size), *rng.uniform(0.7, 2, size=2)) * rng.uniform(0.4, 0.8)
        inside = 1 / (1 + np.exp(-np.clip(dist, -50, 50) / 0.7))
        edge = rng.choice([-1, 1], p=[0.2, 0.8]) * rng.uniform(2, 3) * _ricker(dist, min(period, 6))
        layers = (1 - inside) * layers + inside * texture + edge

    # band-limited noise, then brightness and contrast
    noise = _smooth_noise(rng, (size, size), rng.uniform(0.5, 1.5), rng.uniform(1, 4))
    image = layers + np.exp(rng.uniform(np.log(0.05), np.log(0.3))) * noise
    image = _blur(image, rng.uniform(0, 1.5))
    image = (image - image.mean()) / (image.std() + 1e-12)
    gray = np.clip(rng.normal(0.47, 0.07), 0.3, 0.65) + rng.uniform(0.055, 0.17) * image
    return np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8), mask


def _new_id(rng: np.random.Generator, taken: set[str]) -> str:
    """A fresh Kaggle-like id: 10 lowercase hex characters."""
    while True:
        image_id = rng.bytes(5).hex()
        if image_id not in taken:
            taken.add(image_id)
            return image_id


def generate(out_dir: str | Path, n_train: int = 1000, n_test: int = 200, size: int = 101,
             seed: int = 0) -> Path:
    """Write a synthetic set in Kaggle's layout to ``out_dir`` and return its path.

    Writes ``train/images/<id>.png`` (8-bit gray), ``train/masks/<id>.png`` (8-bit, 0/255),
    ``train.csv`` (id,rle_mask), ``depths.csv`` (id,z) and ``test/images/<id>.png``. ``out_dir`` must
    not exist or be empty; the set is built in a hidden sibling folder and renamed into place at the
    end, so an interrupted run leaves no half-written set.
    """
    from tinyunet.rle import rle_encode  # the run-length module (train.csv), a sibling of this one

    if n_train < 0 or n_test < 0 or size < 8:
        raise ValueError(f"need n_train >= 0, n_test >= 0 and size >= 8, got {n_train}, {n_test}, {size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"'{out_dir}' exists and is not an empty folder: give a new folder "
                              "for the synthetic set, or remove that one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _write_set(work, n_train, n_test, size, seed, rle_encode)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(work, out_dir)
    except BaseException:  # Ctrl-C included: leave nothing half-written behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


def _write_set(work: Path, n_train: int, n_test: int, size: int, seed: int, rle_encode) -> None:
    """Write the files of :func:`generate` into the folder ``work``."""
    for folder in ("train/images", "train/masks", "test/images"):
        (work / folder).mkdir(parents=True)
    taken: set[str] = set()
    rle_rows, depth_rows = [], []
    for part, count in ((_TRAIN, n_train), (_TEST, n_test)):
        for index in range(count):
            rng = np.random.default_rng([seed, part, index])
            image_id = _new_id(rng, taken)
            image, mask = section(rng, size)  # (S, S) uint8, (S, S) bool
            depth_rows.append((image_id, int(rng.integers(51, 960))))
            if part == _TRAIN:
                Image.fromarray(image).save(work / "train/images" / f"{image_id}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(work / "train/masks" / f"{image_id}.png")
                rle_rows.append((image_id, rle_encode(mask)))
            else:
                Image.fromarray(image).save(work / "test/images" / f"{image_id}.png")
    for name, header, rows in (("train.csv", ("id", "rle_mask"), rle_rows),
                               ("depths.csv", ("id", "z"), depth_rows)):
        with open(work / name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)


def sample_grid(out_png: str | Path, synthetic: tuple[np.ndarray, np.ndarray],
                real: tuple[np.ndarray, np.ndarray] | None = None, n: int = 8) -> Path:
    """Save a PNG grid: ``n`` synthetic images over their masks, then (if given) ``n`` real ones.

    ``synthetic`` and ``real`` are ``(images (N, H, W) in [0, 1], masks (N, H, W))`` pairs; each
    row shows images picked evenly along sorted coverage, from empty to full. Uses matplotlib's
    ``Figure`` directly: no window, no global backend change.
    """
    from matplotlib.figure import Figure  # plotting is optional at import time

    sets = [("synthetic", synthetic)] + ([("real TGS", real)] if real is not None else [])
    fig = Figure(figsize=(1.3 * n, 2.7 * len(sets)), dpi=100)
    axes = fig.subplots(2 * len(sets), n, squeeze=False)
    for row, (label, (images, masks)) in enumerate(sets):
        cover = masks.reshape(len(masks), -1).mean(axis=1)
        picks = np.argsort(cover, kind="stable")[np.linspace(0, len(cover) - 1, n).round().astype(int)]
        for col, i in enumerate(picks):
            axes[2 * row, col].imshow(images[i], cmap="gray", vmin=0, vmax=1)
            axes[2 * row + 1, col].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
            axes[2 * row + 1, col].set_title(f"{cover[i]:.0%} salt", fontsize=8)
        axes[2 * row, 0].set_title(label, fontsize=10, loc="left")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def main(argv: list[str] | None = None) -> None:
    """``python -m tinyunet.synth OUT_DIR``: write a synthetic set, and optionally a sample grid."""
    parser = argparse.ArgumentParser(description="Write a synthetic seismic-salt set in Kaggle's layout.")
    parser.add_argument("out_dir", help="new (or empty) folder to write the set to")
    parser.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--n-test", type=int, default=200, help="test images (default 200)")
    parser.add_argument("--size", type=int, default=101, help="image side in pixels (default 101)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--grid", help="also save a sample grid PNG of the set to this path")
    parser.add_argument("--real", help="a real TGS folder or zip to show in the grid beside the set")
    args = parser.parse_args(argv)
    out = generate(args.out_dir, args.n_train, args.n_test, args.size, args.seed)
    print(f"wrote {args.n_train} training and {args.n_test} test images to {out}")
    if args.grid:
        from tinyunet.data import load_train

        fake = load_train(out)
        real = load_train(args.real) if args.real else None
        sample_grid(args.grid, (fake.images, fake.masks),
                    (real.images, real.masks) if real else None)
        print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
