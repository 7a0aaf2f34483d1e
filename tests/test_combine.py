"""Combining trained models into one ensemble tuned on their shared validation split (tinyunet.combine)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyunet.checkpoint import CheckpointError, load_checkpoint
from tinyunet.combine import combine, main, select_members
from tinyunet.config import build_config
from tinyunet.ensemble import Ensemble
from tinyunet.metrics import competition_score, drop_small
from tinyunet.models import load_model
from tinyunet.pipeline import probabilities
from tinyunet.prepare import load_split
from tinyunet.training import train, tune_postprocessing
from tinyunet.transforms import take

TINY = {"features": 2, "depth": 2, "input_size": 32, "epochs": 1, "progress": False, "plots": False}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Runs on one split (seed 0): one model, a cosine run with two snapshots, one padded instead of resized;
    and one on another split."""
    root = tmp_path_factory.mktemp("combine")

    def run(name, **settings):
        return train(build_config({"data": str(tiny_data), "out": str(root / name), **TINY, **settings}))

    return {"one": run("one"), "cosine": run("cosine", features=3, epochs=2, schedule="cosine", cycle=1),
            "padded": run("padded", fit="pad"), "other_split": run("other_split", seed=1), "root": root}


def test_an_ensemble_of_a_model_and_two_snapshots_is_tuned_on_their_validation_split(runs, tiny_data, capsys):
    out = runs["root"] / "mix.npz"
    path, score = combine([str(runs["one"] / "best.npz"), str(runs["cosine"] / "ensemble.npz")], str(out),
                          tta=True, empty_rule=True, threads=1)
    said = capsys.readouterr().out
    assert said.count("member ") == 3 and "ensemble of 3" in said
    assert said.splitlines()[0].startswith("scoring 3 model(s) on the ")  # before the first model is scored
    assert said.count("(epoch 1)") == 2 and said.count("(epoch 2)") == 1
    ensemble, ckpt = load_model(path)
    assert isinstance(ensemble, Ensemble) and [m.config["features"] for m in ensemble.members] == [2, 3, 3]
    meta = ckpt.meta
    assert meta["val_score"] == score and meta["tta"] is True and len(meta["combined_from"]) == 2
    assert meta["member_epochs"] == [1, 1, 2] and "epoch" not in meta  # the cosine run's members kept theirs
    # the score is the competition score of the members' mean TTA probability at the stored threshold and area
    split = load_split(build_config({"data": str(tiny_data), **TINY}), tiny_data)
    images, truth = take(split.images, split.val_idx), take(split.masks, split.val_idx) > 0.5
    members = [load_model(runs["one"] / "best.npz")[0], *load_model(runs["cosine"] / "ensemble.npz")[0].members]
    mean = sum(probabilities(m, images, "resize", 32, tta=True) for m in members) / 3
    predicted = drop_small(mean > np.float32(meta["best_threshold"]), meta["min_area"])
    assert competition_score(truth, predicted) == pytest.approx(score, abs=1e-9)


def test_models_of_another_split_or_geometry_are_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="differ in seed"):
        combine([str(runs["one"] / "best.npz"), str(runs["other_split"] / "best.npz")], str(tmp_path / "x.npz"))
    assert not (tmp_path / "x.npz").exists()
    with pytest.raises(CheckpointError, match="differ in fit"):
        combine([str(runs["one"] / "best.npz"), str(runs["padded"] / "best.npz")], str(tmp_path / "x.npz"))


def test_the_command_line_says_what_is_wrong_in_one_line(runs, tmp_path, capsys):
    best = str(runs["one"] / "best.npz")
    assert main([best, str(runs["other_split"] / "best.npz"), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "same split" in err
    assert main([best, "--out", best]) == 2
    assert "one of the models being combined" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.npz"), "--out", str(tmp_path / "y.npz")]) == 2
    assert main([best, "--out", str(tmp_path / "one.npz"), "--threads", "1"]) == 0  # one model: an ensemble of 1
    assert len(load_checkpoint(tmp_path / "one.npz").meta["members"]) == 1


def _halves(rng, truth):
    """A member that knows the first half of the images (0.9 on salt, 0.1 off) and says 0.5 on the rest."""
    probs = np.where(truth, 0.9, 0.1).astype(np.float32)
    probs[len(truth) // 2:] = 0.5
    return probs + rng.uniform(-0.02, 0.02, probs.shape).astype(np.float32)


@pytest.mark.parametrize("empty_rule", [False, True])
def test_greedy_selection_adds_a_member_only_when_it_raises_the_score(empty_rule):
    rng = np.random.default_rng(3)
    truth = np.zeros((8, 12, 12), bool)
    for k in range(0, 8, 2):  # every other image holds a block of salt, the rest are empty
        truth[k, 2 + k // 2:9, 3:10] = True
    first = _halves(rng, truth)  # knows images 0-3
    second = _halves(rng, truth[::-1])[::-1].copy()  # knows images 4-7
    worse = rng.uniform(0.48, 0.52, truth.shape).astype(np.float32)  # knows nothing
    config = build_config({"empty_rule": empty_rule})
    maps = [worse, first, second, first.copy()]
    before = [m.copy() for m in maps]
    said = []
    chosen = select_members(truth, maps, config, most=4, say=said.append)
    assert chosen == [1, 2], said  # the two halves; the copy of the first adds nothing
    assert "no other member raises" in said[-1] and len(said) == 3
    assert all(np.array_equal(a, b) for a, b in zip(maps, before))  # no member's map is changed
    scores = [float(line.split("score ")[1].split()[0].rstrip(":")) for line in said[:2]]
    assert scores[1] > scores[0]
    alone = [tune_postprocessing(truth, m, config)[2] for m in maps]
    assert scores[0] == pytest.approx(max(alone[1:3]), abs=5e-5)  # printed to 4 places
    assert select_members(truth, maps, config, most=1, say=said.append) in ([1], [2])  # the best one alone
    assert select_members(truth, maps[1:3], config, most=5, say=said.append) == [0, 1]  # more allowed than given


def test_max_members_keeps_the_chosen_members_and_scores_them(runs, tiny_data, capsys):
    out = runs["root"] / "two.npz"
    paths = [str(runs["one"] / "best.npz"), str(runs["cosine"] / "ensemble.npz")]
    path, score = combine(paths, str(out), tta=False, empty_rule=False, threads=1, max_members=2)
    said = capsys.readouterr().out
    assert "chose member" in said and "ensemble of " in said
    ensemble, ckpt = load_model(path)
    chosen = ckpt.meta["chosen_members"]
    assert 1 <= len(chosen) <= 2 and len(ensemble.members) == len(chosen) and chosen == sorted(chosen)
    everyone = [load_model(runs["one"] / "best.npz")[0], *load_model(runs["cosine"] / "ensemble.npz")[0].members]
    split = load_split(build_config({"data": str(tiny_data), **TINY}), tiny_data)
    images, truth = take(split.images, split.val_idx), take(split.masks, split.val_idx) > 0.5
    mean = sum(probabilities(everyone[k - 1], images, "resize", 32) for k in chosen) / len(chosen)
    predicted = drop_small(mean > np.float32(ckpt.meta["best_threshold"]), ckpt.meta["min_area"])
    assert competition_score(truth, predicted) == pytest.approx(score, abs=1e-9)
    assert main([paths[0], "--out", str(runs["root"] / "z.npz"), "--max-members", "0"]) == 2
    assert "--max-members 0" in capsys.readouterr().err
