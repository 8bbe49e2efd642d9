"""The converter's description of each published variant agrees with its config file.

The converter describes the variants on its own (it must run without the config files), so this
checks the two against each other wherever a config file exists: the model the config builds has
the parameter names and shapes of the model the converter's overrides build, with the same
number of categories and scale ranges.
"""
import pytest
import torch

from convert_fixtures import REPO, cfg_from_yaml  # isort: split

from detectron2.modeling import build_model

from solov2_d2.convert import VARIANTS
from solov2_d2.convert.overrides import config_overrides, model_cfg
from solov2_d2.convert.sources import TORCHVISION_INPUT


def meta_shapes(cfg):
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_variant_matches_its_config_file(variant):
    path = REPO / "configs" / variant.config_file
    assert path.is_file(), f"variant {variant.name} names a missing config {path}"
    cfg = cfg_from_yaml(path)
    assert cfg.MODEL.SOLOV2.NUM_CLASSES in variant.class_counts
    overrides = config_overrides(
        variant.resnet,
        variant.heads,
        cfg.MODEL.SOLOV2.NUM_CLASSES,
        TORCHVISION_INPUT,
        variant.scale_ranges,
    )
    ours = model_cfg(overrides)
    assert [list(r) for r in cfg.MODEL.SOLOV2.SCALE_RANGES] == [
        list(r) for r in ours.MODEL.SOLOV2.SCALE_RANGES
    ]
    assert meta_shapes(cfg) == meta_shapes(ours)
