"""predict.py and tinyunet.evaluation: the submission, the flags, the evaluation report, bad input.

Most tests use an "identity" U-Net whose weights are set by hand so that its salt probability is
``sigmoid(K * (pixel - 0.5))``: with ``fit="pad"`` (pure padding and cropping, no resampling) the
predicted mask is exactly ``image > 0.5``, so every submission can be checked pixel by pixel. Images
are tiny and the models have 2 features and 2 levels, so the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet import prediction
from tinyunet.checkpoint import CheckpointError, save_checkpoint
from tinyunet.cli import predict_main, predict_parser
from tinyunet.data import DataError, fingerprint, load_train
from tinyunet.evaluation import Report, evaluate
from tinyunet.prediction import choose_threshold, predict, write_submission
from tinyunet.rle import rle_decode, rle_encode
from tinyunet.unet import UNet

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = ROOT / "predict.py"
K = 10.0  # slope of the identity model's logit: p = sigmoid(K * (x - 0.5))
FEATURES, DEPTH, DROPOUT = 2, 2, (0.25, 0.3)


def quiet(_line: str) -> None:
    """A ``log`` for predict() that prints nothing."""


# ------------------------------------------------------------------------------------------------
# Helpers: data folders and checkpoints
# ------------------------------------------------------------------------------------------------

def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


def make_data(root: Path, test: dict[str, np.ndarray] | None = None,
              train: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Kaggle's layout: test/images/<id>.png and train/images + train/masks (uint8 arrays)."""
    for image_id, pixels in (test or {}).items():
        write_png(root / "test" / "images" / f"{image_id}.png", pixels)
    for image_id, (pixels, mask) in (train or {}).items():
        write_png(root / "train" / "images" / f"{image_id}.png", pixels)
        write_png(root / "train" / "masks" / f"{image_id}.png", np.where(mask, 255, 0))
    return root


def identity_params() -> dict[str, np.ndarray]:
    """Weights of a features=2, depth=2 U-Net whose logit is ``K * (x - 0.5)``.

    The input passes through the centre taps of enc1's two convs (ReLU keeps x >= 0), the skip into
    dec1 (channel FEATURES of the concat [up, skip]), dec1's two convs, and the 1x1 head. Every other
    weight is zero, so the deeper levels add nothing.
    """
    model = UNet(features=FEATURES, depth=DEPTH, dropout=DROPOUT)
    params = {name: np.zeros_like(a) for name, a in model.params.items()}
    params["enc1.conv1.W"][1, 1, 0, 0] = 1
    params["enc1.conv2.W"][1, 1, 0, 0] = 1
    params["dec1.conv1.W"][1, 1, FEATURES, 0] = 1  # the skip's first channel
    params["dec1.conv2.W"][1, 1, 0, 0] = 1
    params["head.W"][0, 0, 0, 0] = K
    params["head.b"][0] = -K / 2
    return params


def random_params(seed: int = 3) -> dict[str, np.ndarray]:
    return dict(UNet(features=FEATURES, depth=DEPTH, dropout=DROPOUT, seed=seed).params)


def save_model(path: Path, data: Path | str | None, params=None, fit: str = "pad",
               input_size: int = 32, best_threshold: float | None = 0.5,
               data_fingerprint: str = "0" * 16, **meta_extra) -> Path:
    """A checkpoint as train.py writes it, for a tiny U-Net."""
    model = UNet(features=FEATURES, depth=DEPTH, dropout=DROPOUT)
    meta = {
        "model": model.config, "fit": fit, "input_size": input_size, "epoch": 1,
        "best_threshold": best_threshold, "val_score": 0.5,
        "data": {"path": str(data) if data is not None else None, "fingerprint": data_fingerprint},
        "args": {}, "history": [], "seed": 0,
    }
    meta.update(meta_extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, params if params is not None else identity_params(), meta)


