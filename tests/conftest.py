# solov2_d2 must be imported before any detectron2 module: it bridges a detectron2 installed
# without compiled ops (solov2_d2.compat).
import json
import shutil
from pathlib import Path

import pytest
import torch

import solov2_d2  # isort: split

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from solov2_d2.data.datasets import register_coco_mini

# The converter tests' fixtures.
pytest_plugins = ["convert_fixtures"]

REPO = Path(__file__).resolve().parents[1]
# The shared data and reference files beside the repository (CI has them there too).
SHARED = REPO.parent / "shared"
FRUIT = SHARED / "data" / "fruit"


def register_shared_coco_mini():
    """Register coco_mini from the shared data unless the datasets root had it: it may not be
    redistributed, so it is not in the repository's datasets/."""
    if "coco_mini_val" not in DatasetCatalog.list() and (SHARED / "data" / "coco_mini").is_dir():
        register_coco_mini(str(SHARED / "data"))


register_shared_coco_mini()

FRUIT_CONFIG = str(REPO / "configs" / "fruit" / "SOLOv2_R18_fruit.yaml")
# The fruit config at a size that trains in seconds: short side 128, narrow heads, every cell
# kept at inference so that an untrained model has predictions to evaluate.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLOV2.INSTANCE_CHANNELS", "64",
    "MODEL.SOLOV2.MASK_CHANNELS", "32", "MODEL.SOLOV2.MASK_DIM", "32",
    "MODEL.SOLOV2.SCORE_THRESH_TEST", "0.0", "MODEL.SOLOV2.UPDATE_THRESH_TEST", "0.0",
    "MODEL.SOLOV2.MAX_PER_IMAGE_TEST", "10",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
    # The fruit recipe's training-time pieces off (their tests turn them on).
    "INPUT.LSJ.ENABLED", "False", "INPUT.COLOR_JITTER.ENABLED", "False",
    "INPUT.COPY_PASTE.ENABLED", "False", "MODEL_EMA.ENABLED", "False", "TEST.AUG.ENABLED", "False",
]  # fmt: skip


def tiny_fruit_argv(output_dir, *opts, eval_only=False, resume=False):
    """train_net.py's arguments: the tiny fruit config writing to `output_dir`, then `opts`."""
    argv = ["--config-file", FRUIT_CONFIG]
    argv += ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    return argv + TINY + ["OUTPUT_DIR", str(output_dir), *opts]


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


@pytest.fixture
def one_thread():
    """One thread for exact comparisons: a sigmoid rounds the few elements at the end of each
    thread's part of a tensor (a scalar loop) differently from the others, so the plain path's
    probabilities depend on the thread count. With one thread only a tensor's last elements take
    that loop (in the post-processing tests, the last candidate's last pixels, outside the last
    image's extent or of an invalid candidate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
