"""The package as people import it: the public names, and what importing loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import tinyunet

HEAVY = ("PIL", "matplotlib", "tqdm", "pandas")


def loaded_after(statement: str) -> set[str]:
    """The heavy top-level packages in sys.modules after ``statement``, in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split()) & set(HEAVY)


def test_importing_tinyunet_loads_no_heavy_package():
    assert loaded_after("import tinyunet; tinyunet.UNet(features=2, depth=2)") == set()


def test_the_public_api_builds_trains_a_step_and_scores():
    model = tinyunet.UNet(features=2, depth=2, seed=0)
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    y = (x > 0.5).astype(np.float32)
    loss, dlogits = tinyunet.binary_crossentropy(model.forward(x, train=True), y)
    model.backward(dlogits)
    tinyunet.Adam(model.params).step(model.grads)
    assert np.isfinite(float(loss))
    assert tinyunet.rle_decode(tinyunet.rle_encode(y[0, ..., 0] > 0), (8, 8)).sum() == (y[0] > 0).sum()
    assert tinyunet.competition_score(y[..., 0] > 0, y[..., 0] > 0) == 1.0
    for name in tinyunet.__all__:
        assert getattr(tinyunet, name) is not None, name


def test_inspect_loads_no_pillow():
    """Study mode needs resizing, not file reading: the array work lives apart from the PNG reader."""
    assert "PIL" not in loaded_after("import tinyunet.inspect")
