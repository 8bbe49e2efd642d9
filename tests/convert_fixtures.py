"""Helpers and fixtures shared by the converter tests (tests/test_convert_*.py); conftest.py loads
it as a pytest plugin, so its fixtures need no import."""
import re

import pytest
import torch
from conftest import SHARED

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config

CHECKPOINT_KEYS = SHARED / "reference" / "checkpoint_keys"
LIGHT_R18 = "mmdet3_solov2-light_r18_fpn_ms-3x_coco.txt"


def key_list(filename):
    """name -> shape of a reference key list."""
    lines = (CHECKPOINT_KEYS / filename).read_text().splitlines()
    entries = {}
    for line in lines:
        if line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        entries[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return entries


def synthetic(shapes, seed=0, device="cpu"):
    """Random tensors of the given shapes (BatchNorm counters as int64 scalars); on the meta
    device, shapes only."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(1000, dtype=torch.long, device=device)
        elif device == "meta":
            out[name] = torch.empty(shape, device="meta")
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out


def cfg_from_yaml(path):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def empty_model(cfg):
    """The model of `cfg` with allocated but uninitialised weights (fast, even for R101)."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return model.to_empty(device="cpu")


def load_strictly(model, path):
    """Load a converted checkpoint file with detectron2's DetectionCheckpointer, failing on any
    missing, unexpected or mis-shaped key; returns the model's state dict."""
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
    assert not incompatible.missing_keys, incompatible.missing_keys
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes, incompatible.incorrect_shapes
    return model.state_dict()


def value_signature(tensors):
    """Sorted (shape, sum, first value) of float tensors: equal for two dicts holding the same
    random tensors under any names."""
    return sorted(
        (tuple(t.shape), float(t.sum()), float(t.flatten()[0]))
        for t in tensors.values()
        if t.is_floating_point()
    )


@pytest.fixture
def light_r18_shapes():
    """The mmdetection light R18 checkpoint as meta tensors: shapes only, enough to convert."""
    return synthetic(key_list(LIGHT_R18), device="meta")


class TrainingState:
    """Stands for objects of classes a converter cannot (and must not) import, such as
    mmengine's log buffers in an mmdetection 3.x checkpoint."""

    def __init__(self):
        self.history = [1.0, 2.0]


@pytest.fixture(scope="module")
def light_r18_file(tmp_path_factory):
    """A synthetic mmdetection light R18 checkpoint file whose metadata holds an object of a
    class outside torch (which torch's safe loader refuses), and its state dict."""
    path = tmp_path_factory.mktemp("src") / "solov2_light_r18.pth"
    source_sd = synthetic(key_list(LIGHT_R18))
    torch.save({"meta": {"message_hub": TrainingState()}, "state_dict": source_sd}, path)
    return path, source_sd
