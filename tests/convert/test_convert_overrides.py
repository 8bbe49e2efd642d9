"""The config keys converted weights need, the model they describe and the yaml written
(solov2_d2/convert/overrides.py)."""
import yaml

from solov2_d2.convert.overrides import config_overrides, model_cfg, overrides_yaml, target_shapes
from solov2_d2.convert.sources import MSRA_INPUT
from solov2_d2.convert.variants import find_variant


def lvis_overrides(num_classes):
    variant = find_variant("LVIS/SOLOv2_R50_3x")
    return config_overrides(variant.resnet, variant.heads, num_classes, MSRA_INPUT, variant)


def test_overrides_set_what_shapes_the_weights_and_their_input():
    overrides = lvis_overrides(1203)
    assert overrides["INPUT"] == {"FORMAT": "BGR"}
    assert overrides["MODEL"]["PIXEL_STD"] == [1.0, 1.0, 1.0]
    resnets, heads = overrides["MODEL"]["RESNETS"], overrides["MODEL"]["SOLOV2"]
    assert resnets["DEPTH"] == 50 and resnets["STRIDE_IN_1X1"] and resnets["NORM"] == "FrozenBN"
    assert resnets["DEFORM_ON_PER_STAGE"] == [False] * 4
    assert (heads["NUM_CLASSES"], heads["INSTANCE_CHANNELS"], heads["MASK_DIM"]) == (1203, 512, 256)
    assert heads["SCALE_RANGES"][0] == [1, 96]
    # The LVIS version follows from the category count.
    assert overrides["DATASETS"] == {"TRAIN": ["lvis_v1_train"], "TEST": ["lvis_v1_val"]}
    assert lvis_overrides(1230)["DATASETS"]["TEST"] == ["lvis_v0.5_val"]


def test_model_cfg_is_base_solov2_with_the_overrides():
    cfg = model_cfg(lvis_overrides(1203))
    assert cfg.MODEL.META_ARCHITECTURE == "SOLOv2"
    assert cfg.MODEL.BACKBONE.NAME == "build_solov2_resnet_fpn_backbone"
    assert cfg.MODEL.SOLOV2.NUM_CLASSES == 1203 and cfg.INPUT.FORMAT == "BGR"
    shapes = target_shapes(cfg)
    assert shapes["ins_head.cate_pred.weight"] == (1203, 512, 3, 3)
    assert shapes["ins_head.kernel_tower.0.weight"] == (512, 258, 3, 3)


def test_yaml_has_the_comments_base_weights_and_overrides(tmp_path):
    overrides = lvis_overrides(1203)
    long_path = "/data/" + "x" * 120 + ".pth"
    text = overrides_yaml(overrides, "/configs/LVIS/SOLOv2_R50_3x.yaml", "w.pth", [long_path])
    assert text.startswith(f"# {long_path}\n")  # paths stay whole, for copying
    written = yaml.safe_load(text)
    assert list(written)[:2] == ["_BASE_", "INPUT"]
    assert written["_BASE_"] == "/configs/LVIS/SOLOv2_R50_3x.yaml"
    assert list(written["MODEL"])[0] == "WEIGHTS"
    assert written["MODEL"]["WEIGHTS"].endswith("/w.pth") and written["MODEL"]["WEIGHTS"][0] == "/"
    assert written["MODEL"]["SOLOV2"] == overrides["MODEL"]["SOLOV2"]
