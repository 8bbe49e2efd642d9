"""Every config under configs/ loads, builds on the CPU, and matches the published variant."""
import solov2_d2  # noqa: F401  # isort: split

import pytest
from conftest import REPO
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

from solov2_d2 import add_solov2_config
from solov2_d2.checks import check_weights_are_local
from solov2_d2.layers.deform_conv import ModulatedDeformConv2d

CONFIGS = REPO / "configs"

GRIDS = [40, 36, 24, 16, 12]
RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
LIGHT_448_RANGES = [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]]
LIGHT_512_RANGES = [[1, 64], [32, 128], [64, 256], [128, 512], [256, 2048]]
BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
SCHEDULE_1X = dict(max_iter=90000, steps=(67500, 82500))  # 12 epochs; steps at 9 and 11
SCHEDULE_3X = dict(max_iter=270000, steps=(202500, 247500))  # 36 epochs; steps at 27 and 33
TRAIN_640_800 = dict(train=(640, 672, 704, 736, 768, 800), max_train=1333, test=800, max_test=1333)
TRAIN_800 = dict(train=(800,), max_train=1333, test=800, max_test=1333)
LIGHT_448_INPUT = dict(train=(352, 384, 416, 448, 480, 512), max_train=768, test=448, max_test=768)
LIGHT_512_INPUT = dict(train=(352, 384, 416, 448, 480, 512), max_train=852, test=512, max_test=852)
STANDARD_HEADS = dict(channels=512, convs=4, mask_dim=256, ranges=RANGES)
LIGHT_448_HEADS = dict(channels=256, convs=2, mask_dim=128, ranges=LIGHT_448_RANGES)
NO_DCN = dict(dcn_stages=(False,) * 4, dcn_tower="none", dcn_mask=False)
DCN = dict(dcn_stages=(False, True, True, True), dcn_tower="all", dcn_mask=True)

# The published variants (docs/spec): backbone, heads, DCN placement, inputs, schedule.
COCO = dict(classes=80, train_set="coco_2017_train", test_set="coco_2017_val")
EXPECTED = {
    "SOLOv2_R50_1x.yaml": dict(
        depth=50, **STANDARD_HEADS, **NO_DCN, **TRAIN_800, **SCHEDULE_1X, **COCO
    ),
    "SOLOv2_R50_3x.yaml": dict(
        depth=50, **STANDARD_HEADS, **NO_DCN, **TRAIN_640_800, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_R101_3x.yaml": dict(
        depth=101, **STANDARD_HEADS, **NO_DCN, **TRAIN_640_800, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_R101_DCN_3x.yaml": dict(
        depth=101, **STANDARD_HEADS, **DCN, **TRAIN_640_800, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_X101_DCN_3x.yaml": dict(
        depth=101,
        groups=64,
        width_per_group=4,
        **STANDARD_HEADS,
        **DCN,
        **TRAIN_640_800,
        **SCHEDULE_3X,
        **COCO,
    ),
    "SOLOv2_Light_448_R18_3x.yaml": dict(
        depth=18, **LIGHT_448_HEADS, **NO_DCN, **LIGHT_448_INPUT, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_Light_448_R34_3x.yaml": dict(
        depth=34, **LIGHT_448_HEADS, **NO_DCN, **LIGHT_448_INPUT, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_Light_448_R50_3x.yaml": dict(
        depth=50, **LIGHT_448_HEADS, **NO_DCN, **LIGHT_448_INPUT, **SCHEDULE_3X, **COCO
    ),
    "SOLOv2_Light_512_R50_DCN_3x.yaml": dict(
        depth=50,
        channels=256,
        convs=3,
        mask_dim=128,
        ranges=LIGHT_512_RANGES,
        dcn_stages=(False, True, True, True),
        dcn_tower="last",
        dcn_mask=False,
        **LIGHT_512_INPUT,
        **SCHEDULE_3X,
        **COCO,
    ),
    "LVIS/SOLOv2_R50_3x.yaml": dict(
        depth=50,
        **STANDARD_HEADS,
        **NO_DCN,
        **TRAIN_640_800,
        **SCHEDULE_3X,
        classes=1230,
        train_set="lvis_v0.5_train",
        test_set="lvis_v0.5_val",
    ),
    "LVIS/SOLOv2_R101_3x.yaml": dict(
        depth=101,
        **STANDARD_HEADS,
        **NO_DCN,
        **TRAIN_640_800,
        **SCHEDULE_3X,
        classes=1230,
        train_set="lvis_v0.5_train",
        test_set="lvis_v0.5_val",
    ),
}
FRUIT = "fruit/SOLOv2_R18_fruit.yaml"


