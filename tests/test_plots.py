"""tinyunet.plots: every figure is a readable PNG, odd input is drawn or refused clearly, no window opens."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyunet import plots


def assert_png(path, min_size=(300, 200)):
    """``path`` is a complete PNG of at least ``min_size`` pixels that is not one flat colour."""
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # a truncated file fails here
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 1  # something is drawn
    assert not [n for n in os.listdir(path.parent) if n.endswith(".tmp")]  # no temporary file left


def history(n=12, overrides=None):
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "loss": 0.6 * math.exp(-e / 5) + 0.1, "accuracy": 0.9 - 0.1 * math.exp(-e / 4),
               "val_loss": 0.6 * math.exp(-e / 5) + 0.15 + 0.003 * max(0, e - 8) ** 2,
               "val_accuracy": 0.88 - 0.1 * math.exp(-e / 4), "val_score": 0.7 - 0.3 * math.exp(-e / 4),
               "lr": 1e-3 if e < 9 else 1e-4}
        row.update((overrides or {}).get(e, {}))
        rows.append(row)
    return rows


def test_learning_curves(tmp_path):
    out = plots.learning_curves(history(), tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    assert_png(out, (800, 600))


def test_learning_curves_odd_histories(tmp_path):
    """A diverged loss, missing keys, one epoch and no epoch at all are drawn, not crashed on."""
    diverged = history(6, {5: {"loss": float("inf"), "val_loss": float("nan")}, 6: {"loss": None}})
    assert_png(plots.learning_curves(diverged, tmp_path / "diverged.png"))
    partial = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]  # no validation, no lr
    assert_png(plots.learning_curves(partial, tmp_path / "partial.png"))
    assert_png(plots.learning_curves(history(1), tmp_path / "one.png"))
    assert_png(plots.learning_curves([], tmp_path / "empty.png"))


def test_threshold_curve(tmp_path):
    t = np.linspace(0, 1, 50).astype(np.float32)
    s = 0.75 - (t - 0.45) ** 2
    best = float(t[np.argmax(s)])
    assert_png(plots.threshold_curve(t, s, best, tmp_path / "th.png"))
    near_top = np.minimum(s + 0.24, 1.0)  # a best score near 1: the label goes below the marker
    assert_png(plots.threshold_curve(t, near_top, best, tmp_path / "top.png"))
    with pytest.raises(ValueError, match="one length"):
        plots.threshold_curve(t, s[:-1], best, tmp_path / "bad.png")


def test_prediction_grid(tmp_path):
    rng = np.random.default_rng(0)
    truths = rng.random((20, 101, 101)) < rng.random((20, 1, 1))
    images = rng.random((20, 101, 101)).astype(np.float32)
    probs = np.clip(truths * 0.7 + rng.normal(0.15, 0.1, truths.shape), 0, 1).astype(np.float32)
    ids = [f"{k:010x}" for k in range(20)]
    with_truth = plots.prediction_grid(images, probs, probs > 0.5, tmp_path / "t.png",
                                       truths=truths, ids=ids)
    assert_png(with_truth, (900, 500))
    without = plots.prediction_grid(images, probs, probs > 0.5, tmp_path / "p.png", n=4)
    assert_png(without, (400, 350))
    with Image.open(with_truth) as a, Image.open(without) as b:
        assert a.size[1] > b.size[1]  # the truth row makes the grid taller
    few = plots.prediction_grid(images[:2], probs[:2], probs[:2] > 0.5, tmp_path / "few.png", n=8)
    assert_png(few, (200, 300))
    big = rng.random((3, 512, 512)).astype(np.float32)  # any image size
    assert_png(plots.prediction_grid(big, big, big > 0.5, tmp_path / "big.png", n=3))


def test_prediction_grid_picks_spread_over_coverage():
    cover = np.array([0, 0, 0, 0, 0, 0.05, 0.3, 0.5, 0.52, 0.9, 1.0])
    picks = plots.spread_picks(cover, 4)
    assert cover[picks].tolist() == [0, 0.3, 0.52, 1.0]  # one empty image, not a run of them
    assert len(set(plots.spread_picks(np.zeros(10), 5).tolist())) == 5  # distinct even when all tie


def test_prediction_grid_rejects_mismatched_arrays(tmp_path):
    a = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        plots.prediction_grid(a, np.zeros((3, 8, 9)), a > 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="ids"):
        plots.prediction_grid(a, a, a > 0, tmp_path / "x.png", ids=["a"])
    with pytest.raises(ValueError, match="at least one"):
        plots.prediction_grid(a[:0], a[:0], a[:0] > 0, tmp_path / "x.png")


def test_coverage_histogram(tmp_path):
    rng = np.random.default_rng(1)
    cov = np.where(rng.random(500) < 0.4, 0, rng.random(500))
    out = plots.coverage_histogram(cov[:400], cov[400:], tmp_path / "cov.png")
    assert_png(out, (700, 350))
    with pytest.raises(ValueError, match="salt fractions"):
        plots.coverage_histogram(np.array([0, 3, 10]), cov, tmp_path / "classes.png")  # classes


def test_a_failed_save_leaves_the_old_picture(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = plots.threshold_curve([0, 1], [0.2, 0.3], 1.0, tmp_path / "th.png")
    before = out.read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        plots.threshold_curve([0, 1], [0.5, 0.1], 0.0, out)
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["th.png"]


def test_no_window_and_light_import():
    """Importing tinyunet.plots loads no matplotlib; drawing never loads pyplot (no GUI backend)."""
    code = (
        "import sys, tempfile, numpy as np\n"
        "import tinyunet.plots as p\n"
        "assert 'matplotlib' not in sys.modules\n"
        "d = tempfile.mkdtemp()\n"
        "p.threshold_curve(np.linspace(0, 1, 5), np.linspace(0, 1, 5), 1.0, d + '/t.png')\n"
        "p.coverage_histogram(np.array([0.0, 0.5]), np.array([1.0]), d + '/c.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "MPLBACKEND": "TkAgg"}  # a GUI default must not matter either
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
