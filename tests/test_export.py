"""Exporting a model for shipping: what predict needs, float16 optional, loaded back as float32."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyunet.export import export, main
from tinyunet.models import load_model
from tinyunet.unet import UNet


def _saved_residual(path):
    model = UNet(features=2, depth=2, block="residual", seed=1)
    rng = np.random.default_rng(0)
    for value in model.buffers.values():  # trained-looking statistics, so that they matter
        value[...] = rng.random(value.shape).astype(np.float32) + 0.5
    meta = {"model": model.config, "fit": "resize", "input_size": 16, "best_threshold": 0.4, "min_area": 10,
            "tta": True, "history": [{"epoch": 1}], "callbacks": {"x": {}}, "args": {"seed": 0}}
    save_checkpoint(path, model.params, meta, {"lr": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                                               "t": 0, "m": {}, "v": {}}, model.buffers)
    return model


def test_export_keeps_what_predict_needs_and_float16_predicts_alike(tmp_path):
    model = _saved_residual(tmp_path / "best.npz")
    export(tmp_path / "best.npz", tmp_path / "ship" / "model.npz", float16=True)
    shipped = load_checkpoint(tmp_path / "ship" / "model.npz")
    assert {a.dtype for a in (*shipped.params.values(), *shipped.buffers.values())} == {np.dtype(np.float16)}
    assert "history" not in shipped.meta and "callbacks" not in shipped.meta and shipped.optimizer_state is None
    assert shipped.meta["min_area"] == 10 and shipped.meta["tta"] is True and shipped.meta["args"] == {"seed": 0}
    loaded, _ = load_model(tmp_path / "ship" / "model.npz")
    assert loaded.dtype == np.float32  # widened back: the network computes as trained
    x = np.random.default_rng(2).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=2e-3)
    exact, _ = load_model(export(tmp_path / "best.npz", tmp_path / "exact.npz"))
    np.testing.assert_array_equal(exact.predict(x), model.predict(x))


def test_export_refuses_to_overwrite_its_source_and_bad_files(tmp_path, capsys):
    _saved_residual(tmp_path / "best.npz")
    with pytest.raises(CheckpointError, match="being exported"):
        export(tmp_path / "best.npz", tmp_path / "best.npz")
    (tmp_path / "junk.npz").write_text("not a model")
    assert main([str(tmp_path / "junk.npz"), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "out.npz").exists()
