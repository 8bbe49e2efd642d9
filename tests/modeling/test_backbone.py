"""build_solov2_resnet_fpn_backbone: detectron2's ResNet-FPN, with DCNv2 stages as mmdetection's."""
import re

import pytest
import torch
from conftest import SHARED

from detectron2.config import get_cfg
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from solov2_d2.layers.deform_conv import ModulatedDeformConv2d
from solov2_d2.modeling.backbone import build_solov2_resnet_fpn_backbone

CHECKPOINT_KEYS = SHARED / "reference" / "checkpoint_keys"
INPUT = ShapeSpec(channels=3)
DCN_3_TO_5 = [False, True, True, True]


def make_cfg(depth=50, **resnets):
    """A config that builds without pretrained weights: trainable BN, nothing frozen."""
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_solov2_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for key, value in resnets.items():
        cfg.MODEL.RESNETS[key] = value
    return cfg


def tiny_resnext_cfg(**resnets):
    """ResNeXt-50 4x8d with narrow stem and FPN, to keep CPU tests fast."""
    cfg = make_cfg(50, NUM_GROUPS=4, WIDTH_PER_GROUP=8, STEM_OUT_CHANNELS=16, **resnets)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def build_pair(cfg):
    """Ours and detectron2's build_resnet_fpn_backbone, from the same random state."""
    torch.manual_seed(0)
    ours = build_solov2_resnet_fpn_backbone(cfg, INPUT)
    torch.manual_seed(0)
    theirs = build_resnet_fpn_backbone(cfg, INPUT)
    return ours, theirs


@pytest.mark.parametrize(
    "cfg",
    [make_cfg(18), make_cfg(50, STRIDE_IN_1X1=False), tiny_resnext_cfg()],
    ids=["R18", "R50", "X50-4x8d"],
)
def test_without_dcn_equals_detectron2(cfg):
    ours, theirs = build_pair(cfg)
    assert repr(ours) == repr(theirs)
    theirs_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(theirs_state)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[name]), name

    assert ours.output_shape() == theirs.output_shape()
    strides = {k: s.stride for k, s in ours.output_shape().items()}
    assert strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
    sizes = {k: v.shape[-1] for k, v in out.items()}
    assert sizes == {"p2": 16, "p3": 8, "p4": 4, "p5": 2, "p6": 1}
    for k in expected:
        torch.testing.assert_close(out[k], expected[k])