def read_submission(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.fixture
def pattern_data(tmp_path):
    """Four 101x101 test images (one blank, one full, two shapes); the truth is pixels > 127."""
    rng = np.random.default_rng(0)
    blank = np.zeros((101, 101), np.uint8)
    full = np.full((101, 101), 255, np.uint8)
    box = np.zeros((101, 101), np.uint8)
    box[10:20, 3:5] = 200  # rows 10..19 of columns 3 and 4
    noisy = np.where(rng.random((101, 101)) < 0.3, 230, 20).astype(np.uint8)
    test = {"b0blank": blank, "a1full": full, "c2box": box, "d3noise": noisy}
    return make_data(tmp_path / "data", test=test), test


# ------------------------------------------------------------------------------------------------
# The submission
# ------------------------------------------------------------------------------------------------

def test_identity_model_computes_its_formula():
    """The hand-set weights really give p = sigmoid(K (x - 0.5)) (the premise of the tests below)."""
    from tinyunet.pipeline import probabilities

    model = UNet(features=FEATURES, depth=DEPTH, dropout=DROPOUT)
    model.load_params(identity_params())
    x = np.random.default_rng(1).random((3, 13, 10)).astype(np.float32)
    p = probabilities(model, x, "pad", 0)
    np.testing.assert_allclose(p, sigmoid(K * (x - 0.5)), rtol=1e-5)


def test_submission_format_and_round_trip(tmp_path, pattern_data):
    data, test = pattern_data
    out = tmp_path / "sub"
    result = predict(model=save_model(tmp_path / "m.npz", data), out=out, progress=False, log=quiet)
    header, rows = read_submission(out / "submission.csv")
    assert header == ["id", "rle_mask"]
    assert [row[0] for row in rows] == sorted(test)  # every image once, ids as in the file names
    assert all(len(row) == 2 for row in rows)
    for image_id, rle in rows:
        truth = test[image_id] > 127
        np.testing.assert_array_equal(rle_decode(rle, (101, 101)), truth, err_msg=image_id)
        assert rle == rle_encode(truth)
    by_id = dict(rows)
    assert by_id["b0blank"] == ""  # no salt: an empty string
    assert by_id["a1full"] == "1 10201"
    assert by_id["c2box"] == "314 10 415 10"  # column 3 starts at pixel 3 * 101 + 1; row 10 adds 10
    assert result.submission == out / "submission.csv" and result.masks.dtype == bool
    assert result.masks.shape == (4, 101, 101) and result.probs.shape == (4, 101, 101)
    assert result.images_per_s > 0
    assert (out / "preview.png").is_file() and result.preview == out / "preview.png"


def test_empty_cell_reads_back_as_no_salt(tmp_path, pattern_data):
    """The raw file: header line, 'id,' for an empty mask, Unix newlines."""
    data, _ = pattern_data
    out = tmp_path / "sub"
    predict(model=save_model(tmp_path / "m.npz", data), out=out, progress=False, log=quiet)
    lines = (out / "submission.csv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "id,rle_mask" and lines[-1] == ""
    assert "b0blank," in lines and "a1full,1 10201" in lines
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def test_threshold_flag_checkpoint_and_default(tmp_path):
    ramp = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (8, 1))  # (8, 52): 0, 5, ..., 255
    data = make_data(tmp_path / "data", test={"ramp": ramp})
    x = ramp.astype(np.float64) / 255
    cases = [  # (--threshold, checkpoint's best_threshold, expected threshold, source)
        (0.9, 0.5, 0.9, "--threshold"),
        (None, 0.2, 0.2, "from the checkpoint"),
        (None, None, 0.5, "default"),
        (0.0, 0.5, 0.0, "--threshold"),
    ]
    lines = []
    for i, (flag, best, expected, source) in enumerate(cases):
        model = save_model(tmp_path / f"m{i}.npz", data, best_threshold=best)
        result = predict(model=model, out=tmp_path / f"s{i}.csv", threshold=flag, kaggle_csv=True,
                         progress=False, log=lines.append)
        assert result.threshold == expected and result.threshold_source == source
        # p > t  <=>  x > 0.5 + logit(t) / K; no pixel value lies within 1e-3 of that edge
        edge = 0.5 + (math.log(expected / (1 - expected)) / K if 0 < expected < 1 else -math.inf)
        assert np.abs(x - edge).min() > 1e-3
        np.testing.assert_array_equal(result.masks[0], x > edge)
        _, rows = read_submission(tmp_path / f"s{i}.csv" / "submission.csv")
        np.testing.assert_array_equal(rle_decode(rows[0][1], ramp.shape), x > edge)
    assert any("records no best threshold" in line and "0.5" in line for line in lines)


def test_choose_threshold_rejects_a_bad_recorded_threshold():
    with pytest.raises(CheckpointError, match="best_threshold"):
        choose_threshold(None, {"best_threshold": 1.5})
    with pytest.raises(CheckpointError, match="best_threshold"):
        choose_threshold(None, {"best_threshold": "high"})
    assert choose_threshold(0.3, {"best_threshold": 0.9}) == (0.3, "--threshold")


def test_tta_is_mirror_symmetric(tmp_path):
    """With --tta, the mirrored image gets the mirrored prediction (a model that is not symmetric)."""
    rng = np.random.default_rng(5)
    images = {f"i{k}": (rng.random((101, 101)) * 255).astype(np.uint8) for k in range(3)}
    plain = make_data(tmp_path / "plain", test=images)
    mirrored = make_data(tmp_path / "mirror", test={k: v[:, ::-1] for k, v in images.items()})
    model = save_model(tmp_path / "m.npz", None, params=random_params(), fit="resize",
                       input_size=32, best_threshold=0.5)
    a = predict(model=model, data=plain, out=tmp_path / "a.csv", tta=True, progress=False, log=quiet)
    b = predict(model=model, data=mirrored, out=tmp_path / "b.csv", tta=True, progress=False, log=quiet)
    np.testing.assert_allclose(b.probs, a.probs[:, :, ::-1], atol=1e-6)
    clear = np.abs(a.probs[:, :, ::-1] - 0.5) > 1e-5  # pixels not on the threshold itself
    np.testing.assert_array_equal(b.masks[clear], a.masks[:, :, ::-1][clear])
    assert 0 < a.masks.mean() < 1  # the check is not vacuous
    # and TTA changed something: the random model itself is not symmetric
    c = predict(model=model, data=plain, out=tmp_path / "c.csv", progress=False, log=quiet)
    assert np.abs(c.probs - a.probs).max() > 1e-4


def test_tta_is_mirror_symmetric_with_odd_padding(tmp_path):
    from tinyunet.pipeline import probabilities

    model = UNet(features=FEATURES, depth=DEPTH, dropout=DROPOUT, seed=3)
    x = np.random.default_rng(0).random((2, 13, 13)).astype(np.float32)  # 13 -> 16: pad 1 + 2
    p = probabilities(model, x, "pad", 0, tta=True)
    q = probabilities(model, np.ascontiguousarray(x[:, :, ::-1]), "pad", 0, tta=True)
    np.testing.assert_allclose(q, p[:, :, ::-1], atol=1e-6)


def test_save_masks(tmp_path, pattern_data):
    data, test = pattern_data
    result = predict(model=save_model(tmp_path / "m.npz", data), out=tmp_path / "s",
                     save_masks=True, progress=False, log=quiet)
    folder = tmp_path / "s" / "masks"
    assert result.masks_dir == folder
    assert sorted(os.listdir(folder)) == sorted(f"{i}.png" for i in test)
    for image_id, pixels in test.items():
        with Image.open(folder / f"{image_id}.png") as img:
            assert img.mode == "L" and img.size == (101, 101)
            saved = np.asarray(img)
        assert set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved == 255, pixels > 127)


