"""Exporting a model for shipping: what predict needs, float16 optional, loaded back as float32."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyunet.config import init_settings
from tinyunet.ensemble import save_ensemble
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


def test_member_writes_one_model_of_an_ensemble_that_init_and_predict_take(tmp_path, capsys):
    first, second = _saved_residual(tmp_path / "a.npz"), UNet(features=2, depth=2, block="residual", seed=7)
    meta = load_checkpoint(tmp_path / "a.npz").meta
    save_checkpoint(tmp_path / "b.npz", second.params, {**meta, "epoch": 9}, buffers=second.buffers)
    both = [load_checkpoint(tmp_path / name) for name in ("a.npz", "b.npz")]
    save_ensemble(tmp_path / "pair.npz", both, {**meta, "val_score": 0.5})
    export(tmp_path / "pair.npz", tmp_path / "second.npz", float16=True, member=2)
    alone = load_checkpoint(tmp_path / "second.npz")
    assert not {"members", "member_epochs", "val_score"} & set(alone.meta) and alone.meta["epoch"] == 9  # its own
    assert alone.meta["member"] == {"of": str(load_checkpoint(tmp_path / "pair.npz").path), "index": 2, "count": 2}
    assert alone.meta["best_threshold"] == 0.4 and set(alone.params) == set(second.params)
    loaded, _ = load_model(tmp_path / "second.npz")
    x = np.random.default_rng(3).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), second.predict(x), atol=2e-3)  # the second, not the first
    assert not np.allclose(loaded.predict(x), first.predict(x), atol=2e-3)
    assert init_settings(str(tmp_path / "second.npz"))["block"] == "residual"  # --init takes it
    for k, why in ((3, "out of range: .* ensemble of 2 models"), (0, "out of range")):
        with pytest.raises(CheckpointError, match=why):
            export(tmp_path / "pair.npz", tmp_path / "x.npz", member=k)
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "x.npz"), "--member", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an ensemble" in err[0] and not (tmp_path / "x.npz").exists()
