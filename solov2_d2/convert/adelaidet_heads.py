"""Name rules for the SOLOv2 heads of AdelaiDet (aim-uofa/AdelaiDet, adet/modeling/solov2).

AdelaiDet builds each tower as one flat ``nn.Sequential`` of (conv, GroupNorm, ReLU) triples, so
tower conv i is entry ``3i`` and its GroupNorm entry ``3i + 1``; the mask branch wraps each conv
as ``nn.Sequential(conv, GroupNorm, ReLU)``: conv ``.0``, GroupNorm ``.1``. Ours keep the norm
inside the conv (``.norm``) and count tower convs directly. AdelaiDet's heads have no deformable
convs (its DCN switches are read but never used), so no offset names are expected here.
"""
from typing import List, Optional

from .mapping import Rule

__all__ = ["adelaidet_head_rules"]


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
