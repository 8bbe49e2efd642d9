"""The checkpoint families the converter reads, and how to tell them apart.

===========  ==========================================  ==============  =====================
name         what                                        container       input convention
===========  ==========================================  ==============  =====================
solo         the authors' SOLO (mmdetection v1)          ``state_dict``  torchvision (RGB)
mmdet        mmdetection 2.x and 3.x                     ``state_dict``  torchvision (RGB)
adelaidet    AdelaiDet (Detectron2 names)                ``model``       MSRA (BGR)
torchvision  torchvision ImageNet ResNet/ResNeXt         bare            torchvision (RGB)
===========  ==========================================  ==============  =====================

All families list their 80 COCO categories in the same order (by COCO category id), so category
outputs are copied row by row. The authors' SOLO counts a background class 0 in its config
(``num_classes=81``) but its category conv has only the 80 foreground outputs; a category conv
of 81 outputs from that code base carries the background as row 0, which is dropped.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

from .mapping import DropRule, Renamed, Rule
from .rules import (
    adelaidet_head_rules,
    detectron2_backbone_rules,
    mmdet_fpn_rules,
    mmdet_head_rules,
    solo_head_rules,
    torchvision_resnet_rules,
)

__all__ = [
    "InputStyle",
    "MSRA_INPUT",
    "SOURCES",
    "Source",
    "TORCHVISION_INPUT",
    "guess_source",
    "solov2_d2_names",
]


@dataclass(frozen=True)
class InputStyle:
    """How a backbone's weights expect their input, as detectron2 config values."""

    name: str
    format: str  # INPUT.FORMAT
    pixel_mean: Tuple[float, float, float]  # MODEL.PIXEL_MEAN, in `format`'s channel order
    pixel_std: Tuple[float, float, float]  # MODEL.PIXEL_STD
    stride_in_1x1: bool  # MODEL.RESNETS.STRIDE_IN_1X1


TORCHVISION_INPUT = InputStyle(
    "torchvision",
    "RGB",
    (123.675, 116.28, 103.53),
    (58.395, 57.12, 57.375),
    stride_in_1x1=False,
)
# Caffe2/MSRA ResNets (detectron2's ImageNet weights): BGR, mean only, stride in the 1x1 conv.
MSRA_INPUT = InputStyle("MSRA", "BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0), True)

# BatchNorm's update counter: detectron2's FrozenBatchNorm2d has none, and it does not take
# part in any computation.
_DROP_BN_COUNTER = DropRule(r"(.+\.)?num_batches_tracked", "BatchNorm update counter")

_SOLO_BACKGROUND_CLASSES = 81


def _drop_background_row(renamed: Renamed) -> List[str]:
    """The authors' SOLO: drop row 0 (background) of an 81-output category conv."""
    notes = []
    for param in ("weight", "bias"):
        name = f"ins_head.cate_pred.{param}"
        tensor = renamed.tensors.get(name)
        if tensor is not None and tensor.shape[0] == _SOLO_BACKGROUND_CLASSES:
            renamed.tensors[name] = tensor[1:].clone()
            notes.append(f"dropped the background row 0 of {renamed.origin[name]}")
    return notes


@dataclass(frozen=True)
class Source:
    """One checkpoint family.

    Attributes:
        name: the value of ``--from``.
        label: its name in messages.
        rules, drop_rules: how its tensor names become ours (see :mod:`.mapping`).
        input_style: the input convention its backbone was trained with.
        backbone_only: an ImageNet classifier: only the ResNet is converted.
        adjust: fixes applied after renaming (returns notes for the report).
    """

    name: str
    label: str
    rules: Tuple[Rule, ...]
    drop_rules: Tuple[DropRule, ...]
    input_style: InputStyle
    backbone_only: bool = False
    adjust: Optional[Callable[[Renamed], List[str]]] = field(default=None, compare=False)


SOURCES = {
    s.name: s
    for s in (
        Source(
            "solo",
            "SOLO (mmdetection v1)",
            (*torchvision_resnet_rules("backbone."), *mmdet_fpn_rules(), *solo_head_rules()),
            (_DROP_BN_COUNTER,),
            TORCHVISION_INPUT,
            adjust=_drop_background_row,
        ),
        Source(
            "mmdet",
            "mmdetection 2.x/3.x",
            (*torchvision_resnet_rules("backbone."), *mmdet_fpn_rules(), *mmdet_head_rules()),
            (_DROP_BN_COUNTER,),
            TORCHVISION_INPUT,
        ),
        Source(
            "adelaidet",
            "AdelaiDet",
            (*detectron2_backbone_rules(), *adelaidet_head_rules()),
            (_DROP_BN_COUNTER,),
            MSRA_INPUT,
        ),
        Source(
            "torchvision",
            "torchvision ImageNet ResNet",
            tuple(torchvision_resnet_rules("")),
            (
                _DROP_BN_COUNTER,
                DropRule(r"fc\.(weight|bias)", "ImageNet classifier, not part of a detector"),
            ),
            TORCHVISION_INPUT,
            backbone_only=True,
        ),
    )
}


def guess_source(names: Iterable[str]) -> Optional[str]:
    """The family whose characteristic names appear in `names`, or None."""
    names = set(names)

    def has_prefix(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    if has_prefix("bbox_head.", "mask_feat_head."):
        return "solo"
    if has_prefix("mask_head.mask_feature_head.", "mask_head.cls_convs."):
        return "mmdet"
    if has_prefix("ins_head.", "backbone.bottom_up."):
        return "adelaidet"
    if "conv1.weight" in names and has_prefix("layer1."):
        return "torchvision"
    return None


# Names only this project's SOLOv2 has (AdelaiDet's are mask_head.convs_all_levels.*,
# mask_head.conv_pred.{0,1}.* and ins_head.*_tower.<i>.weight with separate norm entries).
_OURS = re.compile(
    r"mask_head\.level_convs\.\d+\.\d+\.|mask_head\.conv_pred\.(weight|norm\.)"
    r"|ins_head\.(cate|kernel)_tower\.\d+\.norm\."
)


def solov2_d2_names(names: Iterable[str]) -> List[str]:
    """The names of `names` that only a checkpoint of this project's SOLOv2 (trained by
    train_net.py or written by the converter) has: if there are any, it needs no conversion."""
    return [n for n in names if _OURS.match(n)]