def _load(name):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_the_config_zoo_has_exactly_the_published_variants_and_the_fruit_job():
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert found == set(EXPECTED) | {"Base-SOLOv2.yaml", FRUIT}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_variant(name):
    want = EXPECTED[name]
    cfg = _load(name)
    model = build_model(cfg)

    # Levels: P2 (halved) .. P6 (at P5's size), strides 8, 8, 16, 32, 32.
    assert model.instance_in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert model.instance_resize_to == ["p3", None, None, None, "p5"]
    assert model.num_grids == GRIDS
    assert [list(r) for r in model.scale_ranges] == want["ranges"]
    assert model.mask_in_features == ["p2", "p3", "p4", "p5"] and model.mask_stride == 4

    # Heads: tower width and depth, E, mask-branch width, classes.
    head = model.ins_head
    for tower in (head.cate_tower, head.kernel_tower):
        assert len(tower) == want["convs"]
        assert all(conv.out_channels == want["channels"] for conv in tower)
    assert head.kernel_pred.out_channels == want["mask_dim"]
    assert head.cate_pred.out_channels == want["classes"]
    assert model.mask_head.conv_pred.out_channels == want["mask_dim"]
    assert model.mask_head.level_convs[0][0].out_channels == 128

    # DCN placement: every block of the deformable backbone stages, the tower convs asked for,
    # every conv of the mask branch (1 + 1 + 2 + 3 level convs and the predictor).
    bottom_up = model.backbone.bottom_up
    blocks = BLOCKS[want["depth"]]
    for stage, n, on in zip(("res2", "res3", "res4", "res5"), blocks, want["dcn_stages"]):
        assert _count(getattr(bottom_up, stage), ModulatedDeformConv2d) == (n if on else 0)
    last = want["convs"] - 1
    deformable = {
        "none": [False] * want["convs"],
        "last": [i == last for i in range(want["convs"])],
        "all": [True] * want["convs"],
    }[want["dcn_tower"]]
    for tower in (head.cate_tower, head.kernel_tower):
        assert [isinstance(conv, ModulatedDeformConv2d) for conv in tower] == deformable
    assert _count(model.mask_head, ModulatedDeformConv2d) == (8 if want["dcn_mask"] else 0)

    # Backbone: depth (blocks per stage), block type, ResNeXt groups and width.
    assert [len(getattr(bottom_up, s)) for s in ("res2", "res3", "res4", "res5")] == blocks
    block = bottom_up.res2[0]
    if want["depth"] < 50:
        assert isinstance(block, BasicBlock)
    else:
        assert isinstance(block, BottleneckBlock)
        groups, width = want.get("groups", 1), want.get("width_per_group", 64)
        assert block.conv2.groups == groups and block.conv2.out_channels == groups * width
    # Pretrained backbones keep their statistics: FrozenBN, stem and res2 frozen.
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert not any(p.requires_grad for p in bottom_up.stem.parameters())

    # Inputs and schedule.
    assert cfg.INPUT.MIN_SIZE_TRAIN == want["train"]
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert cfg.INPUT.MAX_SIZE_TRAIN == want["max_train"]
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (want["test"], want["max_test"])
    solver = cfg.SOLVER
    assert (solver.IMS_PER_BATCH, solver.BASE_LR, solver.MOMENTUM) == (16, 0.01, 0.9)
    assert solver.WEIGHT_DECAY == 1e-4
    assert (solver.MAX_ITER, tuple(solver.STEPS)) == (want["max_iter"], want["steps"])
    clip = solver.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 35.0
    assert cfg.DATASETS.TRAIN == (want["train_set"],)
    assert cfg.DATASETS.TEST == (want["test_set"],)

    # The ImageNet weights are named, never downloaded: loading them here fails at once.
    with pytest.raises(ValueError, match="never downloads weights"):
        check_weights_are_local(cfg.MODEL.WEIGHTS)


def test_pretrained_weights_match_their_input_convention():
    """MSRA and Detectron weights take caffe-style BGR; torchvision's take RGB, ImageNet std."""
    for name in EXPECTED:
        cfg = _load(name)
        if cfg.MODEL.WEIGHTS.startswith("https://download.pytorch.org/"):
            assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
        else:
            assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
            assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 == ("MSRA" in cfg.MODEL.WEIGHTS)


def test_fruit_config_trains_from_scratch_on_the_cpu():
    cfg = _load(FRUIT)
    model = build_model(cfg)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.DEVICE == "cpu"
    assert cfg.DATASETS.TRAIN == ("fruit_train",) and cfg.DATASETS.TEST == ("fruit_val",)
    assert model.ins_head.cate_pred.out_channels == 3
    # Random initialisation needs trainable norms everywhere and nothing frozen.
    assert all(p.requires_grad for p in model.parameters())
    assert _count(model, nn.GroupNorm) > 0
    assert not any("FrozenBatchNorm" in type(m).__name__ for m in model.modules())
    check_weights_are_local(cfg.MODEL.WEIGHTS)
