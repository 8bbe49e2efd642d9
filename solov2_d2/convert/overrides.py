"""Config overrides that converted weights need, the model they describe, and the yaml written.

The overrides set every config key that shapes a parameter or that the weights were trained to
expect (input channel order and normalisation, where the ResNet strides), so a model built from
them loads the converted checkpoint with no missing or unexpected keys whatever the ``_BASE_``
config says. The ``_BASE_`` config contributes the rest (schedule, input sizes, datasets).
"""
import os
import textwrap
from typing import Any, Dict, Optional, Sequence

import torch
import yaml

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from .architecture import HeadSpec, ResNetSpec
from .sources import InputStyle
from .variants import BASE_CONFIG, LVIS_CLASSES, Variant, load_config

__all__ = ["config_overrides", "model_cfg", "overrides_yaml", "target_shapes"]


def config_overrides(
    resnet: ResNetSpec,
    heads: HeadSpec,
    num_classes: int,
    input_style: InputStyle,
    variant: Optional[Variant] = None,
) -> Dict[str, Any]:
    """The config keys converted weights need, as a nested dict (yaml layout).

    Args:
        resnet, heads, num_classes: the architecture.
        input_style: the convention the backbone was trained with.
        variant: the published variant the weights are, if any: its scale ranges, and for LVIS
            the dataset version of the category count.
    """
    overrides = {
        "INPUT": {"FORMAT": input_style.format},
        "MODEL": {
            "PIXEL_MEAN": list(input_style.pixel_mean),
            "PIXEL_STD": list(input_style.pixel_std),
            "RESNETS": {
                **resnet.config(),
                "STRIDE_IN_1X1": input_style.stride_in_1x1,
                # Pretrained statistics, kept as they are (as all published models do).
                "NORM": "FrozenBN",
                "DEFORM_MODULATED": True,
            },
            "SOLOV2": {"NUM_CLASSES": num_classes, **heads.config()},
        },
    }
    if variant is not None:
        overrides["MODEL"]["SOLOV2"]["SCALE_RANGES"] = [list(r) for r in variant.scale_ranges]
        if variant.is_lvis and num_classes in LVIS_CLASSES:
            version = LVIS_CLASSES[num_classes]
            overrides["DATASETS"] = {"TRAIN": [f"{version}_train"], "TEST": [f"{version}_val"]}
    return overrides


def model_cfg(overrides: Dict[str, Any]) -> CfgNode:
    """A full config: configs/Base-SOLOv2.yaml on SOLOv2's defaults, then `overrides`."""
    cfg = load_config(BASE_CONFIG)
    cfg.merge_from_other_cfg(CfgNode(overrides))
    return cfg


def target_shapes(cfg: CfgNode) -> Dict[str, tuple]:
    """Name -> shape of every state-dict entry of the model `cfg` builds.

    The model is built on the meta device: shapes without allocating or initialising weights,
    fast even for ResNeXt-101.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def overrides_yaml(
    overrides: Dict[str, Any], base_config: str, weights: str, comments: Sequence[str]
) -> str:
    """The text of a config file: `comments` as a header, ``_BASE_``, the weights, `overrides`."""
    content = {"_BASE_": base_config}
    content.update(overrides)
    content["MODEL"] = {"WEIGHTS": os.path.abspath(weights), **overrides["MODEL"]}
    # Paths stay whole, for copying.
    wrap = textwrap.TextWrapper(98, break_long_words=False, break_on_hyphens=False)
    lines = [part for line in comments for part in wrap.wrap(line)]
    header = "".join(f"# {line}\n" for line in lines)
    return header + yaml.safe_dump(content, sort_keys=False, default_flow_style=None)
