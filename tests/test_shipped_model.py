"""The model shipped in the repository, models/tgs-salt.npz: loadable by the safe loader, complete (every
member, the threshold, TTA and the empty-mask rule predict.py applies), under the issue's 20 MB, and
predicting on images of the competition's size. Its score (0.8014 on the 640 validation images) is measured
in docs/accuracy.md, not here: that needs all 640 real images and about a minute."""

from pathlib import Path

import numpy as np

from tinyunet.config import MIN_AREAS
from tinyunet.models import for_inference, load_model
from tinyunet.pipeline import probabilities

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "tgs-salt.npz"


def test_the_shipped_model_holds_everything_predict_needs():
    assert SHIPPED.stat().st_size < 20e6
    model, ckpt = load_model(SHIPPED)
    meta = ckpt.meta
    assert len(meta["members"]) == 4 == len(model.members)
    assert 0 < meta["best_threshold"] < 1 and meta["min_area"] in MIN_AREAS and meta["tta"] is True
    assert meta["fit"] == "pad" and all(p.dtype == np.float16 for p in ckpt.params.values())  # stored as float16
    images = np.random.default_rng(0).random((2, 101, 101), dtype=np.float32)  # the competition's size
    probs = np.asarray(probabilities(for_inference(model, threads=1), images, meta["fit"], 0, tta=meta["tta"]))
    assert probs.shape == (2, 101, 101) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
