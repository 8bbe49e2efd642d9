"""Name rules: how the tensor names of each checkpoint family become ours (see :mod:`.mapping`).

Backbone. Two ResNet layouts exist among published SOLOv2 checkpoints:

* torchvision style (the authors' SOLO, mmdetection, torchvision's ImageNet models): ``conv1``,
  ``bn1``, ``layer{1..4}.{i}.conv{k}`` / ``bn{k}`` / ``downsample.{0,1}``. Same module structure
  as detectron2's ResNet, whose stages are ``res{2..5}`` and whose norms live inside the conv as
  ``.norm``; the stride sits in the 3x3 conv (``MODEL.RESNETS.STRIDE_IN_1X1 = False``).
* detectron2 style (AdelaiDet, MSRA weights): already our names.

Deformable 3x3 convs carry their offset conv as ``conv2.conv_offset`` (mmcv's DCNv2 layer, our
layout) or, in older mmdetection and in detectron2's ``DeformBottleneckBlock``, as the sibling
``conv2_offset``. Both predict offsets and modulation in the same channel order, so both are
copied unchanged into our ``conv2.conv_offset``.

Heads of the authors' SOLO (mmdetection v1) and of mmdetection 2.x/3.x. Both build every head
conv as an mmcv ``ConvModule``: the conv is ``.conv`` (a DCN layer keeps its offset conv as
``.conv.conv_offset``) and the GroupNorm is ``.gn``. Ours keep the norm inside the conv as
``.norm`` and the offset conv as ``.conv_offset``. Only the module paths differ (ours: SOLO v1 /
mmdetection 2.x-3.x):

* ``ins_head.cate_tower.{i}``: ``bbox_head.cate_convs.{i}`` / ``mask_head.cls_convs.{i}``
* ``ins_head.kernel_tower.{i}``: ``bbox_head.kernel_convs.{i}`` / ``mask_head.kernel_convs.{i}``
* ``ins_head.cate_pred``: ``bbox_head.solo_cate`` / ``mask_head.conv_cls``
* ``ins_head.kernel_pred``: ``bbox_head.solo_kernel`` / ``mask_head.conv_kernel``
* ``mask_head.level_convs.{l}.{j}``: ``mask_feat_head.convs_all_levels.{l}.conv{j}`` /
  ``mask_head.mask_feature_head.convs_all_levels.{l}.conv{j}``
* ``mask_head.conv_pred``: ``mask_feat_head.conv_pred.0`` /
  ``mask_head.mask_feature_head.conv_pred``

Heads of AdelaiDet (aim-uofa/AdelaiDet, adet/modeling/solov2). Each tower is one flat
``nn.Sequential`` of (conv, GroupNorm, ReLU) triples, so tower conv i is entry ``3i`` and its
GroupNorm entry ``3i + 1``; the mask branch wraps each conv as ``nn.Sequential(conv, GroupNorm,
ReLU)``: conv ``.0``, GroupNorm ``.1``. Ours keep the norm inside the conv (``.norm``) and count
tower convs directly. AdelaiDet's heads have no deformable convs (its DCN switches are read but
never used), so no offset names are expected here.
"""
import re
from typing import List, Optional

from .mapping import Rule

__all__ = [
    "adelaidet_head_rules",
    "detectron2_backbone_rules",
    "mmdet_fpn_rules",
    "mmdet_head_rules",
    "solo_head_rules",
    "torchvision_resnet_rules",
]

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


def _conv_module(src: str, dst: str) -> List[Rule]:
    """Rules for one family of ConvModules.

    Args:
        src: regex of the module path; its groups are the indices used in `dst`.
        dst: our module path, a format template over those groups (``{1}``, ``{2}``).
    """
    num_groups = re.compile(src).groups

    def target(suffix):
        def name(m):
            groups = m.groups()
            return dst.format(m[0], *groups[:num_groups]) + suffix.format(*groups[num_groups:])

        return name

    return [
        Rule(src + r"\.conv\.weight", target(".weight")),
        Rule(src + r"\.conv\.conv_offset\.(weight|bias)", target(".conv_offset.{0}")),
        Rule(src + r"\.gn\.(weight|bias)", target(".norm.{0}")),
    ]


def _head_rules(
    tower: str, cate: str, cate_pred: str, kernel_pred: str, mask_branch: str, mask_pred: str
) -> List[Rule]:
    """The rules of one naming scheme, from the module paths of its parts: the towers' module
    `tower` with ``{cate}_convs`` and ``kernel_convs``, the predictors `cate_pred` and
    `kernel_pred` in `tower`, the mask branch `mask_branch` with its predictor `mask_pred`."""
    tower, mask_branch = re.escape(tower), re.escape(mask_branch)
    cate_pred, kernel_pred, mask_pred = map(re.escape, (cate_pred, kernel_pred, mask_pred))
    return [
        *_conv_module(rf"{tower}\.{cate}_convs\.(\d+)", "ins_head.cate_tower.{1}"),
        *_conv_module(rf"{tower}\.kernel_convs\.(\d+)", "ins_head.kernel_tower.{1}"),
        Rule(rf"{tower}\.{cate_pred}\.(weight|bias)", "ins_head.cate_pred.{1}"),
        Rule(rf"{tower}\.{kernel_pred}\.(weight|bias)", "ins_head.kernel_pred.{1}"),
        *_conv_module(
            rf"{mask_branch}\.convs_all_levels\.(\d+)\.conv(\d+)", "mask_head.level_convs.{1}.{2}"
        ),
        *_conv_module(rf"{mask_branch}\.{mask_pred}", "mask_head.conv_pred"),
    ]


def solo_head_rules() -> List[Rule]:
    """The authors' SOLO (mmdetection v1): ``bbox_head`` and ``mask_feat_head``."""
    return _head_rules(
        "bbox_head", "cate", "solo_cate", "solo_kernel", "mask_feat_head", "conv_pred.0"
    )


def mmdet_head_rules() -> List[Rule]:
    """mmdetection 2.x and 3.x (``SOLOV2Head``): everything under ``mask_head``."""
    return _head_rules(
        "mask_head", "cls", "conv_cls", "conv_kernel", "mask_head.mask_feature_head", "conv_pred"
    )


def _tower_entry(m) -> Optional[str]:
    """``ins_head.{cate,kernel}_tower.{n}.{param}`` to ours; None for entries that cannot exist
    in AdelaiDet's layout (a bias of a conv, anything at a ReLU position)."""
    tower, index, param = m[1], int(m[2]), m[3]
    conv, position = divmod(index, 3)
    if position == 0 and param == "weight":
        return f"ins_head.{tower}_tower.{conv}.weight"
    if position == 1:
        return f"ins_head.{tower}_tower.{conv}.norm.{param}"
    return None


def adelaidet_head_rules() -> List[Rule]:
    """AdelaiDet's ``ins_head`` and ``mask_head``."""
    return [
        Rule(r"ins_head\.(cate|kernel)_tower\.(\d+)\.(weight|bias)", _tower_entry),
        Rule(r"ins_head\.(cate|kernel)_pred\.(weight|bias)", "{0}"),
        Rule(
            r"mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.0\.weight",
            "mask_head.level_convs.{1}.{2}.weight",
        ),
        Rule(
            r"mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.1\.(weight|bias)",
            "mask_head.level_convs.{1}.{2}.norm.{3}",
        ),
        Rule(r"mask_head\.conv_pred\.0\.weight", "mask_head.conv_pred.weight"),
        Rule(r"mask_head\.conv_pred\.1\.(weight|bias)", "mask_head.conv_pred.norm.{1}"),
    ]
