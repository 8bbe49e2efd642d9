"""The published variants, read from configs/ (solov2_d2/convert/variants.py), and matching."""
import dataclasses

import pytest
from conftest import REPO

from solov2_d2.convert import ConversionError
from solov2_d2.convert import variants as variants_module
from solov2_d2.convert.architecture import HeadSpec, ResNetSpec
from solov2_d2.convert.variants import (
    choose_variant,
    find_variant,
    load_config,
    mismatches,
    published_variants,
)

R50 = ResNetSpec(50, 1, 64, 256, (False,) * 4, 1)
STANDARD = HeadSpec(512, 4, 128, 256, 1, "none", False)


def test_variants_are_the_model_zoo_configs():
    configs = REPO / "configs"
    zoo = {p.relative_to(configs).with_suffix("").as_posix() for p in configs.rglob("*.yaml")}
    zoo -= {"Base-SOLOv2", "fruit/SOLOv2_R18_fruit"}
    assert sorted(v.name for v in published_variants()) == sorted(zoo)
    assert len(zoo) == 11


def test_a_variant_is_what_its_config_builds():
    light = find_variant("SOLOv2_Light_512_R50_DCN_3x")
    assert light.resnet == dataclasses.replace(R50, deform_on_per_stage=(False, True, True, True))
    assert light.heads == HeadSpec(256, 3, 128, 128, 1, "last", False)
    assert light.scale_ranges == ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
    assert light.class_counts == (80,) and not light.is_lvis
    x101 = find_variant("SOLOv2_X101_DCN_3x")
    assert x101.resnet.layers == (101, 64, 4, 256)
    assert x101.heads.dcn_in_tower == "all" and x101.heads.dcn_in_mask_branch
    assert find_variant("SOLOv2_Light_448_R18_3x").resnet.res2_out_channels == 64
    lvis = find_variant("LVIS/SOLOv2_R50_3x")
    assert lvis.is_lvis and lvis.class_counts == (1230, 1203)
    assert lvis.resnet == R50 and lvis.heads == STANDARD


def test_preference_order():
    names = [v.name for v in published_variants()]
    # R50 1x and 3x checkpoints look alike: the longer schedule is the better config to run.
    assert names.index("SOLOv2_R50_3x") < names.index("SOLOv2_R50_1x")
    assert choose_variant(R50, STANDARD, 80).name == "SOLOv2_R50_3x"
    # An ImageNet ResNet-50 starts the plain, standard COCO variant.
    assert choose_variant(R50, None, None).name == "SOLOv2_R50_3x"
    assert names.index("SOLOv2_R50_3x") < names.index("LVIS/SOLOv2_R50_3x")


@pytest.mark.parametrize(
    "name",
    ["LVIS/SOLOv2_R50_3x", "LVIS/SOLOv2_R50_3x.yaml", "configs/LVIS/SOLOv2_R50_3x.yaml"],
)
def test_find_variant_by_name_or_path(name):
    assert find_variant(name).name == "LVIS/SOLOv2_R50_3x"
    assert find_variant(name.replace("LVIS/", "")).name == "SOLOv2_R50_3x"


def test_mismatches_name_every_difference():
    r18 = ResNetSpec(18, 1, 64, 64, (False,) * 4, 1)
    light = HeadSpec(256, 2, 128, 128, 1, "none", False)
    problems = mismatches(r18, light, 1203, find_variant("SOLOv2_R101_DCN_3x"))
    assert problems == [
        "checkpoint has a ResNet-18 backbone; config SOLOv2_R101_DCN_3x expects ResNet-101",
        "checkpoint has no deformable convs of the backbone; config SOLOv2_R101_DCN_3x expects "
        "deformable convs in res3, res4, res5",
        "checkpoint has 2 tower convs of 256 channels; config SOLOv2_R101_DCN_3x expects 4 of 512",
        "checkpoint has E = 128, from 128-channel mask-branch convs; config SOLOv2_R101_DCN_3x "
        "expects E = 256, from 128-channel mask-branch convs",
        "checkpoint has no deformable head convs; config SOLOv2_R101_DCN_3x expects deformable "
        "convs in all tower convs and the mask branch",
        "checkpoint has 1203 categories; config SOLOv2_R101_DCN_3x expects 80",
    ]
    # A backbone alone: depth and widths only.
    assert mismatches(R50, None, None, find_variant("SOLOv2_Light_512_R50_DCN_3x")) == []


def test_class_counts_choose_between_coco_lvis_and_custom_data():
    assert choose_variant(R50, STANDARD, 1203).name == "LVIS/SOLOv2_R50_3x"
    assert choose_variant(R50, STANDARD, 3).name == "SOLOv2_R50_3x"  # fine-tuned on own data
    assert choose_variant(R50, dataclasses.replace(STANDARD, mask_dim=64), 80) is None


def test_missing_configs_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(variants_module, "CONFIGS_DIR", tmp_path / "configs")
    published_variants.cache_clear()
    try:
        with pytest.raises(ConversionError, match="reads the model variants from the repository"):
            published_variants()
        with pytest.raises(ConversionError, match=str(tmp_path / "configs")):
            load_config("Base-SOLOv2.yaml")
    finally:
        published_variants.cache_clear()