# mmdetection (torchvision-style ResNet, FPN neck) -> detectron2 names: structure only.
MMDET_TO_D2 = [
    (r"^backbone\.conv1\.", "backbone.bottom_up.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
    (r"^backbone\.layer(\d)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}"),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
    (r"^neck\.lateral_convs\.(\d)\.conv\.", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}."),
    (r"^neck\.fpn_convs\.(\d)\.conv\.", lambda m: f"backbone.fpn_output{int(m[1]) + 2}."),
]


def mmdet_to_d2(name):
    for pattern, repl in MMDET_TO_D2:
        name = re.sub(pattern, repl, name)
    return name


def read_keys(filename, prefixes=("backbone.", "neck.")):
    """{name: shape} of the entries of a checkpoint key list that start with one of prefixes."""
    keys = {}
    for line in (CHECKPOINT_KEYS / filename).read_text().splitlines():
        if line.startswith(prefixes):
            name, shape = line.split(" ", 1)
            keys[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return keys


def test_r101_dcn_matches_mmdet_checkpoint_structure():
    cfg = make_cfg(101, DEFORM_ON_PER_STAGE=DCN_3_TO_5, DEFORM_MODULATED=True)
    backbone = build_backbone(cfg)
    ours = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    mmdet = read_keys("mmdet3_solov2_r101-dcn_fpn_ms-3x_coco.txt")
    assert sum(".conv_offset." in k for k in mmdet) == 2 * (4 + 23 + 3)
    assert {mmdet_to_d2(k): v for k, v in mmdet.items()} == ours

    res = backbone.bottom_up
    assert all(isinstance(b.conv2, Conv2d) for b in res.res2)
    for stage in (res.res3, res.res4, res.res5):
        for block in stage:
            assert isinstance(block.conv2, ModulatedDeformConv2d)
            assert block.conv2.conv_offset.out_channels == 27
            assert isinstance(block.conv2.norm, torch.nn.BatchNorm2d)


def test_light_r50_dcn_matches_mmdet_checkpoint_structure():
    cfg = make_cfg(50, DEFORM_ON_PER_STAGE=DCN_3_TO_5, DEFORM_MODULATED=True)
    backbone = build_solov2_resnet_fpn_backbone(cfg, INPUT)
    ours = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    mmdet = read_keys("mmdet3_solov2-light_r50-dcn_fpn_ms-3x_coco.txt")
    assert {mmdet_to_d2(k): v for k, v in mmdet.items()} == ours


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_resnext_dcn_forward_backward(stride_in_1x1):
    cfg = tiny_resnext_cfg(
        DEFORM_ON_PER_STAGE=[True, False, True, True],
        DEFORM_MODULATED=True,
        DEFORM_NUM_GROUPS=2,
        STRIDE_IN_1X1=stride_in_1x1,
    )
    backbone = build_solov2_resnet_fpn_backbone(cfg, INPUT)
    res = backbone.bottom_up
    assert not isinstance(res.res3[0].conv2, ModulatedDeformConv2d)
    conv2 = res.res4[0].conv2
    assert isinstance(conv2, ModulatedDeformConv2d)
    assert (conv2.groups, conv2.deform_groups) == (4, 2)
    assert tuple(conv2.weight.shape) == (128, 32, 3, 3)
    assert conv2.conv_offset.out_channels == 2 * 27
    stride_3x3 = (1, 1) if stride_in_1x1 else (2, 2)
    assert conv2.stride == conv2.conv_offset.stride == stride_3x3
    assert res.res4[0].conv1.stride == ((2, 2) if stride_in_1x1 else (1, 1))

    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = backbone(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (2, 32, 16, 16),
        "p3": (2, 32, 8, 8),
        "p4": (2, 32, 4, 4),
        "p5": (2, 32, 2, 2),
        "p6": (2, 32, 1, 1),
    }
    sum(v.square().mean() for v in out.values()).backward()
    assert x.grad.abs().sum() > 0
    for name, p in backbone.named_parameters():
        assert p.grad is not None, name
    for block in (res.res2[0], res.res5[-1]):
        assert block.conv2.conv_offset.weight.grad.abs().sum() > 0


def test_freeze_at_covers_deformable_stages():
    cfg = tiny_resnext_cfg(DEFORM_ON_PER_STAGE=[True, True, False, False], DEFORM_MODULATED=True)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    res = build_solov2_resnet_fpn_backbone(cfg, INPUT).bottom_up
    assert not any(p.requires_grad for p in res.res2.parameters())
    assert all(p.requires_grad for p in res.res3.parameters())
    assert type(res.res2[0].conv2.norm).__name__ == "FrozenBatchNorm2d"


@pytest.mark.parametrize(
    "depth,resnets,key",
    [
        (50, dict(DEFORM_ON_PER_STAGE=DCN_3_TO_5, DEFORM_MODULATED=False), "DEFORM_MODULATED"),
        (18, dict(DEFORM_ON_PER_STAGE=DCN_3_TO_5, DEFORM_MODULATED=True), "DEFORM_ON_PER_STAGE"),
        (34, dict(DEFORM_ON_PER_STAGE=DCN_3_TO_5, DEFORM_MODULATED=True), "DEPTH = 34"),
        (50, dict(DEFORM_ON_PER_STAGE=[False, True, True]), "DEFORM_ON_PER_STAGE"),
    ],
)
def test_invalid_dcn_config_raises(depth, resnets, key):
    with pytest.raises(ValueError, match=f"MODEL.RESNETS.{key}"):
        build_solov2_resnet_fpn_backbone(make_cfg(depth, **resnets), INPUT)
