"""Name rules for the ResNet and FPN parts of foreign checkpoints.

Two ResNet layouts exist among published SOLOv2 checkpoints:

* torchvision style (the authors' SOLO, mmdetection, torchvision's ImageNet models): ``conv1``,
  ``bn1``, ``layer{1..4}.{i}.conv{k}`` / ``bn{k}`` / ``downsample.{0,1}``. Same module structure
  as detectron2's ResNet, whose stages are ``res{2..5}`` and whose norms live inside the conv as
  ``.norm``; the stride sits in the 3x3 conv (``MODEL.RESNETS.STRIDE_IN_1X1 = False``).
* detectron2 style (AdelaiDet, MSRA weights): already our names.

Deformable 3x3 convs carry their offset conv as ``conv2.conv_offset`` (mmcv's DCNv2 layer, our
layout) or, in older mmdetection and in detectron2's ``DeformBottleneckBlock``, as the sibling
``conv2_offset``. Both predict offsets and modulation in the same channel order, so both are
copied unchanged into our ``conv2.conv_offset``.
"""
import re
from typing import List

from .mapping import Rule

__all__ = ["detectron2_backbone_rules", "mmdet_fpn_rules", "torchvision_resnet_rules"]

_BN = r"(weight|bias|running_mean|running_var)"
_PARAM = r"(weight|bias)"
_D2 = "backbone.bottom_up."


def _stage(m: "re.Match") -> int:
    """torchvision's layer1..layer4 are detectron2's res2..res5."""
    return int(m.group(1)) + 1


def torchvision_resnet_rules(prefix: str) -> List[Rule]:
    """Rules from a torchvision-style ResNet/ResNeXt whose names start with `prefix`
    (``"backbone."`` in detector checkpoints, ``""`` for torchvision's ImageNet files)."""
    p = re.escape(prefix)
    block = p + r"layer([1-4])\.(\d+)\."
    return [
        Rule(p + r"conv1\.weight", _D2 + "stem.conv1.weight"),
        Rule(p + r"bn1\." + _BN, _D2 + "stem.conv1.norm.{1}"),
        Rule(
            block + r"conv([1-3])\.weight",
            lambda m: f"{_D2}res{_stage(m)}.{m[2]}.conv{m[3]}.weight",
        ),
        Rule(
            block + r"bn([1-3])\." + _BN,
            lambda m: f"{_D2}res{_stage(m)}.{m[2]}.conv{m[3]}.norm.{m[4]}",
        ),
        Rule(
            block + r"downsample\.0\.weight",
            lambda m: f"{_D2}res{_stage(m)}.{m[2]}.shortcut.weight",
        ),
        Rule(
            block + r"downsample\.1\." + _BN,
            lambda m: f"{_D2}res{_stage(m)}.{m[2]}.shortcut.norm.{m[3]}",
        ),
        Rule(
            block + r"conv2(?:\.conv_offset|_offset)\." + _PARAM,
            lambda m: f"{_D2}res{_stage(m)}.{m[2]}.conv2.conv_offset.{m[3]}",
        ),
    ]


def detectron2_backbone_rules() -> List[Rule]:
    """Rules for a detectron2 ResNet-FPN (AdelaiDet): our names, listed explicitly so that
    anything else is reported; a detectron2 DCN block's ``conv2_offset`` becomes
    ``conv2.conv_offset``."""
    d2 = re.escape(_D2)
    return [
        Rule(d2 + r"stem\.conv1\.(weight|norm\." + _BN + ")", "{0}"),
        Rule(d2 + r"res[2-5]\.\d+\.(conv[1-3]|shortcut)\.(weight|norm\." + _BN + ")", "{0}"),
        Rule(d2 + r"res[2-5]\.\d+\.conv2\.conv_offset\." + _PARAM, "{0}"),
        Rule(d2 + r"(res[2-5]\.\d+)\.conv2_offset\." + _PARAM, _D2 + "{1}.conv2.conv_offset.{2}"),
        Rule(r"backbone\.fpn_(lateral|output)[2-5]\." + _PARAM, "{0}"),
    ]


def mmdet_fpn_rules() -> List[Rule]:
    """mmdetection's FPN (``neck``): lateral and output conv i serve level i + 2 (P2 first)."""
    return [
        Rule(
            r"neck\.lateral_convs\.([0-3])\.conv\." + _PARAM,
            lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}",
        ),
        Rule(
            r"neck\.fpn_convs\.([0-3])\.conv\." + _PARAM,
            lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}",
        ),
    ]
