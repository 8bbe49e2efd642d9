"""Converting checkpoints with the exact names and shapes of the published SOLOv2 model zoos.

Each reference key list (../shared/reference/checkpoint_keys) becomes a synthetic checkpoint of
random values; it is converted, loaded strictly into the model of the variant, and chosen tensors
are checked to land where they must. The smaller ones go through files, as users run it: saved
in their family's container, converted by `convert_checkpoint`, the written config built (on
the variants' configs) and the weights loaded by detectron2's DetectionCheckpointer. The larger ones
are converted in memory, to keep the suite fast.
"""
import pytest
import torch
import yaml
from torchvision.ops import deform_conv2d

from convert_fixtures import (  # isort: split
    cfg_from_yaml,
    empty_model,
    key_list,
    load_strictly,
    synthetic,
    value_signature,
)

from solov2_d2.convert import CONFIGS_DIR, convert_checkpoint, convert_state_dict
from solov2_d2.convert.overrides import model_cfg
from solov2_d2.layers.deform_conv import ModulatedDeformConv2d

TORCHVISION_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_STD = [58.395, 57.12, 57.375]

# (source name, our name) pairs present in every mmdetection SOLOv2 checkpoint.
MMDET_COMMON = [
    # The first kernel-tower conv sees the 2 coordinate channels.
    ("mask_head.kernel_convs.0.conv.weight", "ins_head.kernel_tower.0.weight"),
    # Category rows in the same (COCO) order.
    ("mask_head.conv_cls.weight", "ins_head.cate_pred.weight"),
    ("mask_head.conv_cls.bias", "ins_head.cate_pred.bias"),
    ("mask_head.conv_kernel.weight", "ins_head.kernel_pred.weight"),
    ("mask_head.cls_convs.1.gn.weight", "ins_head.cate_tower.1.norm.weight"),
    (
        "mask_head.mask_feature_head.convs_all_levels.3.conv2.gn.weight",
        "mask_head.level_convs.3.2.norm.weight",
    ),
    (
        "mask_head.mask_feature_head.convs_all_levels.3.conv0.conv.weight",
        "mask_head.level_convs.3.0.weight",
    ),
    ("mask_head.mask_feature_head.conv_pred.gn.bias", "mask_head.conv_pred.norm.bias"),
    ("backbone.conv1.weight", "backbone.bottom_up.stem.conv1.weight"),
    ("backbone.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var"),
    ("backbone.layer2.0.downsample.0.weight", "backbone.bottom_up.res3.0.shortcut.weight"),
    (
        "backbone.layer1.1.bn2.running_mean",
        "backbone.bottom_up.res2.1.conv2.norm.running_mean",
    ),
    ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
    ("neck.fpn_convs.3.conv.bias", "backbone.fpn_output5.bias"),
]

ADELAIDET_COMMON = [
    ("ins_head.kernel_tower.0.weight", "ins_head.kernel_tower.0.weight"),
    ("ins_head.cate_tower.9.weight", "ins_head.cate_tower.3.weight"),
    ("ins_head.cate_tower.10.weight", "ins_head.cate_tower.3.norm.weight"),
    ("ins_head.kernel_tower.4.bias", "ins_head.kernel_tower.1.norm.bias"),
    ("ins_head.cate_pred.weight", "ins_head.cate_pred.weight"),
    ("mask_head.convs_all_levels.3.conv0.0.weight", "mask_head.level_convs.3.0.weight"),
    ("mask_head.convs_all_levels.2.conv1.1.weight", "mask_head.level_convs.2.1.norm.weight"),
    ("mask_head.conv_pred.1.bias", "mask_head.conv_pred.norm.bias"),
    ("backbone.bottom_up.res2.0.shortcut.norm.running_var",) * 2,
    ("backbone.fpn_output3.weight",) * 2,
]

