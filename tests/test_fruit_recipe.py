"""bench/fruit_recipe.py: which runs it trains with which overrides, and how a run with weight
averaging also scores its training weights as the run without it (training and evaluation
replaced by recorders: the real ones take minutes)."""
import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    path = REPO / "bench" / "fruit_recipe.py"
    spec = importlib.util.spec_from_file_location("fruit_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", str(tmp_path))
    calls = []

    def train(folder, opts):
        calls.append(("train", folder, list(opts)))
        (tmp_path / folder / "inference").mkdir(parents=True)
        (tmp_path / folder / "inference" / "results.json").write_text(json.dumps({}))
        model = {"w": torch.zeros(2), "b": torch.zeros(1)}
        saved = {"model": {k: v + 1 for k, v in model.items()}}  # the average
        if "MODEL_EMA.ENABLED" in opts:
            saved["model_ema"] = {"raw_model": {"w": torch.full((2,), 7.0)}}
        torch.save(saved, tmp_path / folder / "model_final.pth")

    def evaluate(weights, folder, opts):
        calls.append(("evaluate", folder, list(opts), torch.load(weights, weights_only=False)))
        (tmp_path / folder / "inference").mkdir(parents=True)

    monkeypatch.setattr(module, "_train", train)
    monkeypatch.setattr(module, "_evaluate", evaluate)
    return module, calls


def _run(module, *argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fruit_recipe.py", *argv])
    module.main()


def test_folds_with_weight_averaging_score_the_training_weights_as_the_run_without(
    recipe, tmp_path, monkeypatch
):
    module, calls = recipe
    _run(module, "folds", "--folds", "1", "--without", "color_jitter", "--with", "ema",
         monkeypatch=monkeypatch)  # fmt: skip
    run = str(tmp_path / "fold1_s0_no_color_jitter_with_ema")
    data = ["DATASETS.TRAIN", '("fruit_fold1_train",)', "DATASETS.TEST", '("fruit_fold1_val",)']
    plain = ["SEED", "0", *data, "INPUT.COLOR_JITTER.ENABLED", "False"]
    assert calls[0] == ("train", run, plain + module.ADD["ema"])
    kind, folder, opts, weights = calls[1]
    assert (kind, folder, opts) == ("evaluate", run[: -len("_with_ema")], plain)
    # The training weights replace the average's entries; what they lack stays as saved.
    assert torch.equal(weights["model"]["w"], torch.full((2,), 7.0))
    assert torch.equal(weights["model"]["b"], torch.ones(1))
    assert len(calls) == 2
    # Run again: nothing is trained twice, and the run without is not scored again.
    calls.clear()
    _run(module, "folds", "--folds", "1", "--without", "color_jitter", "--with", "ema",
         monkeypatch=monkeypatch)  # fmt: skip
    assert calls == []


def test_ablation_removes_each_piece_and_adds_weight_averaging(recipe, tmp_path, monkeypatch):
    module, calls = recipe
    _run(module, "ablation", "--seed", "2", monkeypatch=monkeypatch)
    trained = [(c[1], c[2]) for c in calls if c[0] == "train"]
    assert trained[0] == (str(tmp_path / "seed2"), ["SEED", "2"])
    expected = {f"no_{p}_s2": ["SEED", "2", *o] for p, o in module.REMOVE.items()}
    expected["with_ema_s2"] = ["SEED", "2", *module.ADD["ema"]]
    assert {c[0][len(str(tmp_path)) + 1 :]: c[1] for c in trained[1:]} == expected
    evaluated = [c[1][len(str(tmp_path)) + 1 :] for c in calls if c[0] == "evaluate"]
    # Tight boxes on the recipe's run; the training weights of with_ema_s2 are seed2's run,
    # which is there: not scored again.
    assert evaluated == ["no_main_part_boxes_s2"]


def test_take_off_is_the_first_logged_iteration_with_the_mask_loss_below_one(recipe, tmp_path):
    module, _ = recipe
    logged = [
        {"iteration": 19, "loss_mask": 2.5},
        {"iteration": 39, "loss_mask": 1.0},
        {"iteration": 49, "segm/AP": 3.0},  # an evaluation's line has no loss
        {"iteration": 59, "loss_mask": 0.9},
        {"iteration": 79, "loss_mask": 0.7},
    ]
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in logged) + "\n")
    assert module._take_off(str(path)) == 60
    assert module._take_off(str(path), below=0.5) is None
    assert module._take_off(str(tmp_path / "missing.json")) is None
