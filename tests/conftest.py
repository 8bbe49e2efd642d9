# solov2_d2 must be imported before any detectron2 module: it bridges a detectron2 installed
# without compiled ops (solov2_d2.compat).
import json
import shutil
from pathlib import Path

import pytest

import solov2_d2  # isort: split

from detectron2.config import get_cfg

REPO = Path(__file__).resolve().parents[1]
# The shared data and reference files beside the repository (CI has them there too).
SHARED = REPO.parent / "shared"
FRUIT = SHARED / "data" / "fruit"


def small_solov2_cfg(num_classes: int = 3, depth: int = 18):
    """A SOLOv2 config small enough for CPU tests: ResNet-18 (GN, trainable from scratch),
    light heads. Everything else keeps the defaults of configs/Base-SOLOv2.yaml."""
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-SOLOv2.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.NORM = ""
    cfg.MODEL.SOLOV2.NUM_CLASSES = num_classes
    cfg.MODEL.SOLOV2.INSTANCE_CHANNELS = 128
    cfg.MODEL.SOLOV2.NUM_INSTANCE_CONVS = 2
    cfg.MODEL.SOLOV2.MASK_DIM = 64
    return cfg


@pytest.fixture
def small_cfg():
    return small_solov2_cfg()


def copy_fruit(folder: Path, stems, without_shapes=()) -> Path:
    """A labelme folder with copies of the fruit photos and JSON files `stems` (e.g. ["0", "1"]);
    the JSON files of `without_shapes` get an empty `shapes` list (images without instances)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        shutil.copyfile(FRUIT / f"{stem}.jpg", folder / f"{stem}.jpg")
        data = json.loads((FRUIT / f"{stem}.json").read_text())
        if stem in without_shapes:
            data["shapes"] = []
        (folder / f"{stem}.json").write_text(json.dumps(data))
    return folder