# key list, config to request (None: detect), expected variant, extra pairs, expected overrides;
# the cases in FILE_CASES go through files.
FILE_CASES = ("mmdet_r50_1x", "mmdet_light_r18", "adelaidet_r50")
CASES = {
    "mmdet_r50_1x": (
        "mmdet3_solov2_r50_fpn_1x_coco.txt",
        "SOLOv2_R50_1x",
        "SOLOv2_R50_1x",
        [("backbone.layer4.2.bn3.bias", "backbone.bottom_up.res5.2.conv3.norm.bias")],
        {"MODEL.RESNETS.DEPTH": 50, "MODEL.SOLOV2.NUM_INSTANCE_CONVS": 4},
    ),
    "mmdet_r101_dcn": (
        "mmdet3_solov2_r101-dcn_fpn_ms-3x_coco.txt",
        None,
        "SOLOv2_R101_DCN_3x",
        [
            (
                "backbone.layer3.22.conv2.conv_offset.weight",
                "backbone.bottom_up.res4.22.conv2.conv_offset.weight",
            ),
            (
                "mask_head.cls_convs.3.conv.conv_offset.bias",
                "ins_head.cate_tower.3.conv_offset.bias",
            ),
            (
                "mask_head.mask_feature_head.conv_pred.conv.conv_offset.weight",
                "mask_head.conv_pred.conv_offset.weight",
            ),
        ],
        {
            "MODEL.RESNETS.DEPTH": 101,
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True],
            "MODEL.SOLOV2.DCN_IN_TOWER": "all",
            "MODEL.SOLOV2.DCN_IN_MASK_BRANCH": True,
        },
    ),
    "mmdet_light_r18": (
        "mmdet3_solov2-light_r18_fpn_ms-3x_coco.txt",
        None,
        "SOLOv2_Light_448_R18_3x",
        [("backbone.layer2.0.conv1.weight", "backbone.bottom_up.res3.0.conv1.weight")],
        {
            "MODEL.RESNETS.DEPTH": 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
            "MODEL.SOLOV2.INSTANCE_CHANNELS": 256,
            "MODEL.SOLOV2.NUM_INSTANCE_CONVS": 2,
            "MODEL.SOLOV2.MASK_DIM": 128,
            "MODEL.SOLOV2.SCALE_RANGES": [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]],
        },
    ),
    "mmdet_light_r50_dcn": (
        "mmdet3_solov2-light_r50-dcn_fpn_ms-3x_coco.txt",
        None,
        "SOLOv2_Light_512_R50_DCN_3x",
        [
            (
                "mask_head.kernel_convs.2.conv.conv_offset.weight",
                "ins_head.kernel_tower.2.conv_offset.weight",
            ),
            (
                "backbone.layer2.3.conv2.conv_offset.bias",
                "backbone.bottom_up.res3.3.conv2.conv_offset.bias",
            ),
        ],
        {
            "MODEL.SOLOV2.NUM_INSTANCE_CONVS": 3,
            "MODEL.SOLOV2.DCN_IN_TOWER": "last",
            "MODEL.SOLOV2.DCN_IN_MASK_BRANCH": False,
            "MODEL.SOLOV2.SCALE_RANGES": [[1, 64], [32, 128], [64, 256], [128, 512], [256, 2048]],
        },
    ),
    "adelaidet_r50": (
        "adelaidet_SOLOv2_R50_3x.txt",
        None,
        "SOLOv2_R50_3x",
        [],
        {
            "INPUT.FORMAT": "BGR",
            "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
            "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
            "MODEL.RESNETS.STRIDE_IN_1X1": True,
        },
    ),
    "adelaidet_r101": (
        "adelaidet_SOLOv2_R101_3x.txt",
        "configs/SOLOv2_R101_3x.yaml",
        "SOLOv2_R101_3x",
        [("backbone.bottom_up.res4.22.conv3.weight",) * 2],
        {"MODEL.RESNETS.DEPTH": 101, "INPUT.FORMAT": "BGR"},
    ),
}