def test_any_image_size_512(tmp_path):
    """512x512 test images go through both fits and come back at 512x512."""
    yy, xx = np.mgrid[:512, :512]
    big = {"big0": np.where((yy - 200) ** 2 + (xx - 300) ** 2 < 120 ** 2, 240, 30).astype(np.uint8),
           "big1": np.where(np.arange(512)[None, :] < 300, 250, 10).repeat(512, 0).astype(np.uint8)}
    data = make_data(tmp_path / "data", test=big)
    for fit in ("resize", "pad"):
        out = tmp_path / fit
        result = predict(model=save_model(tmp_path / f"{fit}.npz", data, fit=fit, input_size=32),
                         out=out, batch_size=1, kaggle_csv=True, progress=False, log=quiet)
        assert result.probs.shape == (2, 512, 512)
        _, rows = read_submission(out / "submission.csv")
        decoded = np.stack([rle_decode(rle, (512, 512)) for _, rle in rows])
        np.testing.assert_array_equal(decoded, result.masks)
        for k, image_id in enumerate(sorted(big)):  # exact with pad, off near the edges with resize
            wrong = (result.masks[k] != (big[image_id] > 127)).mean()
            assert wrong == 0 if fit == "pad" else wrong < 0.01, (fit, image_id, wrong)


