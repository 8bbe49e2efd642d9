"""Reading the architecture off tensors (solov2_d2/convert/architecture.py)."""
import pytest
import torch

from solov2_d2.convert import ConversionError
from solov2_d2.convert.architecture import HeadSpec, ResNetSpec, detect_heads, detect_resnet
from solov2_d2.convert.overrides import target_shapes
from solov2_d2.convert.variants import find_variant, load_config


def meta_state_dict(cfg):
    """The tensors of the model `cfg` builds, shapes only."""
    return {k: torch.empty(s, device="meta") for k, s in target_shapes(cfg).items()}


@pytest.mark.parametrize(
    "name", ["SOLOv2_X101_DCN_3x", "SOLOv2_Light_512_R50_DCN_3x", "LVIS/SOLOv2_R50_3x"]
)
def test_detectors_read_back_what_a_config_builds(name):
    tensors = meta_state_dict(load_config(f"{name}.yaml"))
    variant = find_variant(name)
    assert detect_resnet(tensors) == variant.resnet
    heads, num_classes = detect_heads(tensors)
    assert heads == variant.heads
    assert num_classes == variant.class_counts[0]


def test_specs_are_config_keys():
    cfg = load_config("SOLOv2_Light_448_R18_3x.yaml")
    resnet = ResNetSpec.from_cfg(cfg.MODEL.RESNETS)
    assert resnet.deform_on_per_stage == (False,) * 4  # a list in the config, hashable here
    assert resnet.config() == {
        "DEPTH": 18,
        "NUM_GROUPS": 1,
        "WIDTH_PER_GROUP": 64,
        "RES2_OUT_CHANNELS": 64,
        "DEFORM_ON_PER_STAGE": [False] * 4,
        "DEFORM_NUM_GROUPS": 1,
    }
    heads = HeadSpec.from_cfg(cfg.MODEL.SOLOV2)
    assert heads.config()["INSTANCE_CHANNELS"] == 256 and heads.config()["MASK_DIM"] == 128
    assert resnet.describe_layers() == "ResNet-18"
    assert heads.describe_towers() == "2 tower convs of 256 channels"


@pytest.fixture(scope="module")
def light_r18():
    return meta_state_dict(load_config("SOLOv2_Light_448_R18_3x.yaml"))


def test_missing_predictor_is_named(light_r18):
    tensors = dict(light_r18)
    del tensors["ins_head.cate_pred.weight"]
    with pytest.raises(ConversionError, match=r"number of categories.*ins_head\.cate_pred\.weight"):
        detect_heads(tensors)


def test_towers_of_different_depths_are_refused(light_r18):
    tensors = {k: v for k, v in light_r18.items() if not k.startswith("ins_head.kernel_tower.1.")}
    with pytest.raises(ConversionError, match="2 category-tower and 1 kernel-tower convs"):
        detect_heads(tensors)


def test_scattered_deformable_tower_convs_are_refused(light_r18):
    tensors = dict(light_r18)
    offsets = torch.empty(27, 256, 3, 3, device="meta")
    for tower in ("cate", "kernel"):
        tensors[f"ins_head.{tower}_tower.0.conv_offset.weight"] = offsets
    with pytest.raises(ConversionError, match="Unsupported deformable tower convs"):
        detect_heads(tensors)


def test_block_counts_of_no_standard_depth_are_refused(light_r18):
    tensors = {k: v for k, v in light_r18.items() if ".res5.1." not in k}
    with pytest.raises(ConversionError, match=r"\[2, 2, 2, 1\] basic blocks"):
        detect_resnet(tensors)