def _lookup(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def convert_and_load(source_sd, container, tmp_path, **kwargs):
    """Save `source_sd` in `container`, convert the file, build the model of the written
    config and load the result with DetectionCheckpointer. Returns (result, the model's state
    dict, the written config as a dict)."""
    src, dst = tmp_path / "source.pth", tmp_path / "converted.pth"
    torch.save({container: source_sd, "meta": {"epoch": 36}}, src)
    result = convert_checkpoint(str(src), str(dst), **kwargs)
    assert result.config_path == str(tmp_path / "converted.yaml")
    cfg = cfg_from_yaml(result.config_path)
    assert cfg.MODEL.WEIGHTS == str(dst)
    loaded = load_strictly(empty_model(cfg), cfg.MODEL.WEIGHTS)
    with open(result.config_path) as f:
        written = yaml.safe_load(f)
    return result, loaded, written


def convert_in_memory(source_sd, **kwargs):
    """Convert `source_sd` and load it strictly into the model of the overrides. Returns
    (result, the model's state dict, the overrides)."""
    result = convert_state_dict(source_sd, **kwargs)
    model = empty_model(model_cfg(result.overrides))
    model.load_state_dict(result.state_dict, strict=True)
    return result, model.state_dict(), result.overrides


@pytest.mark.parametrize("case", list(CASES))
def test_published_checkpoint_converts_and_loads_strictly(case, tmp_path):
    key_file, config, variant, pairs, expected = CASES[case]
    adelaidet = key_file.startswith("adelaidet")
    source_sd = synthetic(key_list(key_file))
    # Also leave the family to be guessed from the names once.
    source = None if case == "mmdet_light_r18" else ("adelaidet" if adelaidet else "mmdet")
    if case in FILE_CASES:
        container = "model" if adelaidet else "state_dict"
        result, loaded, written = convert_and_load(
            source_sd, container, tmp_path, source=source, config=config
        )
        assert written["_BASE_"] == str(CONFIGS_DIR / f"{variant}.yaml")
    else:
        result, loaded, written = convert_in_memory(source_sd, source=source, config=config)
    assert result.variant.name == variant
    for key, value in expected.items():
        assert _lookup(written, key) == value, key
    if not adelaidet:
        assert written["INPUT"]["FORMAT"] == "RGB"
        assert written["MODEL"]["PIXEL_MEAN"] == TORCHVISION_MEAN
        assert written["MODEL"]["PIXEL_STD"] == TORCHVISION_STD
        assert written["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
    assert written["MODEL"]["RESNETS"]["NORM"] == "FrozenBN"
    assert written["MODEL"]["SOLOV2"]["NUM_CLASSES"] == 80

    for source_name, our_name in (ADELAIDET_COMMON if adelaidet else MMDET_COMMON) + pairs:
        assert torch.equal(loaded[our_name], source_sd[source_name]), (source_name, our_name)
    assert loaded["ins_head.kernel_tower.0.weight"].shape[1] == 258
    # Every value arrives unchanged; only BatchNorm counters are left behind.
    dropped = {k for k in source_sd if k.endswith("num_batches_tracked")}
    assert set(result.dropped) == dropped
    assert value_signature(loaded) == value_signature(source_sd)


def mmdet_to_solo_names(state_dict):
    """mmdetection 2.x/3.x names -> the authors' SOLO (mmdet v1) names."""
    renames = [
        ("mask_head.mask_feature_head.conv_pred.", "mask_feat_head.conv_pred.0."),
        ("mask_head.mask_feature_head.", "mask_feat_head."),
        ("mask_head.cls_convs.", "bbox_head.cate_convs."),
        ("mask_head.kernel_convs.", "bbox_head.kernel_convs."),
        ("mask_head.conv_cls.", "bbox_head.solo_cate."),
        ("mask_head.conv_kernel.", "bbox_head.solo_kernel."),
    ]
    out = {}
    for name, tensor in state_dict.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


def test_solo_r101_dcn_with_background_row_and_old_offset_names():
    """The authors' layout: bbox_head/mask_feat_head, an 81-row category conv with background
    first, and the backbone's offset convs named conv2_offset."""
    shapes = key_list("mmdet3_solov2_r101-dcn_fpn_ms-3x_coco.txt")
    shapes["mask_head.conv_cls.weight"] = (81, 512, 3, 3)
    shapes["mask_head.conv_cls.bias"] = (81,)
    source_sd = mmdet_to_solo_names(synthetic(shapes, seed=1))
    source_sd = {k.replace("conv2.conv_offset", "conv2_offset"): v for k, v in source_sd.items()}
    assert "backbone.layer3.5.conv2_offset.weight" in source_sd

    result, loaded, _ = convert_in_memory(source_sd, source="solo")
    assert result.variant.name == "SOLOv2_R101_DCN_3x"
    # Row 0 is the background; the 80 categories follow in the same order.
    for param in ("weight", "bias"):
        assert torch.equal(
            loaded[f"ins_head.cate_pred.{param}"], source_sd[f"bbox_head.solo_cate.{param}"][1:]
        )
    assert torch.equal(
        loaded["backbone.bottom_up.res4.5.conv2.conv_offset.weight"],
        source_sd["backbone.layer3.5.conv2_offset.weight"],
    )
    assert torch.equal(
        loaded["ins_head.kernel_tower.0.weight"], source_sd["bbox_head.kernel_convs.0.conv.weight"]
    )
    assert torch.equal(
        loaded["mask_head.conv_pred.norm.weight"], source_sd["mask_feat_head.conv_pred.0.gn.weight"]
    )
    assert any("background" in n for n in result.notes)


def test_solo_light_512_dcn_v1_offsets_compute_the_same_function():
    """The authors' light DCN model uses DCNv1 (18 offset channels, no modulation): converted
    into our DCNv2 layer, a conv computes exactly what DCNv1 computes."""
    shapes = key_list("mmdet3_solov2-light_r50-dcn_fpn_ms-3x_coco.txt")
    for name in list(shapes):
        if "conv_offset" in name:
            shapes[name] = (18,) + shapes[name][1:]
    source_sd = mmdet_to_solo_names(synthetic(shapes, seed=2))
    # Small offsets, as trained ones are, so that the sampling stays inside the feature.
    for name in source_sd:
        if "conv_offset" in name:
            source_sd[name] = source_sd[name] * 0.01

    result, loaded, _ = convert_in_memory(source_sd, source="solo")
    assert result.variant.name == "SOLOv2_Light_512_R50_DCN_3x"
    assert any("DCNv1" in n for n in result.notes)

    prefix, ours = "bbox_head.cate_convs.2.conv.", "ins_head.cate_tower.2."
    assert loaded[ours + "conv_offset.weight"].shape == (27, 256, 3, 3)
    layer = ModulatedDeformConv2d(256, 256, 3, padding=1, bias=False)
    layer.load_state_dict(
        {
            "weight": loaded[ours + "weight"],
            "conv_offset.weight": loaded[ours + "conv_offset.weight"],
            "conv_offset.bias": loaded[ours + "conv_offset.bias"],
        }
    )
    x = torch.randn(1, 256, 9, 11, generator=torch.Generator().manual_seed(0))
    offset_weight = source_sd[prefix + "conv_offset.weight"]
    offset = torch.nn.functional.conv2d(
        x, offset_weight, source_sd[prefix + "conv_offset.bias"], padding=1
    )
    expected = deform_conv2d(x, offset, source_sd[prefix + "weight"], padding=(1, 1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
