"""Configs of models with random weights, as the benchmarks build them."""
from pathlib import Path

import solov2_d2  # isort: split

from detectron2.config import get_cfg

REPO = Path(__file__).resolve().parents[1]


def random_model_cfg(config: str, device: str):
    """The config `config` (a path relative to the repository) with no weights to load (random
    initialisation) on `device`."""
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(str(REPO / config))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    return cfg