def test_batch_size_does_not_change_the_result(tmp_path):
    rng = np.random.default_rng(4)
    data = make_data(tmp_path / "data", test={f"i{k}": (rng.random((20, 24)) * 255).astype(np.uint8)
                                              for k in range(5)})
    model = save_model(tmp_path / "m.npz", data, params=random_params(), fit="resize")
    one = predict(model=model, out=tmp_path / "a.csv", batch_size=1, progress=False, log=quiet)
    all_ = predict(model=model, out=tmp_path / "b.csv", batch_size=64, progress=False, log=quiet)
    np.testing.assert_allclose(one.probs, all_.probs, atol=1e-6)


def test_competition_zip(tmp_path, pattern_data):
    """--data may be a zip of the layout (read in place)."""
    import zipfile

    data, test = pattern_data
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image_id in test:
            zf.write(data / "test" / "images" / f"{image_id}.png", f"test/images/{image_id}.png")
    out = tmp_path / "z"
    predict(model=save_model(tmp_path / "m.npz", None), data=archive, out=out, progress=False,
            log=quiet)
    assert dict(read_submission(out / "submission.csv")[1])["c2box"] == "314 10 415 10"


def seven_images(root: Path) -> Path:
    """Seven 101x101 noise images with masks (Kaggle's layout): more than a few chunks of two."""
    rng = np.random.default_rng(7)
    pictures = {f"i{k}": (rng.integers(0, 256, (101, 101)), rng.random((101, 101)) < 0.4) for k in range(7)}
    return make_data(root, test={i: pixels for i, (pixels, _) in pictures.items()}, train=pictures)


def test_chunked_prediction_writes_what_one_chunk_does(tmp_path):
    """Chunks of two images give byte-identical outputs (CSV, masks, overlays, scores) to one chunk of all."""
    data = seven_images(tmp_path / "data")
    model = save_model(tmp_path / "m.npz", data, params=random_params())
    outputs = {}
    for chunk in (2, prediction.CHUNK):
        out = tmp_path / f"chunk{chunk}"
        result = predict(model=model, out=out / "test", batch_size=2, chunk=chunk, save_masks=True, overlays=True,
                         kaggle_csv=True, progress=False, log=quiet)
        predict(model=model, out=out / "eval", batch_size=2, chunk=chunk, evaluate=True, progress=False, log=quiet)
        files = sorted(path for path in out.rglob("*") if path.is_file() and path.name != "preview.png")
        outputs[chunk] = ({str(path.relative_to(out)): path.read_bytes() for path in files}, result.probs)
    (small, small_probs), (whole, whole_probs) = outputs.values()
    assert sorted(small) == sorted(whole) and len(small) == 1 + 7 + 7 + 2  # CSV, masks, overlays, scores + plot
    assert small == whole
    np.testing.assert_array_equal(small_probs, whole_probs)
    assert 0 < result.masks.mean() < 1  # the masks are not all one value


