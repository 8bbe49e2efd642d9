"""Name rules for the SOLOv2 heads of the authors' SOLO (mmdetection v1) and of mmdetection 2.x/3.x.

Both build every head conv as an mmcv ``ConvModule``: the conv is ``.conv`` (a DCN layer keeps
its offset conv as ``.conv.conv_offset``) and the GroupNorm is ``.gn``. Ours keep the norm inside
the conv as ``.norm`` and the offset conv as ``.conv_offset``. Only the module paths differ
(ours: SOLO v1 / mmdetection 2.x-3.x):

* ``ins_head.cate_tower.{i}``: ``bbox_head.cate_convs.{i}`` / ``mask_head.cls_convs.{i}``
* ``ins_head.kernel_tower.{i}``: ``bbox_head.kernel_convs.{i}`` / ``mask_head.kernel_convs.{i}``
* ``ins_head.cate_pred``: ``bbox_head.solo_cate`` / ``mask_head.conv_cls``
* ``ins_head.kernel_pred``: ``bbox_head.solo_kernel`` / ``mask_head.conv_kernel``
* ``mask_head.level_convs.{l}.{j}``: ``mask_feat_head.convs_all_levels.{l}.conv{j}`` /
  ``mask_head.mask_feature_head.convs_all_levels.{l}.conv{j}``
* ``mask_head.conv_pred``: ``mask_feat_head.conv_pred.0`` /
  ``mask_head.mask_feature_head.conv_pred``
"""
import re
from typing import List

from .mapping import Rule

__all__ = ["mmdet_head_rules", "solo_head_rules"]


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
    tower: str,
    cate: str,
    kernel: str,
    cate_pred: str,
    kernel_pred: str,
    mask_branch: str,
    mask_pred: str,
) -> List[Rule]:
    """The rules of one naming scheme, from the module paths (regexes) of its parts."""
    return [
        *_conv_module(rf"{tower}\.{cate}_convs\.(\d+)", "ins_head.cate_tower.{1}"),
        *_conv_module(rf"{tower}\.{kernel}_convs\.(\d+)", "ins_head.kernel_tower.{1}"),
        Rule(rf"{cate_pred}\.(weight|bias)", "ins_head.cate_pred.{1}"),
        Rule(rf"{kernel_pred}\.(weight|bias)", "ins_head.kernel_pred.{1}"),
        *_conv_module(
            rf"{mask_branch}\.convs_all_levels\.(\d+)\.conv(\d+)", "mask_head.level_convs.{1}.{2}"
        ),
        *_conv_module(mask_pred, "mask_head.conv_pred"),
    ]


def solo_head_rules() -> List[Rule]:
    """The authors' SOLO (mmdetection v1): ``bbox_head`` and ``mask_feat_head``."""
    return _head_rules(
        tower=r"bbox_head",
        cate="cate",
        kernel="kernel",
        cate_pred=r"bbox_head\.solo_cate",
        kernel_pred=r"bbox_head\.solo_kernel",
        mask_branch=r"mask_feat_head",
        mask_pred=r"mask_feat_head\.conv_pred\.0",
    )


def mmdet_head_rules() -> List[Rule]:
    """mmdetection 2.x and 3.x (``SOLOV2Head``): everything under ``mask_head``."""
    return _head_rules(
        tower=r"mask_head",
        cate="cls",
        kernel="kernel",
        cate_pred=r"mask_head\.conv_cls",
        kernel_pred=r"mask_head\.conv_kernel",
        mask_branch=r"mask_head\.mask_feature_head",
        mask_pred=r"mask_head\.mask_feature_head\.conv_pred",
    )
