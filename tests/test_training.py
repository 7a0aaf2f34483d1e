"""The training loop: the run folder, exact resume, determinism, callbacks, NaN and Ctrl-C stops, config errors.

Everything runs on a tiny synthetic set (24 images) with a tiny U-Net (features 2, depth 2, 32 x 32), so a
training run takes about a second.
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tinyunet import training
from tinyunet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyunet.data import DataError
from tinyunet.ensemble import save_ensemble
from tinyunet.layers import sigmoid
from tinyunet.losses import binary_crossentropy, lovasz_hinge
from tinyunet.synth import generate
from tinyunet import prepare
from tinyunet.config import MIN_AREAS, QUICK, ConfigError, TrainConfig, build_config, validate
from tinyunet.losses import LOSSES
from tinyunet.runs import HISTORY_COLUMNS, RunError
from tinyunet.training import TrainingDiverged, TrainingInterrupted, train
from tinyunet.unet import UNet

from helpers import on_reference_kernels, poison_loss

TINY = {"features": 2, "depth": 2, "input_size": 32, "epochs": 2, "progress": False, "plots": False}
PNGS = ("learning_curves.png", "threshold_sweep.png", "val_predictions.png", "coverage.png")


def tiny(data: Path, out: Path, **settings) -> TrainConfig:
    return build_config({"data": str(data), "out": str(out), **TINY, **settings})


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def params_of(path: Path) -> dict:
    return load_checkpoint(path).params


def assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# A run, end to end
# --------------------------------------------------------------------------------------------

def test_tiny_run_writes_the_run_folder(tiny_data, tmp_path):
    run = train(tiny(tiny_data, tmp_path / "runs" / "first", plots=True))
    assert run == tmp_path / "runs" / "first"
    for name in ("best.npz", "last.npz", "history.csv") + PNGS:
        assert (run / name).is_file(), name
        assert (run / name).stat().st_size > 0, name
    assert (tmp_path / "runs" / "latest").read_text().strip() == "first"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary files left

    rows = read_history(run)
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(0 <= float(row["val_score"]) <= 1 for row in rows)

    best = load_checkpoint(run / "best.npz")
    meta = best.meta
    assert 0 <= meta["best_threshold"] <= 1
    assert 0 <= meta["val_score"] <= 1
    assert meta["model"] == {"features": 2, "depth": 2, "dropout": [0.25, 0.3], "in_channels": 1}
    assert (meta["fit"], meta["input_size"], meta["seed"]) == ("resize", 32, 0)
    assert meta["epoch"] in (1, 2)
    assert Path(meta["data"]["path"]).is_absolute() and len(meta["data"]["fingerprint"]) == 16
    assert meta["args"]["epochs"] == 2 and len(meta["history"]) == meta["epoch"]
    assert set(meta["callbacks"]) == {"early_stopping", "model_checkpoint", "reduce_lr"}
    model = UNet(**meta["model"])  # what predict.py does
    model.load_params(best.params)

    last = load_checkpoint(run / "last.npz")
    assert last.meta["epoch"] == 2 and last.optimizer_state["t"] == 2 * 5  # 38 flipped images / 8 = 5 steps
    assert last.meta["best_threshold"] is None


@pytest.mark.parametrize("fit", ["pad", "resize"])
def test_images_of_an_odd_size_train_with_either_fit(tmp_path, fit):
    data = generate(tmp_path / "odd", n_train=10, n_test=1, size=45, seed=1)  # 45 is no multiple of 4
    run = train(tiny(data, tmp_path / "run", fit=fit, epochs=1))
    meta = load_checkpoint(run / "best.npz").meta
    assert meta["fit"] == fit and 0 <= meta["best_threshold"] <= 1


# --------------------------------------------------------------------------------------------
# Determinism and exact resume
# --------------------------------------------------------------------------------------------

def test_resume_is_bit_identical_and_runs_are_deterministic(tiny_data, tmp_path):
    # two threads share every batch (tinyunet.parallel), whatever this machine's core count;
    # the resumed run takes threads=2 from last.npz's settings
    straight = train(tiny(tiny_data, tmp_path / "straight", epochs=4, dropout=(0.2, 0.3), threads=2))
    half = train(tiny(tiny_data, tmp_path / "half", epochs=2, dropout=(0.2, 0.3), threads=2))
    again = train(tiny(tiny_data, tmp_path / "again", epochs=2, dropout=(0.2, 0.3), threads=2))
    assert_same_arrays(params_of(half / "last.npz"), params_of(again / "last.npz"))  # same seed, same weights

    resumed = train(build_config({"resume": str(half), "epochs": 4}))
    assert resumed == half
    a, b = load_checkpoint(straight / "last.npz"), load_checkpoint(half / "last.npz")
    assert_same_arrays(a.params, b.params)
    for key in ("m", "v"):
        assert_same_arrays(a.optimizer_state[key], b.optimizer_state[key])
    assert a.optimizer_state["t"] == b.optimizer_state["t"]
    drop = {"seconds"}
    assert [{k: v for k, v in row.items() if k not in drop} for row in read_history(straight)] == \
           [{k: v for k, v in row.items() if k not in drop} for row in read_history(half)]
    assert load_checkpoint(straight / "best.npz").meta["best_threshold"] == \
           load_checkpoint(half / "best.npz").meta["best_threshold"]


def test_a_different_seed_gives_different_weights(tiny_data, tmp_path):
    a = train(tiny(tiny_data, tmp_path / "a", epochs=1))
    b = train(tiny(tiny_data, tmp_path / "b", epochs=1, seed=1))
    assert not np.array_equal(params_of(a / "last.npz")["head.W"], params_of(b / "last.npz")["head.W"])


def test_resume_of_a_finished_run_only_redoes_the_sweep(tiny_data, tmp_path):
    run = train(tiny(tiny_data, tmp_path / "done", epochs=1))
    before = params_of(run / "last.npz")
    train(build_config({"resume": str(run / "last.npz")}))  # the file works too
    assert_same_arrays(before, params_of(run / "last.npz"))
    assert len(read_history(run)) == 1


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------

def test_early_stopping_and_reduce_lr_are_wired(tiny_data, tmp_path, monkeypatch):
    losses = iter([1.0] + [1.5] * 20)  # improves once, then never again
    monkeypatch.setattr(training, "validate_epoch", lambda model, prep, config, epoch: (next(losses), 0.5, 0.5))
    run = train(tiny(tiny_data, tmp_path / "plateau", epochs=20, patience=3, lr_patience=1, lr_factor=0.5,
                     min_lr=2e-4))
    rows = read_history(run)
    assert len(rows) == 4  # no improvement after epoch 1: patience 3 stops at the end of epoch 4
    assert [float(row["lr"]) for row in rows] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    assert load_checkpoint(run / "last.npz").optimizer_state["lr"] == 2e-4  # floored at min_lr
    assert load_checkpoint(run / "best.npz").meta["epoch"] == 1  # the only improvement
    es = load_checkpoint(run / "last.npz").meta["callbacks"]["early_stopping"]
    assert es["stop_training"] and es["stopped_epoch"] == 3


# --------------------------------------------------------------------------------------------
# Stops: NaN loss, Ctrl-C
# --------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_at_once_and_keeps_the_good_checkpoints(tiny_data, tmp_path, monkeypatch):
    # epoch 1: 5 training batches + 1 validation batch; call 8 is epoch 2, batch 2
    calls = poison_loss(monkeypatch, at_call=8, factor=np.nan)
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as err:
        train(tiny(tiny_data, run, epochs=5))
    message = str(err.value)
    assert "epoch 2, batch 2 of 5" in message and "nan" in message
    assert "last.npz holds epoch 1" in message and "--lr" in message
    assert calls["n"] == 8  # stopped at once
    assert load_checkpoint(run / "best.npz").meta["epoch"] == 1
    assert load_checkpoint(run / "last.npz").meta["epoch"] == 1
    assert len(read_history(run)) == 1


def test_ctrl_c_leaves_a_resumable_run(tiny_data, tmp_path, monkeypatch):
    real = training.validate_epoch
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "validate_epoch", interrupted)
    run = tmp_path / "ctrl-c"
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny(tiny_data, run, epochs=3))
    assert isinstance(err.value, KeyboardInterrupt)
    assert "holds epoch 1" in str(err.value) and f"--resume {run}" in str(err.value)
    assert load_checkpoint(run / "last.npz").meta["epoch"] == 1

    monkeypatch.setattr(training, "validate_epoch", real)
    train(build_config({"resume": str(run)}))
    straight = train(tiny(tiny_data, tmp_path / "straight", epochs=3))
    assert_same_arrays(params_of(run / "last.npz"), params_of(straight / "last.npz"))


# --------------------------------------------------------------------------------------------
# Settings: defaults, validation, resume checks
# --------------------------------------------------------------------------------------------

def test_quick_defaults_apply_only_to_the_synthetic_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = build_config({"epochs": 3})
    assert quick.preset == "quick" and quick.data is None and quick.epochs == 3
    for key, value in QUICK.items():
        if key != "epochs":
            assert getattr(quick, key) == value
    (tmp_path / "data" / "tgs-salt").mkdir(parents=True)
    recipe = build_config({})
    assert recipe.preset == "recipe" and recipe.data == str(Path("data/tgs-salt"))
    assert recipe == TrainConfig(data=recipe.data)
    assert build_config({"data": "elsewhere"}) == TrainConfig(data="elsewhere")


def test_the_synthetic_set_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "SYNTHETIC_SIZE", {"n_train": 6, "n_test": 2})
    said = []
    path = prepare.resolve_data(TrainConfig(), said.append)
    assert path == prepare.SYNTHETIC_DIR and len(list((tmp_path / path / "train/images").iterdir())) == 6
    stamp = (tmp_path / path / "train.csv").stat().st_mtime_ns
    assert prepare.resolve_data(TrainConfig(), said.append) == path
    assert (tmp_path / path / "train.csv").stat().st_mtime_ns == stamp
    assert len(said) == 2  # "generating ..." and "done" once


@pytest.mark.parametrize("settings, flag", [
    ({"batch_size": 0}, "--batch-size"),
    ({"epochs": -1}, "--epochs"),
    ({"epochs": 0}, "--epochs"),
    ({"val_split": 1.0}, "--val-split"),
    ({"val_split": 0}, "--val-split"),
    ({"lr": 0.0}, "--lr"),
    ({"lr": float("nan")}, "--lr"),
    ({"features": 0}, "--features"),
    ({"depth": 0}, "--depth"),
    ({"input_size": 30}, "--input-size"),
    ({"fit": "crop"}, "--fit"),
    ({"patience": -1}, "--patience"),
    ({"lr_factor": 1.5}, "--lr-factor"),
    ({"min_lr": -1.0}, "--min-lr"),
    ({"limit": 1}, "--limit"),
    ({"dropout": (0.5,)}, "--dropout 0.5 "),
    ({"dropout": (0.5, 1.0)}, "--dropout 0.5,1 "),
    ({"threads": 0}, "--threads"),
    ({"threads": 1.5}, "--threads"),
])
def test_invalid_settings_are_one_line_errors(tmp_path, settings, flag):
    config = replace_tiny(tmp_path, **settings)
    with pytest.raises(ConfigError) as err:
        train(config)
    assert flag in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def replace_tiny(tmp_path: Path, **settings) -> TrainConfig:
    return replace(TrainConfig(data=str(tmp_path / "no-data"), out=str(tmp_path / "out"), **TINY), **settings)


def test_output_folder_problems(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot write to the output folder"):
        train(tiny(tiny_data, blocker / "run"))
    with pytest.raises(RunError, match="is a file"):
        train(tiny(tiny_data, blocker))
    run = train(tiny(tiny_data, tmp_path / "taken", epochs=1))
    with pytest.raises(RunError, match="already holds a run.*--resume"):
        train(tiny(tiny_data, run, epochs=1))


def test_missing_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(build_config({"data": str(tmp_path / "nowhere"), "out": str(tmp_path / "run"), **TINY}))


def test_a_resumed_run_shows_the_rate_it_continues_at(tiny_data, tmp_path, capsys):
    run = train(tiny(tiny_data, tmp_path / "run", epochs=1))
    last = load_checkpoint(run / "last.npz")
    state = dict(last.optimizer_state, lr=1e-4)  # as if ReduceLROnPlateau had cut it
    save_checkpoint(run / "last.npz", last.params, last.meta, state)
    capsys.readouterr()
    train(build_config({"resume": str(run), "epochs": 2}))
    out = capsys.readouterr().out
    assert "lr=0.0001 (reduced on plateau from 0.001)" in out
    assert "lr 1.0e-04" in out  # the epoch line: the rate the epoch actually used
    assert "validation competition score" in out  # TGS-like data (101 x 101 gray): the competition's name


def test_resume_checks(tiny_data, tmp_path):
    with pytest.raises(CheckpointError, match="no such run folder"):
        build_config({"resume": str(tmp_path / "nothing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no last.npz"):
        build_config({"resume": str(tmp_path / "empty")})
    run = train(tiny(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="--features 4 differs .*features=2"):
        train(build_config({"resume": str(run), "features": 4}))
    with pytest.raises(ConfigError, match="--out"):
        train(build_config({"resume": str(run), "out": str(tmp_path / "other")}))
    other = generate(tmp_path / "other-data", n_train=10, n_test=1, seed=5)
    with pytest.raises(DataError, match="not the data the run"):
        train(build_config({"resume": str(run), "data": str(other), "epochs": 2}))
    (run / "last.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        build_config({"resume": str(run)})


# --------------------------------------------------------------------------------------------
# Real data (optional)
# --------------------------------------------------------------------------------------------

def _real_data() -> Path | None:
    env = os.environ.get("TINYUNET_TGS_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tgs-salt"
    return path if path.is_dir() else None


@pytest.mark.skipif(_real_data() is None, reason="real TGS data not found (../shared/data/tgs-salt or "
                    "$TINYUNET_TGS_DATA)")
def test_one_epoch_on_a_real_subset(tmp_path):
    run = train(build_config({"data": str(_real_data()), "out": str(tmp_path / "real"), "limit": 16, **TINY,
                              "epochs": 1}))
    meta = load_checkpoint(run / "best.npz").meta
    assert meta["data"]["path"] == str(_real_data().resolve()) and 0 <= meta["best_threshold"] <= 1


# --------------------------------------------------------------------------------------------
# Blocks, losses by epoch, the monitored value, random flips
# --------------------------------------------------------------------------------------------

BN_RUN = {"block": "residual", "flip_mode": "random", "loss": "bce", "loss2": "lovasz", "loss2_epoch": 2,
          "monitor": "val_score", "threads": 2}


def test_a_residual_run_with_two_losses_resumes_bit_identically(tiny_data, tmp_path, monkeypatch, capsys):
    calls = []
    for name in ("bce", "lovasz"):  # count which loss every training and validation batch used
        real = LOSSES[name]
        monkeypatch.setitem(LOSSES, name,
                            lambda logits, target, real=real, name=name: calls.append(name) or real(logits, target))
    straight = train(tiny(tiny_data, tmp_path / "straight", epochs=3, **BN_RUN))
    # 19 training images, not doubled (random flips): 3 batches, then 1 validation batch, per epoch
    assert calls == ["bce"] * 4 + ["lovasz"] * 8

    best = load_checkpoint(straight / "best.npz")
    model = UNet(**best.meta["model"])
    assert best.meta["model"]["block"] == "residual"
    assert list(best.buffers) == list(model.buffers) and "enc1.bn1.moving_mean" in best.buffers
    assert best.buffers["enc1.bn1.moving_mean"].any()  # trained statistics, not the initial zeros
    model.load_params(best.params, best.buffers)  # what predict.py does
    scores = [float(row["val_score"]) for row in read_history(straight)]
    assert best.meta["epoch"] == 1 + scores.index(max(scores))  # monitor=val_score: the highest, first on ties
    assert best.meta["callbacks"]["model_checkpoint"]["best"] == pytest.approx(max(scores))
    # the closing line names the value that chose the best epoch
    assert f"best epoch {best.meta['epoch']} (val_score {max(scores):.4f})" in capsys.readouterr().out

    half = train(tiny(tiny_data, tmp_path / "half", epochs=2, **BN_RUN))
    train(build_config({"resume": str(half), "epochs": 3}))
    a, b = load_checkpoint(straight / "last.npz"), load_checkpoint(half / "last.npz")
    assert b.optimizer_state["t"] == 3 * 3
    assert_same_arrays(a.params, b.params)
    assert_same_arrays(a.buffers, b.buffers)
    for key in ("m", "v"):
        assert_same_arrays(a.optimizer_state[key], b.optimizer_state[key])
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(straight)] == \
           [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(half)]
    assert_same_arrays(best.buffers, load_checkpoint(half / "best.npz").buffers)


def test_epoch_loss_switches_to_the_second_loss():
    two = TrainConfig(loss="bce", loss2="lovasz", loss2_epoch=3)
    assert [training.epoch_loss(two, epoch) for epoch in range(5)] == [binary_crossentropy] * 2 + [lovasz_hinge] * 3
    one = TrainConfig(loss="lovasz", loss2_epoch=2)  # no loss2: loss2_epoch means nothing
    assert all(training.epoch_loss(one, epoch) is lovasz_hinge for epoch in range(4))
    at_once = TrainConfig(loss="bce", loss2="lovasz", loss2_epoch=1)
    assert training.epoch_loss(at_once, 0) is lovasz_hinge


@pytest.mark.parametrize("settings, flag", [
    ({"block": "dense"}, "--block"),
    ({"loss": "dice"}, "--loss"),
    ({"loss2": "dice"}, "--loss2"),
    ({"loss2_epoch": -1}, "--loss2-epoch"),
    ({"monitor": "val_accuracy"}, "--monitor"),
    ({"flip_mode": "sometimes"}, "--flip-mode"),
])
def test_bad_block_loss_monitor_or_flip_mode(tmp_path, settings, flag):
    with pytest.raises(ConfigError) as err:
        validate(replace_tiny(tmp_path, **settings))
    message = str(err.value)
    assert message.startswith(f"{flag} ") and "\n" not in message
    assert repr(next(iter(settings.values()))) in message


# --- schedules, snapshots and their ensemble; TTA and the empty-mask rule -------------------------

def test_cosine_restarts_save_snapshots_and_their_tuned_ensemble(tiny_data, tmp_path, capsys):
    from tinyunet.callbacks import CosineAnnealing
    from tinyunet.ensemble import Ensemble
    from tinyunet.models import load_model

    run = train(tiny(tiny_data, tmp_path / "cos", epochs=4, schedule="cosine", cycle=2, lr=1e-2, min_lr=1e-4,
                     patience=10, tta=True, empty_rule=True))
    out = capsys.readouterr().out
    assert "lr cosine from 0.01 to 0.0001 every 2 epochs" in out and "without improvement" not in out
    history = read_history(run)
    schedule = CosineAnnealing(None, 1e-2, 2, 1e-4)
    assert [float(row["lr"]) for row in history] == [schedule.lr_at(e) for e in range(4)]
    assert schedule.lr_at(0) == 1e-2 and schedule.lr_at(1) == pytest.approx((1e-2 + 1e-4) / 2)
    snapshots = sorted(p.name for p in run.glob("snapshot*.npz"))
    assert snapshots == ["snapshot01.npz", "snapshot02.npz"]
    assert load_checkpoint(run / "snapshot01.npz").meta["epoch"] == 2
    ensemble, ckpt = load_model(run / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    assert ckpt.meta["tta"] is True and ckpt.meta["min_area"] in MIN_AREAS
    best = load_checkpoint(run / "best.npz").meta
    assert best["tta"] is True and isinstance(best["min_area"], int)
    # the ensemble's probability is the mean of its members'
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    members = [load_model(run / name)[0] for name in snapshots]
    mean = sum(m.predict(x) for m in members) / 2
    np.testing.assert_allclose(sigmoid(ensemble.forward(x)), mean, rtol=1e-5, atol=1e-6)


def test_ensemble_size_averages_only_the_last_snapshots(tiny_data, tmp_path, capsys):
    from tinyunet.models import load_model

    run = train(tiny(tiny_data, tmp_path / "last2", epochs=3, schedule="cosine", cycle=1, lr=1e-2, min_lr=1e-4,
                     patience=10, ensemble_size=2))
    assert sorted(p.name for p in run.glob("snapshot*.npz")) == ["snapshot01.npz", "snapshot02.npz",
                                                                 "snapshot03.npz"]
    assert "ensemble of 2 snapshots (snapshot02.npz, snapshot03.npz)" in capsys.readouterr().out
    ensemble, ckpt = load_model(run / "ensemble.npz")
    assert ckpt.meta["member_epochs"] == [2, 3]
    x = np.random.default_rng(1).random((2, 32, 32, 1)).astype(np.float32)
    mean = sum(load_model(run / name)[0].predict(x) for name in ("snapshot02.npz", "snapshot03.npz")) / 2
    np.testing.assert_allclose(sigmoid(ensemble.forward(x)), mean, rtol=1e-5, atol=1e-6)
    for bad, message in ((1, r"^--ensemble-size 1 is invalid: give 2 or more"),
                         (-3, r"^--ensemble-size -3 is invalid")):
        with pytest.raises(ConfigError, match=message):
            validate(replace_tiny(tmp_path, schedule="cosine", ensemble_size=bad))
    with pytest.raises(ConfigError, match=r"^--ensemble-size needs --schedule cosine"):
        validate(replace_tiny(tmp_path, ensemble_size=2))


def test_restart_optimizer_resets_adam_at_each_restart_and_resumes_bit_identically(tiny_data, tmp_path, capsys):
    cosine = {"epochs": 4, "schedule": "cosine", "cycle": 2, "lr": 1e-2, "min_lr": 1e-4, "patience": 10}
    plain = train(tiny(tiny_data, tmp_path / "plain", **cosine))
    straight = train(tiny(tiny_data, tmp_path / "straight", restart_optimizer=True, **cosine))
    assert "Adam reset at each restart" in capsys.readouterr().out
    steps = load_checkpoint(plain / "last.npz").optimizer_state["t"]
    assert steps % 4 == 0 and load_checkpoint(straight / "last.npz").optimizer_state["t"] == steps // 2
    # the first cycle is the plain run's, bit for bit; the second starts from a new Adam
    assert_same_arrays(params_of(plain / "snapshot01.npz"), params_of(straight / "snapshot01.npz"))
    assert not np.array_equal(params_of(plain / "last.npz")["head.W"], params_of(straight / "last.npz")["head.W"])
    # stopped at the restart, resumed: the reset happens in the resumed run, and nothing differs
    half = train(tiny(tiny_data, tmp_path / "half", restart_optimizer=True, **{**cosine, "epochs": 2}))
    train(build_config({"resume": str(half), "epochs": 4}))
    a, b = load_checkpoint(straight / "last.npz"), load_checkpoint(half / "last.npz")
    assert_same_arrays(a.params, b.params)
    for key in ("m", "v"):
        assert_same_arrays(a.optimizer_state[key], b.optimizer_state[key])
    assert a.optimizer_state["t"] == b.optimizer_state["t"]
    with pytest.raises(ConfigError, match=r"^--restart-optimizer needs --schedule cosine"):
        validate(replace_tiny(tmp_path, restart_optimizer=True))


def test_the_empty_rule_and_tta_are_tuned_on_validation(tiny_data, tmp_path):
    """best.npz records the minimum area and threshold that score the (TTA) validation probabilities best."""
    from tinyunet.metrics import competition_score, drop_small
    from tinyunet.models import load_model
    from tinyunet.pipeline import probabilities

    run = train(tiny(tiny_data, tmp_path / "rule", epochs=2, tta=True, empty_rule=True))
    model, ckpt = load_model(run / "best.npz")
    config = build_config({"data": str(tiny_data), **TINY})
    prep = prepare.prepare_data(config, tiny_data, np, np.float32)
    probs = probabilities(model, prep.val_images, "resize", 32, tta=True)
    meta = ckpt.meta
    chosen = competition_score(prep.val_truth, drop_small(probs > np.float32(meta["best_threshold"]),
                                                          meta["min_area"]))
    assert chosen == pytest.approx(meta["val_score"])
    for area in MIN_AREAS:  # no other area does better at any threshold of the sweep
        for t in meta["threshold_sweep"]["thresholds"]:
            assert competition_score(prep.val_truth, drop_small(probs > np.float32(t), area)) <= chosen + 1e-12


def test_recipe_best_names_the_measured_recipe():
    config = build_config({"preset": "best", "data": "somewhere", "epochs": 3})
    assert config.block == "residual" and config.loss2 == "lovasz" and config.tta and config.empty_rule
    assert config.epochs == 3  # flags still override it
    assert build_config({"data": "somewhere"}) == TrainConfig(data="somewhere")  # the seed recipe, untouched


def test_recipe_finetune_continues_a_model_with_the_measured_second_stage(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--recipe finetune continues a trained model: give --init"):
        build_config({"preset": "finetune", "data": "somewhere"})
    first = train(tiny(tiny_data, tmp_path / "first", epochs=1, block="residual", fit="pad", features=3,
                       dropout=(0.1, 0.2)))
    config = build_config({"preset": "finetune", "data": str(tiny_data), "init": str(first / "best.npz"),
                           "epochs": 8})
    assert (config.features, config.block, config.fit, config.dropout) == (3, "residual", "pad", (0.1, 0.2))
    assert (config.loss, config.loss2, config.schedule, config.cycle, config.lr) == ("lovasz", None, "cosine", 12, 2e-4)
    assert (config.ensemble_size, config.patience) == (4, 60)  # the last 4 of 5 snapshots; no early stop
    assert config.augment and config.tta and config.empty_rule and config.monitor == "val_score"
    assert config.epochs == 8  # flags still override it
    # another schedule takes the preset's cosine-only settings with it, unless they are given too
    plateau = build_config({"preset": "finetune", "data": str(tiny_data), "init": str(first / "best.npz"),
                            "schedule": "plateau"})
    validate(plateau)
    assert (plateau.schedule, plateau.ensemble_size, plateau.loss, plateau.lr) == ("plateau", 0, "lovasz", 2e-4)
    with pytest.raises(ConfigError, match=r"^--ensemble-size needs --schedule cosine"):
        validate(build_config({"preset": "finetune", "data": str(tiny_data), "init": str(first / "best.npz"),
                               "schedule": "plateau", "ensemble_size": 3}))


# The SHA-256 of last.npz's parameters (name, then bytes, in order) after the run below, computed with the
# code before the block redesign (commit fad8ddf): the redesign must leave the seed recipe's numbers alone.
# (with OpenBLAS's Haswell kernels: helpers.on_reference_kernels)
SEED_RUN_SHA256 = "accdec9f6823fc9ad7b79abd80d127b14136d6c039080f63030249a9863f03f5"


@pytest.mark.skipif(_real_data() is None, reason="real TGS data not found (../shared/data/tgs-salt or "
                    "$TINYUNET_TGS_DATA)")
def test_the_seed_recipe_trains_bit_identically_to_before_the_redesign(tmp_path, request):
    import hashlib

    if not on_reference_kernels(request):
        return  # it ran, and passed, in a process under the reference's BLAS kernels
    run = train(build_config({"data": str(_real_data()), "out": str(tmp_path / "seed"), "limit": 48, "epochs": 2,
                              "threads": 1, "progress": False, "plots": False}))
    digest = hashlib.sha256()
    for name, value in load_checkpoint(run / "last.npz").params.items():
        digest.update(("param/" + name).encode())
        digest.update(value.tobytes())
    assert digest.hexdigest() == SEED_RUN_SHA256


def test_a_checkpoint_from_before_the_redesign_predicts_exactly_as_then(request):
    """tests/fixtures/seed_v1_tiny.npz and the probabilities it gave were written by the code of fad8ddf."""
    from tinyunet.models import load_model

    if not on_reference_kernels(request):
        return
    model, _ = load_model(Path(__file__).parent / "fixtures" / "seed_v1_tiny.npz")
    saved = np.load(Path(__file__).parent / "fixtures" / "seed_v1_tiny_io.npz")
    np.testing.assert_array_equal(model.predict(saved["x"]), saved["probs"])


# --- k-fold cross-validation ------------------------------------------------------------------------

def test_stratified_folds_cover_every_image_once_and_keep_the_classes():
    from tinyunet.data import stratified_folds

    classes = np.random.default_rng(2).integers(0, 11, size=103)
    folds = stratified_folds(classes, 5, seed=1)
    vals = np.concatenate([val for _, val in folds])
    assert sorted(vals.tolist()) == list(range(103))  # every index validated exactly once
    assert {len(val) for _, val in folds} <= {20, 21}
    for train_idx, val_idx in folds:
        assert np.intersect1d(train_idx, val_idx).size == 0 and len(train_idx) + len(val_idx) == 103
        for label in np.unique(classes):  # each class spread evenly over the folds
            assert abs((classes[val_idx] == label).sum() - (classes == label).sum() / 5) < 1
    with pytest.raises(ValueError, match="folds"):
        stratified_folds(classes[:3], 5)


def test_folds_train_one_run_each_and_tune_on_out_of_fold_predictions(tiny_data, tmp_path):
    import json

    from tinyunet.ensemble import Ensemble
    from tinyunet.folds import train_folds
    from tinyunet.metrics import competition_score
    from tinyunet.models import load_model
    from tinyunet.pipeline import probabilities

    root = train_folds(tiny(tiny_data, tmp_path / "cv", folds=3, epochs=1))
    cv = json.loads((root / "cv.json").read_text())
    ensemble, ckpt = load_model(root / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 3 and len(cv["fold_scores"]) == 3
    # the CV score is the score of every image predicted by the one fold model that did not train on it
    config = build_config({"data": str(tiny_data), **TINY, "folds": 3})
    oof, truth = [], []
    for k in range(3):
        model, _ = load_model(root / f"fold{k + 1}" / "best.npz")
        prep = prepare.prepare_data(replace(config, fold=k), tiny_data, np, np.float32)
        oof.append(probabilities(model, prep.val_images, "resize", 32))
        truth.append(prep.val_truth)
    score = competition_score(np.concatenate(truth), np.concatenate(oof) > np.float32(ckpt.meta["best_threshold"]))
    assert score == pytest.approx(cv["cv_score"]) and ckpt.meta["val_score"] == cv["cv_score"]
    # run again: every fold is finished, nothing is trained twice
    mtime = (root / "fold1" / "best.npz").stat().st_mtime_ns
    train_folds(tiny(tiny_data, tmp_path / "cv", folds=3, epochs=1))
    assert (root / "fold1" / "best.npz").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------------------------
# Fine-tuning: --init
# --------------------------------------------------------------------------------------------

def test_init_starts_from_the_checkpoint_with_a_fresh_optimizer_and_its_own_settings(tiny_data, tmp_path,
                                                                                     monkeypatch):
    first = train(tiny(tiny_data, tmp_path / "first", epochs=1, block="residual", fit="pad", features=3))
    start = load_checkpoint(first / "best.npz")
    seen = {}
    real_epoch = training.train_epoch

    def spy(net, optimizer, *args):
        if not seen:  # the weights the first step of the fine-tune starts from
            seen.update({name: a.copy() for name, a in {**net.model.params, **net.model.buffers}.items()})
        return real_epoch(net, optimizer, *args)

    monkeypatch.setattr(training, "train_epoch", spy)
    config = build_config({"data": str(tiny_data), "out": str(tmp_path / "tuned"), "init": str(first / "best.npz"),
                           "epochs": 2, "loss": "lovasz", "progress": False, "plots": False})
    assert (config.features, config.depth, config.block, config.fit) == (3, 2, "residual", "pad")  # the file's
    tuned = train(config)
    assert list(seen) == [*start.params, *start.buffers]
    for name, value in {**start.params, **start.buffers}.items():
        np.testing.assert_array_equal(seen[name], value, err_msg=name)
    last = load_checkpoint(tuned / "last.npz")
    assert [row["epoch"] for row in read_history(tuned)] == ["1", "2"]  # epochs count from 1 again
    steps_per_epoch = load_checkpoint(first / "last.npz").optimizer_state["t"]  # its one epoch
    assert last.optimizer_state["t"] == 2 * steps_per_epoch  # Adam's moments start afresh
    assert last.meta["args"]["init"] == str(first / "best.npz")
    resumed = train(build_config({"resume": str(tuned), "epochs": 3}))  # a fine-tune resumes like any run
    assert len(read_history(resumed)) == 3


def test_init_refuses_what_it_cannot_start_from(tiny_data, tmp_path, capsys):
    first = train(tiny(tiny_data, tmp_path / "first", epochs=1))
    best = str(first / "best.npz")
    with pytest.raises(CheckpointError, match="does not fit this model.*features"):
        train(tiny(tiny_data, tmp_path / "wider", init=best, features=4))
    assert not (tmp_path / "wider").exists()
    with pytest.raises(ConfigError, match="--init and --resume"):
        build_config({"resume": str(first), "init": best})
    member = load_checkpoint(best)
    ensemble = save_ensemble(tmp_path / "ensemble.npz", [member, member], {"fit": "resize", "input_size": 32})
    with pytest.raises(CheckpointError, match="ensemble of 2 models; give --init one model"):
        build_config({"data": str(tiny_data), "init": str(ensemble)})
    with pytest.raises(CheckpointError):
        build_config({"data": str(tiny_data), "init": str(tmp_path / "missing.npz")})
    capsys.readouterr()
    train(tiny(tiny_data, tmp_path / "moved", init=best, epochs=1, seed=1))
    out = capsys.readouterr().out
    assert "another split (--seed 0)" in out and "optimistic" in out
    train(tiny(tiny_data, tmp_path / "same", init=best, epochs=1))
    assert "optimistic" not in capsys.readouterr().out