def test_prediction_reads_the_images_chunk_by_chunk(tmp_path, monkeypatch):
    """With chunks of two, images are decoded two at a time, each pair predicted before the next is read,
    and the result keeps no probability maps: memory is bounded by the chunk, not by the set."""
    from tinyunet import data as data_module

    data = seven_images(tmp_path / "data")
    events = []
    read_image, probabilities = data_module.read_image, prediction.probabilities
    monkeypatch.setattr(data_module, "read_image", lambda *a, **k: events.append("read") or read_image(*a, **k))
    monkeypatch.setattr(prediction, "probabilities",
                        lambda net, images, *a, **k: events.append(len(images)) or probabilities(net, images, *a, **k))
    result = predict(model=save_model(tmp_path / "m.npz", data), out=tmp_path / "out", batch_size=2, chunk=2,
                     keep=False, progress=False, log=quiet)
    streamed = ["read", "read", 2] * 3 + ["read", 1]
    assert events == streamed + ["read"] * 7 + [7]  # then the preview's picks (at most 8), read again
    assert result.probs is None and result.masks is None
    assert len(read_submission(tmp_path / "out" / "submission.csv")[1]) == 7


def test_a_failed_prediction_leaves_no_empty_folder(tmp_path, pattern_data, monkeypatch):
    data, _ = pattern_data
    model = save_model(tmp_path / "run" / "best.npz", data)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 9 GiB")

    monkeypatch.setattr(prediction, "probabilities", out_of_memory)
    for out in (None, tmp_path / "new" / "out"):
        with pytest.raises(MemoryError):
            predict(model=model, out=out, save_masks=True, progress=False, log=quiet)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.npz"]
    assert not (tmp_path / "new").exists()


def test_failed_write_keeps_the_old_submission(tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    out.write_text("id,rle_mask\nold,1 2\n")
    calls = []

    def failing(mask):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return rle_encode(mask)

    monkeypatch.setattr(prediction, "rle_encode", failing)
    with pytest.raises(RuntimeError):
        write_submission(out, [f"i{k}" for k in range(5)], np.zeros((5, 4, 4), bool))
    assert out.read_text() == "id,rle_mask\nold,1 2\n"
    assert os.listdir(tmp_path) == ["submission.csv"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# --evaluate and tinyunet.evaluation
# ------------------------------------------------------------------------------------------------

def test_evaluate_report_numbers():
    truth = np.zeros((4, 10, 10), bool)
    truth[1, :5] = True  # 50 % salt: class 5
    truth[2, :1, :1] = True  # 1 %: class 1
    truth[3] = True  # 100 %: class 10
    probs = np.where(truth, 0.9, 0.1).astype(np.float32)
    probs[3, :2] = 0.1  # image 3 misses 20 % of its salt: IoU 0.8 (score 0.6)
    report = evaluate(truth, probs, threshold=0.5)
    assert isinstance(report, Report)
    assert report.threshold == 0.5 and report.threshold_source == "given"
    assert report.score == pytest.approx((1 + 1 + 1 + 0.6) / 4)
    assert report.mean_iou == pytest.approx((1 + 1 + 1 + 0.8) / 4)
    assert report.pixel_accuracy == pytest.approx(1 - 20 / 400)
    assert report.class_counts.tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert report.class_scores[10] == pytest.approx(0.6) and report.class_scores[0] == 1
    assert math.isnan(report.class_scores[2])
    assert len(report.thresholds) == len(report.scores) == 50
    assert report.best_score == pytest.approx(report.scores.max())
    json.dumps(report.as_dict())  # plain numbers only
    best = evaluate(truth, probs)  # no threshold: the sweep's best
    assert best.threshold == best.best_threshold and best.threshold_source == "best of the sweep"
    assert best.score == pytest.approx(best.best_score)


def test_evaluate_format_table():
    truth = np.zeros((3, 8, 8), bool)
    truth[1, :4] = True
    text = evaluate(truth, truth.astype(np.float32), threshold=0.5).format("mask")
    for words in ("competition score   1.0000", "Dice                1.0000 per image, 1.0000 over the set",
                  "IoU                 1.0000", "pixel accuracy", "empty", "(40, 50%]", "(90, 100%]", "mask"):
        assert words in text
    assert "salt" not in text
    lines = text.splitlines()
    assert len(lines) == 7 + 11  # headline, 4 numbers, 2 header lines, 11 classes
    assert lines[-1].split()[0] == "10" and lines[-1].split()[-1] == "-"  # an empty class


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        evaluate(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), np.float32), threshold=2)


