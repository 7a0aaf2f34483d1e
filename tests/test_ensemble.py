"""Ensembles end to end: a cosine run's snapshots -> ensemble.npz -> predict.py's submission and --evaluate,
with the recorded TTA and empty-mask rule applied."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.checkpoint import load_checkpoint
from tinyunet.ensemble import Ensemble, split_members
from tinyunet.layers import sigmoid
from tinyunet.metrics import drop_small
from tinyunet.models import load_model
from tinyunet.pipeline import probabilities
from tinyunet.prediction import predict
from tinyunet.config import build_config
from tinyunet.training import train
from tinyunet.unet import UNet

TINY = {"features": 2, "depth": 2, "input_size": 32, "progress": False, "plots": False}


@pytest.fixture(scope="module")
def cosine_run(tiny_data, tmp_path_factory):
    return train(build_config({"data": str(tiny_data), "out": str(tmp_path_factory.mktemp("cos") / "run"), **TINY,
                               "epochs": 4, "schedule": "cosine", "cycle": 2, "lr": 1e-2, "patience": 10,
                               "tta": True, "empty_rule": True}))


def test_an_ensemble_forward_is_the_logit_of_its_members_mean_probability():
    members = [UNet(features=2, depth=2, seed=s) for s in (1, 2, 3)]
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    mean = sum(sigmoid(m.forward(x)) for m in members) / 3
    np.testing.assert_allclose(sigmoid(Ensemble(members).forward(x)), mean, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="only predicts"):
        Ensemble(members).forward(x, train=True)
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


def test_predict_with_an_ensemble_applies_its_tta_threshold_and_empty_rule(cosine_run, tiny_data, tmp_path):
    model, ckpt = load_model(cosine_run / "ensemble.npz")
    assert ckpt.meta["member_epochs"] == [2, 4] and "epoch" not in ckpt.meta  # no one epoch is the ensemble's
    out, said = tmp_path / "sub", []
    result = predict(model=cosine_run / "ensemble.npz", data=tiny_data, out=out, progress=False, log=said.append)
    assert "an ensemble of 2 (epochs 2, 4)" in said[0] and ", epoch " not in said[0]
    from tinyunet.data import load_test

    ids, images = load_test(tiny_data)
    expected = probabilities(model, images, ckpt.meta["fit"], ckpt.meta["input_size"], tta=True)
    np.testing.assert_allclose(result.probs, expected, rtol=1e-6, atol=1e-7)
    masks = drop_small(expected > np.float32(ckpt.meta["best_threshold"]), ckpt.meta["min_area"])
    np.testing.assert_array_equal(result.masks, masks)
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,rle_mask" and len(lines) == 1 + len(ids)
    report = predict(model=cosine_run / "ensemble.npz", data=tiny_data, out=tmp_path / "eval.csv", evaluate=True,
                     progress=False, log=lambda m: None).report
    assert report.threshold == ckpt.meta["best_threshold"]


def test_split_members_keeps_every_member_whatever_member_epochs_records(cosine_run):
    """An ensemble file's member_epochs is data: a file written before it existed, or with it cut short,
    still gives every member, with the epochs it does record."""
    ckpt = load_checkpoint(cosine_run / "ensemble.npz")
    assert [m.meta["epoch"] for m in split_members(ckpt)] == [2, 4]
    for recorded, expected in (([2], [2, None]), (None, [None, None])):
        ckpt.meta["member_epochs"] = recorded
        members = split_members(ckpt)
        assert len(members) == 2 and [m.meta.get("epoch") for m in members] == expected
