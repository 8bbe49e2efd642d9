"""SOLOv2Checkpointer: unreadable weights and a garbled last_checkpoint are named; a model left
partly or wholly at initialisation is refused when asked to be complete."""
import os

import pytest
import torch
from torch import nn

from solov2_d2.engine.checkpoint import (
    IncompleteWeightsError,
    ResumeMismatchError,
    SOLOv2Checkpointer,
)


def _model(classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, classes, 1))


@pytest.mark.parametrize(
    "content", [os.urandom(4096), b"", b"MODEL:\n  WEIGHTS: x\n"], ids=["random", "empty", "text"]
)
def test_unreadable_weights_are_named(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"Cannot read {path} as a checkpoint"):
        SOLOv2Checkpointer(_model()).load(str(path))


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Checkpoint {tmp_path}/gone.pth does not exist"):
        SOLOv2Checkpointer(_model()).load(str(tmp_path / "gone.pth"))


def test_garbled_last_checkpoint_is_named(tmp_path):
    SOLOv2Checkpointer(_model(), str(tmp_path)).save("model_0000009")
    (tmp_path / "last_checkpoint").write_bytes(b"\xff\xfe\x00\x9c" + os.urandom(64))
    with pytest.raises(ValueError, match=f"{tmp_path}/last_checkpoint must hold the file name"):
        SOLOv2Checkpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)


def test_a_head_of_another_shape_loads_for_training_and_is_refused_for_evaluation(tmp_path):
    source = _model(classes=2)
    SOLOv2Checkpointer(source, str(tmp_path)).save("two_classes")
    path = str(tmp_path / "two_classes.pth")
    model = _model(classes=3)
    SOLOv2Checkpointer(model).load(path)  # fine-tuning: the rest loads
    assert torch.equal(model[0].weight, source[0].weight)
    with pytest.raises(IncompleteWeightsError) as e:
        SOLOv2Checkpointer(_model(classes=3), require_complete=True).load(path)
    assert f"{path} does not fit the model (2 tensors of other shapes: 1.weight ([3, 8, 1, 1]" in (
        str(e.value)
    )
    assert "--eval-incomplete-weights" in str(e.value)


def test_nothing_to_load_is_refused_when_complete_weights_are_required():
    SOLOv2Checkpointer(_model()).load("")  # training from scratch
    with pytest.raises(IncompleteWeightsError, match="MODEL.WEIGHTS is empty"):
        SOLOv2Checkpointer(_model(), require_complete=True).load("")


def test_missing_tensors_are_refused_when_complete_weights_are_required(tmp_path):
    SOLOv2Checkpointer(nn.Sequential(nn.Conv2d(3, 8, 3)), str(tmp_path)).save("backbone")
    with pytest.raises(IncompleteWeightsError, match=r"2 tensors missing: 1\.weight, 1\.bias"):
        SOLOv2Checkpointer(_model(), require_complete=True).load(str(tmp_path / "backbone.pth"))


class _Unlisted:
    """An object of a class outside torch, which the safe loader does not load."""


@pytest.mark.parametrize("kind", ["random", "object"])
def test_unreadable_weights_never_suggest_unsafe_loading(tmp_path, kind):
    path = tmp_path / "model.pth"
    if kind == "random":
        path.write_bytes(b"\xff" * 4096)  # not a pickle opcode (random bytes vary in what fails)
    else:
        torch.save({"model": {"0.weight": torch.zeros(1)}, "state": _Unlisted()}, path)
    with pytest.raises(ValueError) as e:
        SOLOv2Checkpointer(_model()).load(str(path))
    message = str(e.value)
    assert message.startswith(f"Cannot read {path} as a checkpoint")
    assert "weights_only" not in message and "arbitrary code" not in message
    # Torch's message (with its advice to load unsafely) is not chained after ours.
    assert e.value.__cause__ is None and e.value.__suppress_context__
    expected = "unsupported pickle operand" if kind == "random" else "_Unlisted, which is not"
    assert expected in message


def test_resuming_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    SOLOv2Checkpointer(_model(classes=2), str(tmp_path)).save("model_final")
    with pytest.raises(ResumeMismatchError) as e:
        SOLOv2Checkpointer(_model(classes=3), str(tmp_path)).resume_or_load("", resume=True)
    assert f"Cannot resume from {tmp_path}/model_final.pth, the last checkpoint in {tmp_path}" in (
        str(e.value)
    )
    assert "2 tensors of other shapes: 1.weight ([3, 8, 1, 1] in the model, [2, 8, 1, 1]" in (
        str(e.value)
    )
    # Unexpected tensors: a checkpoint of a larger model.
    larger = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 1), nn.Conv2d(3, 3, 1))
    SOLOv2Checkpointer(larger, str(tmp_path)).save("model_final")
    with pytest.raises(ResumeMismatchError, match=r"2 unexpected tensors: 2\.weight, 2\.bias"):
        SOLOv2Checkpointer(_model(classes=3), str(tmp_path)).resume_or_load("", resume=True)
    # The same file as weights to start from (fine-tuning) loads what fits, as before.
    model = _model(classes=3)
    SOLOv2Checkpointer(model, str(tmp_path / "new")).resume_or_load(
        str(tmp_path / "model_final.pth"), resume=True
    )
    assert torch.equal(model[1].weight, larger[1].weight)


def test_resuming_a_checkpoint_that_fits_loads_it(tmp_path):
    source = _model()
    SOLOv2Checkpointer(source, str(tmp_path)).save("model_0000004", iteration=4)
    model = _model()
    assert SOLOv2Checkpointer(model, str(tmp_path)).resume_or_load("", resume=True) == {
        "iteration": 4
    }
    assert torch.equal(model[1].weight, source[1].weight)
