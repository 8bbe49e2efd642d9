"""The name rules (solov2_d2/convert/rules.py), by round trips: our checkpoint exported to each
family's naming and converted back is identical.

The export (our names -> theirs) is written here from the naming tables of the spec,
independently of the converter's rules, so the round trip checks the converter against a
second reading of the same tables. The model is a small R50 (narrow bottlenecks, narrow heads)
with deformable convs in the backbone and, where the family has them, in the heads.
"""
import re

import pytest
import torch

from convert_fixtures import empty_model  # isort: split

from solov2_d2.convert import convert_state_dict
from solov2_d2.convert.overrides import model_cfg

_BN_STATS = r"(weight|bias|running_mean|running_var)"

# ours -> torchvision-style ResNet and mmdetection FPN, shared by SOLO and mmdetection.
_TORCHVISION_BACKBONE = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", lambda m: "backbone.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\." + _BN_STATS, lambda m: f"backbone.bn1.{m[1]}"),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\." + _BN_STATS,
        lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight",
        lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\." + _BN_STATS,
        lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}",
    ),
    (
        r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv2\.conv_offset\.(weight|bias)",
        lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv2.conv_offset.{m[3]}",
    ),
    (
        r"backbone\.fpn_lateral(\d)\.(weight|bias)",
        lambda m: f"neck.lateral_convs.{int(m[1]) - 2}.conv.{m[2]}",
    ),
    (
        r"backbone\.fpn_output(\d)\.(weight|bias)",
        lambda m: f"neck.fpn_convs.{int(m[1]) - 2}.conv.{m[2]}",
    ),
]


def _conv_module(ours, theirs):
    """ours.{weight,conv_offset.*,norm.*} -> theirs.{conv.weight,conv.conv_offset.*,gn.*}."""
    return [
        (ours + r"\.weight", lambda m: theirs.format(*m.groups()) + ".conv.weight"),
        (
            ours + r"\.conv_offset\.(weight|bias)",
            lambda m: theirs.format(*m.groups()) + f".conv.conv_offset.{m.groups()[-1]}",
        ),
        (
            ours + r"\.norm\.(weight|bias)",
            lambda m: theirs.format(*m.groups()) + f".gn.{m.groups()[-1]}",
        ),
    ]


def _mmdet_style_heads(head, cate, cate_pred, kernel_pred, mask_branch, mask_pred):
    return [
        *_conv_module(r"ins_head\.cate_tower\.(\d+)", f"{head}.{cate}_convs.{{0}}"),
        *_conv_module(r"ins_head\.kernel_tower\.(\d+)", f"{head}.kernel_convs.{{0}}"),
        (r"ins_head\.cate_pred\.(weight|bias)", lambda m: f"{cate_pred}.{m[1]}"),
        (r"ins_head\.kernel_pred\.(weight|bias)", lambda m: f"{kernel_pred}.{m[1]}"),
        *_conv_module(
            r"mask_head\.level_convs\.(\d+)\.(\d+)",
            f"{mask_branch}.convs_all_levels.{{0}}.conv{{1}}",
        ),
        *_conv_module(r"mask_head\.conv_pred", mask_pred),
    ]


EXPORT = {
    "mmdet": _TORCHVISION_BACKBONE
    + _mmdet_style_heads(
        "mask_head",
        "cls",
        "mask_head.conv_cls",
        "mask_head.conv_kernel",
        "mask_head.mask_feature_head",
        "mask_head.mask_feature_head.conv_pred",
    ),
    "solo": _TORCHVISION_BACKBONE
    + _mmdet_style_heads(
        "bbox_head",
        "cate",
        "bbox_head.solo_cate",
        "bbox_head.solo_kernel",
        "mask_feat_head",
        "mask_feat_head.conv_pred.0",
    ),
    "adelaidet": [
        (
            r"backbone\.bottom_up\.(res\d\.\d+)\.conv2\.conv_offset\.(weight|bias)",
            lambda m: f"backbone.bottom_up.{m[1]}.conv2_offset.{m[2]}",
        ),
        (r"backbone\..*", lambda m: m[0]),
        (
            r"ins_head\.(cate|kernel)_tower\.(\d+)\.weight",
            lambda m: f"ins_head.{m[1]}_tower.{3 * int(m[2])}.weight",
        ),
        (
            r"ins_head\.(cate|kernel)_tower\.(\d+)\.norm\.(weight|bias)",
            lambda m: f"ins_head.{m[1]}_tower.{3 * int(m[2]) + 1}.{m[3]}",
        ),
        (r"ins_head\.(cate|kernel)_pred\..*", lambda m: m[0]),
        (
            r"mask_head\.level_convs\.(\d+)\.(\d+)\.weight",
            lambda m: f"mask_head.convs_all_levels.{m[1]}.conv{m[2]}.0.weight",
        ),
        (
            r"mask_head\.level_convs\.(\d+)\.(\d+)\.norm\.(weight|bias)",
            lambda m: f"mask_head.convs_all_levels.{m[1]}.conv{m[2]}.1.{m[3]}",
        ),
        (r"mask_head\.conv_pred\.weight", lambda m: "mask_head.conv_pred.0.weight"),
        (r"mask_head\.conv_pred\.norm\.(weight|bias)", lambda m: f"mask_head.conv_pred.1.{m[1]}"),
    ],
}


def export(state_dict, family):
    """Our state dict in `family`'s names; torchvision-style BatchNorms get their counter."""
    out = {}
    for name, tensor in state_dict.items():
        for pattern, new in EXPORT[family]:
            m = re.fullmatch(pattern, name)
            if m:
                out[new(m)] = tensor
                break
        else:
            raise AssertionError(f"no export rule for {name}")
        if family != "adelaidet" and name.endswith(".norm.running_var"):
            out[new(m).replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    return out


def small_r50_overrides(head_dcn):
    """A narrow R50 (bottleneck width 16, res2 output 64; no published variant has it) with
    DCN in res3..res5, and narrow heads (with DCN everywhere if `head_dcn`)."""
    return {
        "MODEL": {
            "RESNETS": {
                "DEPTH": 50,
                "WIDTH_PER_GROUP": 16,
                "RES2_OUT_CHANNELS": 64,
                "NORM": "FrozenBN",
                "DEFORM_ON_PER_STAGE": [False, True, True, True],
                "DEFORM_MODULATED": True,
            },
            "SOLOV2": {
                "NUM_CLASSES": 7,
                "INSTANCE_CHANNELS": 64,
                "NUM_INSTANCE_CONVS": 2,
                "MASK_CHANNELS": 32,
                "MASK_DIM": 32,
                "DCN_IN_TOWER": "all" if head_dcn else "none",
                "DCN_IN_MASK_BRANCH": head_dcn,
            },
        }
    }


@pytest.mark.parametrize("family", ["mmdet", "solo", "adelaidet"])
def test_export_then_convert_back_is_identical(family):
    # AdelaiDet's heads have no deformable convs.
    overrides = small_r50_overrides(head_dcn=family != "adelaidet")
    model = empty_model(model_cfg(overrides))
    gen = torch.Generator().manual_seed(3)
    ours = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}

    exported = export(ours, family)
    result = convert_state_dict(exported, source=family)

    assert list(result.state_dict) == list(ours)
    for name, tensor in ours.items():
        assert torch.equal(result.state_dict[name], tensor), name
    # No published config has this architecture: the overrides must describe all of it.
    assert result.variant is None
    assert empty_model(model_cfg(result.overrides)).state_dict().keys() == ours.keys()
    assert all(k.endswith("num_batches_tracked") for k in result.dropped)
