"""The weight average (MODEL_EMA): its update against a hand loop, its checkpoints, its use in
evaluation, and train_net.py runs that evaluate it, save it as model_final.pth and resume it."""
import json
import math
import sys

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import REPO, tiny_fruit_argv
from torch import nn

from detectron2.checkpoint import Checkpointer
from detectron2.config import get_cfg
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.engine.hooks import EvalHook

from solov2_d2 import add_solov2_config
from solov2_d2.engine.ema import (
    ModelEMA,
    ModelEMAHook,
    RestoreTrainingWeightsHook,
    add_model_ema_hook,
)

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402


class _Tiny(nn.Module):
    """Parameters, a float buffer (BatchNorm's running statistics), an integer buffer
    (num_batches_tracked) and a float16 buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("scale16", torch.randn(5).half())

    def forward(self, x):
        return {"loss": self.norm(self.linear(x)).pow(2).mean()}


def _ema_cfg(**values):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.MODEL_EMA.ENABLED = True
    for key, value in values.items():
        cfg.MODEL_EMA[key] = value
    return cfg


def _float_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _hand_average(start, steps, decay, warmup):
    """The average after each of `steps` (states of the model), by the formula, in float64."""
    average = {k: v.double() for k, v in start.items()}
    out = []
    for k, state in enumerate(steps, 1):
        d = decay * (1 - math.exp(-k / warmup)) if warmup else decay
        average = {n: d * average[n] + (1 - d) * state[n].double() for n in average}
        out.append(average)
    return out


def _perturb(model, generator):
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=generator).to(v.dtype))
            else:
                v.add_(1)


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("fused", [True, False], ids=["foreach_lerp", "mul_add"])
def test_the_update_is_the_formula(warmup, fused, monkeypatch):
    if not fused:  # the fallback where torch has no _foreach_lerp_
        monkeypatch.delattr(torch, "_foreach_lerp_")
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9, warmup_iters=warmup)
    assert set(ema.names) == {
        "linear.weight", "linear.bias", "norm.weight", "norm.bias", "norm.running_mean",
        "norm.running_var", "scale16",
    }  # fmt: skip
    start, steps = _float_state(model), []
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        _perturb(model, generator)
        steps.append(_float_state(model))
        ema.update()
    expected = _hand_average(start, steps, 0.9, warmup)[-1]
    average = ema.averaged_state_dict()
    assert ema.num_updates == 6
    for name, value in expected.items():
        assert average[name].dtype == torch.float32
        torch.testing.assert_close(average[name].double(), value, rtol=1e-6, atol=1e-6)
    # Not a copy of the weights: the average lags them.
    assert not torch.allclose(average["linear.weight"], model.linear.weight)
    assert ema.decay_at(1) == (0.9 * (1 - math.exp(-1 / 3)) if warmup else 0.9)


def test_apply_and_restore_swap_the_weights_exactly():
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEMA(model, decay=0.5, warmup_iters=0)
    _perturb(model, torch.Generator().manual_seed(1))
    ema.update()
    raw = _float_state(model)
    with ema.applied_to_model():
        for name, value in ema.averaged_state_dict().items():
            assert torch.equal(model.state_dict()[name], value.to(raw[name].dtype))
        with pytest.raises(RuntimeError, match="update while the average is in the model"):
            ema.update()
        with ema.applied_to_model():  # nested: the average stays
            pass
        assert torch.equal(model.linear.weight, ema.averaged_state_dict()["linear.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())


@pytest.mark.parametrize("applied", [False, True], ids=["periodic", "final"])
def test_checkpoints_keep_and_restore_the_average(tmp_path, applied):
    """Through detectron2's Checkpointer: a model and its average saved, loaded into another
    model (other weights) and average, and updated on: both pairs stay equal. A final checkpoint
    (the average in the model) holds the average as "model" and restores the training weights
    on load."""
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEMA(model, decay=0.8, warmup_iters=2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        _perturb(model, generator)
        ema.update()
    raw = _float_state(model)
    if applied:
        ema.apply()
    Checkpointer(model, str(tmp_path), model_ema=ema).save("checkpoint")
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert saved["model_ema"]["num_updates"] == 3
    if applied:
        assert all(torch.equal(saved["model"][k], v) for k, v in ema.averaged_state_dict().items()
                   if v.dtype == saved["model"][k].dtype)
        assert all(torch.equal(saved["model_ema"]["raw_model"][k], v) for k, v in raw.items())
        ema.restore()
    else:
        assert "raw_model" not in saved["model_ema"]

    torch.manual_seed(5)
    other = _Tiny()
    other_ema = ModelEMA(other, decay=0.8, warmup_iters=2)
    Checkpointer(other, str(tmp_path), model_ema=other_ema).load(str(tmp_path / "checkpoint.pth"))
    assert other_ema.num_updates == 3 and not other_ema.applied
    assert all(torch.equal(other.state_dict()[k], v) for k, v in raw.items())
    for a, b in zip(ema.averaged_state_dict().values(), other_ema.averaged_state_dict().values()):
        assert torch.equal(a, b)
    for m, e in ((model, ema), (other, other_ema)):
        _perturb(m, torch.Generator().manual_seed(7))
        e.update()
    for a, b in zip(ema.averaged_state_dict().values(), other_ema.averaged_state_dict().values()):
        assert torch.equal(a, b)


def test_an_average_of_another_model_is_refused_naming_the_tensor():
    ema = ModelEMA(_Tiny())
    state = ema.state_dict()
    state["average"]["linear.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"linear.weight \(\[3, 4\] in the model, \[2, 2\]"):
        ModelEMA(_Tiny()).load_state_dict(state)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("DECAY", 1.0, r"MODEL_EMA.DECAY = 1.0; expected a value in \[0, 1\)"),
        ("DECAY", -0.5, r"MODEL_EMA.DECAY = -0.5; expected"),
        ("DECAY", float("nan"), r"MODEL_EMA.DECAY = nan; expected"),
        ("WARMUP_ITERS", -1, r"MODEL_EMA.WARMUP_ITERS = -1; expected a number >= 0"),
    ],
)
def test_meaningless_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        ModelEMA(_ema_cfg(**{key: value}), _Tiny())


def _tiny_run(with_ema, max_iter=5):
    """SimpleTrainer on _Tiny with a recording hook and an EvalHook (period 2) that records
    the weights it evaluates; with_ema: through add_model_ema_hook (DECAY 0.5, no warm-up)."""
    torch.manual_seed(0)
    model = _Tiny()
    generator = torch.Generator().manual_seed(3)
    data = iter(lambda: torch.randn(8, 4, generator=generator), None)
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.cfg = _ema_cfg(DECAY=0.5, WARMUP_ITERS=0)
    trainer.cfg.MODEL_EMA.ENABLED = with_ema
    trainer.cfg.TEST.EVAL_PERIOD = 2
    trainer.checkpointer = Checkpointer(model)
    seen = {"start": _float_state(model), "raw": [], "evaluated": []}

    class Record(HookBase):
        def after_step(self):
            seen["raw"].append(_float_state(model))

    def evaluate():
        seen["evaluated"].append((trainer.iter, _float_state(model)))
        return {}

    hooks = add_model_ema_hook(trainer, [Record(), EvalHook(2, evaluate)])
    trainer.register_hooks(hooks)
    trainer.train(0, max_iter)
    seen["end"] = _float_state(model)
    return trainer, hooks, seen


def test_evaluation_scores_the_average_and_training_goes_on_with_its_own_weights():
    trainer, hooks, seen = _tiny_run(with_ema=True)
    assert isinstance(hooks[1], ModelEMAHook)  # before the evaluation
    assert isinstance(hooks[-1], RestoreTrainingWeightsHook)  # after it
    assert trainer.checkpointer.checkpointables["model_ema"] is trainer.model_ema
    _, _, plain = _tiny_run(with_ema=False)
    # The training trajectory is that of a run without the average...
    assert len(seen["raw"]) == len(plain["raw"]) == 5
    for ours, theirs in zip(seen["raw"], plain["raw"]):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert all(torch.equal(seen["end"][k], v) for k, v in plain["end"].items())
    # ... and every evaluation (after iterations 1 and 3, and the last) saw the average.
    expected = _hand_average(seen["start"], seen["raw"], 0.5, 0)
    assert [it for it, _ in seen["evaluated"]] == [1, 3, 5]
    assert [it for it, _ in plain["evaluated"]] == [1, 3, 5]
    for (it, state), (_, raw_state) in zip(seen["evaluated"], plain["evaluated"]):
        average = expected[min(it, 4)]
        for name in ("linear.weight", "norm.running_mean"):
            torch.testing.assert_close(state[name].double(), average[name], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(state[name], raw_state[name])


def test_disabled_leaves_the_hooks_and_the_checkpointer_alone():
    trainer, hooks, seen = _tiny_run(with_ema=False)
    assert trainer.model_ema is None and "model_ema" not in trainer.checkpointer.checkpointables
    assert not any(isinstance(h, ModelEMAHook) for h in hooks)


# train_net.py on the fruit data (tiny sizes, see conftest.TINY).
_EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5", "MODEL_EMA.WARMUP_ITERS", "0"]


def _main(output_dir, *opts, **flags):
    return train_net.main(
        train_net.argument_parser().parse_args(tiny_fruit_argv(output_dir, *opts, **flags))
    )


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_net_evaluates_and_saves_the_average(tmp_path):
    """Two iterations with a checkpoint after each: model_final.pth's "model" is the average
    (the previous checkpoint's average updated by the formula with the final training weights,
    which are kept apart), and the evaluations after training, plain and with test-time
    augmentation (the identity view), give the predictions of --eval-only on model_final.pth."""
    out = tmp_path / "train"
    tta = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(128,)", "TEST.AUG.MAX_SIZE", "192",
           "TEST.AUG.FLIP", "False"]  # fmt: skip
    _main(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", *_EMA, *tta)
    first, final = _load(out / "model_0000000.pth"), _load(out / "model_final.pth")
    assert first["model_ema"]["num_updates"] == 1 and final["model_ema"]["num_updates"] == 2
    assert "raw_model" not in first["model_ema"]
    average, raw = final["model_ema"]["average"], final["model_ema"]["raw_model"]
    assert set(average) == set(final["model"])  # every tensor of the model is floating
    assert all(torch.equal(final["model"][k], v) for k, v in average.items())
    changed = [k for k in raw if not torch.equal(raw[k], average[k])]
    assert len(changed) > len(raw) // 2
    for name, value in average.items():
        hand = 0.5 * first["model_ema"]["average"][name].double() + 0.5 * raw[name].double()
        torch.testing.assert_close(value.double(), hand, rtol=1e-6, atol=1e-6)
    # The first checkpoint's model holds the training weights, not the average.
    first_average = first["model_ema"]["average"]
    assert not all(torch.equal(first["model"][k], v) for k, v in first_average.items())

    _main(tmp_path / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True)
    predictions = [
        json.loads((folder / "fruit_val" / "coco_instances_results.json").read_text())
        for folder in (out / "inference", out / "inference_TTA", tmp_path / "eval" / "inference")
    ]
    assert predictions[0]
    assert predictions[1] == predictions[0] and predictions[2] == predictions[0]


def test_train_net_resumes_the_average_exactly(tmp_path):
    """Resumed from the checkpoint after iteration 1 of 4: model_final.pth (the average, the
    training weights, the update count) is bit-identical to the uninterrupted run's."""
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
            "MODEL_EMA.WARMUP_ITERS", "2", *_EMA[:4]]  # fmt: skip
    _main(tmp_path / "uninterrupted", *opts)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    checkpoint = tmp_path / "uninterrupted" / "model_0000001.pth"
    (resumed / "model_0000001.pth").write_bytes(checkpoint.read_bytes())
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    _main(resumed, *opts, resume=True)
    expected = _load(tmp_path / "uninterrupted" / "model_final.pth")
    got = _load(resumed / "model_final.pth")
    assert got["model_ema"]["num_updates"] == expected["model_ema"]["num_updates"] == 4
    for part in ("average", "raw_model"):
        assert all(torch.equal(got["model_ema"][part][k], v)
                   for k, v in expected["model_ema"][part].items())
    assert all(torch.equal(got["model"][k], v) for k, v in expected["model"].items())