def test_predict_evaluate(tmp_path, capsys):
    rng = np.random.default_rng(7)
    train = {}
    for k in range(6):
        pixels = np.where(rng.random((16, 16)) < 0.2 * k, 230, 25).astype(np.uint8)
        mask = pixels > 127
        if k == 5:
            mask = ~mask  # one image the identity model gets wrong
        train[f"t{k}"] = (pixels, mask)
    data = make_data(tmp_path / "data", train=train)  # no test part: --evaluate does not need one
    model = save_model(tmp_path / "m.npz", data, best_threshold=0.5)
    out = tmp_path / "eval"
    code = predict_main(["--model", str(model), "--out", str(out), "--evaluate"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "competition score" in printed and "Dice" in printed and "IoU" in printed and "pixel accuracy" in printed
    assert "per coverage class" in printed and "images/s" in printed and "salt" not in printed
    assert (out / "threshold.png").is_file() and (out / "preview.png").is_file()
    assert (out / "scores.csv").read_text().splitlines()[0] == "id,dice,iou,competition_score"
    assert not (out / "submission.csv").exists()  # evaluation writes no submission
    result = predict(model=model, out=tmp_path / "again", evaluate=True, progress=False, log=quiet)
    masks = np.stack([train[i][1] for i in sorted(train)])
    assert result.report.score == pytest.approx(evaluate(masks, result.probs, 0.5).score)
    assert result.report.score < 1 and result.report.threshold_source == "from the checkpoint"


def test_predict_evaluate_says_when_scoring_training_data(tmp_path):
    train = {"t0": (np.full((8, 8), 200, np.uint8), np.ones((8, 8), bool))}
    data = make_data(tmp_path / "data", train=train)
    labelled = load_train(data)
    model = save_model(tmp_path / "m.npz", data, data_fingerprint=fingerprint(
        labelled.ids, labelled.images, labelled.masks))
    lines = []
    predict(model=model, out=tmp_path / "s.csv", evaluate=True, progress=False, log=lines.append)
    assert any("trained on" in line and "optimistic" in line for line in lines)


def test_evaluate_without_labels_is_a_data_error(tmp_path, pattern_data):
    data, _ = pattern_data  # a test part only
    with pytest.raises(DataError, match="train"):
        predict(model=save_model(tmp_path / "m.npz", data), out=tmp_path / "s.csv", evaluate=True,
                progress=False, log=quiet)


# ------------------------------------------------------------------------------------------------
# The command line: defaults and one-line errors
# ------------------------------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_default_model_via_runs_latest(tmp_path, pattern_data):
    """A plain `python predict.py` after training: runs/latest -> best.npz -> its data -> submission."""
    data, test = pattern_data
    work = tmp_path / "project"
    save_model(work / "runs" / "20240101-120000" / "best.npz", data.resolve(), best_threshold=0.5)
    (work / "runs" / "latest").write_text("20240101-120000\n")
    done = run_cli(cwd=work)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "images/s" in done.stdout
    assert sorted(os.listdir(work)) == ["runs"]  # nothing in the current folder
    (folder,) = (work / "runs" / "20240101-120000" / "predictions").iterdir()  # beside the model
    _, rows = read_submission(folder / "submission.csv")
    assert [row[0] for row in rows] == sorted(test)
    assert (folder / "preview.png").is_file()


def _bad_checkpoint_files(folder: Path, data: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.npz"
    text.write_text("this is not a checkpoint\n")
    params = identity_params()
    params["head.W"][0, 0, 0, 0] = np.nan
    nan = save_model(folder / "nan.npz", data, params=params)
    no_model = save_checkpoint(folder / "no_model.npz", identity_params(), {"epoch": 1})
    wrong = save_model(folder / "wrong.npz", data, params=random_params(),
                       model={"features": 4, "depth": 2, "dropout": [0.1, 0.1], "in_channels": 1})
    return {"text": text, "nan": nan, "no_model": no_model, "wrong": wrong}


@pytest.fixture
def cli_setup(tmp_path, pattern_data):
    data, _ = pattern_data
    good = save_model(tmp_path / "good.npz", data.resolve())
    bad = _bad_checkpoint_files(tmp_path / "bad", data)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    work = tmp_path / "empty_project"
    work.mkdir()
    return {"data": data, "good": good, "bad": bad, "blocker": blocker, "work": work,
            "tmp": tmp_path}


ERROR_CASES = {
    # name: (arguments, words the one-line message must hold)
    "no model": (lambda s: [], "no trained model found: run python train.py first, or pass --model"),
    "threshold above 1": (lambda s: ["--model", s["good"], "--threshold", "1.5"], "--threshold"),
    "threshold below 0": (lambda s: ["--model", s["good"], "--threshold", "-0.1"], "[0, 1]"),
    "threshold nan": (lambda s: ["--model", s["good"], "--threshold", "nan"], "--threshold"),
    "batch size 0": (lambda s: ["--model", s["good"], "--batch-size", "0"], "--batch-size"),
    "batch size text": (lambda s: ["--model", s["good"], "--batch-size", "many"], "invalid int"),
    "threads 0": (lambda s: ["--model", s["good"], "--threads", "0"], "--threads"),
    "missing model": (lambda s: ["--model", s["tmp"] / "nope.npz"], "does not exist"),
    "not a checkpoint": (lambda s: ["--model", s["bad"]["text"]], "not a .npz checkpoint"),
    "nan weights": (lambda s: ["--model", s["bad"]["nan"]], "NaN or infinite weights"),
    "no model settings": (lambda s: ["--model", s["bad"]["no_model"]], "records no model settings"),
    "other configuration": (lambda s: ["--model", s["bad"]["wrong"]],
                            "does not fit its own model settings (features=4, depth=2)"),
    "missing data": (lambda s: ["--model", s["good"], "--data", s["tmp"] / "nowhere"], "does not exist"),
    "data not in layout": (lambda s: ["--model", s["good"], "--data", s["tmp"] / "bad"],
                           "has no test/images"),
    "output under a file": (lambda s: ["--model", s["good"], "--out", s["blocker"] / "sub"],
                            "a_file is a file, not a folder"),
    "output is a file": (lambda s: ["--model", s["good"], "--out", s["blocker"]], "is a file: give a folder"),
    "output holds files": (lambda s: ["--model", s["good"], "--out", s["tmp"]], "already holds files"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_errors_are_one_line(cli_setup, case):
    make_args, words = ERROR_CASES[case]
    args = [str(a) for a in make_args(cli_setup)]
    old = cli_setup["work"] / "submission.csv"  # an earlier submission, written by the default --out
    old.write_text("id,rle_mask\nkept,1 1\n")
    done = run_cli(*args, cwd=cli_setup["work"])
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert old.read_text() == "id,rle_mask\nkept,1 1\n"  # nothing already saved is damaged


def test_cli_gpu_without_cupy(cli_setup):
    try:
        from tinyunet.backend import gpu_backend

        gpu_backend()
    except Exception:
        pass
    else:
        pytest.skip("a usable GPU is present: --gpu works here")
    done = run_cli("--model", str(cli_setup["good"]), "--gpu", cwd=cli_setup["work"])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu needs"), done.stderr
    assert not (cli_setup["work"] / "submission.csv").exists()


def test_cli_debug_shows_the_traceback(cli_setup):
    done = run_cli("--model", str(cli_setup["good"]), "--threshold", "2", "--debug",
                   cwd=cli_setup["work"])
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "PredictError" in done.stderr


def test_cli_help_documents_every_flag():
    parser = predict_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
