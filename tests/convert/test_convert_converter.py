"""Converting a state dict or a file (solov2_d2/convert/converter.py): the source, the variant
and the config written; mismatches with a requested config are named."""
import pytest
import torch
import yaml

from convert_fixtures import key_list, synthetic  # isort: split

from solov2_d2.convert import ConversionError, convert_checkpoint, convert_state_dict


def test_wrong_variant_for_requested_config(light_r18_shapes):
    with pytest.raises(ConversionError) as e:
        convert_state_dict(light_r18_shapes, source="mmdet", config="SOLOv2_R50_3x")
    message = str(e.value)
    assert "does not match config SOLOv2_R50_3x" in message
    towers = "checkpoint has 2 tower convs of 256 channels; config SOLOv2_R50_3x expects 4 of 512"
    assert towers in message
    assert "checkpoint has a ResNet-18 backbone; config SOLOv2_R50_3x expects ResNet-50" in message
    assert "E = 128" in message
    assert "The checkpoint fits SOLOv2_Light_448_R18_3x" in message


def test_dcn_and_class_count_mismatches_are_named():
    shapes = synthetic(key_list("mmdet3_solov2_r101-dcn_fpn_ms-3x_coco.txt"), device="meta")
    shapes["mask_head.conv_cls.weight"] = torch.empty(1230, 512, 3, 3, device="meta")
    shapes["mask_head.conv_cls.bias"] = torch.empty(1230, device="meta")
    with pytest.raises(ConversionError) as e:
        convert_state_dict(shapes, source="mmdet", config="LVIS/SOLOv2_R101_3x")
    message = str(e.value)
    assert "deformable convs in res3, res4, res5 of the backbone" in message
    assert "deformable convs in all tower convs and the mask branch" in message
    assert "categories" not in message  # 1230 is an LVIS count

    with pytest.raises(ConversionError, match="1230 categories; config SOLOv2_R101_DCN_3x"):
        convert_state_dict(shapes, source="mmdet", config="SOLOv2_R101_DCN_3x")


def test_custom_class_count_keeps_the_coco_config(light_r18_shapes):
    light_r18_shapes["mask_head.conv_cls.weight"] = torch.empty(3, 256, 3, 3, device="meta")
    light_r18_shapes["mask_head.conv_cls.bias"] = torch.empty(3, device="meta")
    result = convert_state_dict(light_r18_shapes)
    assert result.variant.name == "SOLOv2_Light_448_R18_3x"
    assert result.overrides["MODEL"]["SOLOV2"]["NUM_CLASSES"] == 3
    assert any("DATASETS" in note for note in result.notes)


def test_lvis_class_count_picks_the_lvis_config():
    shapes = synthetic(key_list("adelaidet_SOLOv2_R50_3x.txt"), device="meta")
    shapes["ins_head.cate_pred.weight"] = torch.empty(1203, 512, 3, 3, device="meta")
    shapes["ins_head.cate_pred.bias"] = torch.empty(1203, device="meta")
    result = convert_state_dict(shapes)
    assert result.variant.name == "LVIS/SOLOv2_R50_3x"
    assert result.overrides["DATASETS"] == {"TRAIN": ["lvis_v1_train"], "TEST": ["lvis_v1_val"]}


def test_wrong_source_suggests_the_right_one():
    shapes = synthetic(key_list("adelaidet_SOLOv2_R50_3x.txt"), device="meta")
    with pytest.raises(ConversionError, match="try --from adelaidet"):
        convert_state_dict(shapes, source="mmdet")


def test_unknown_config_lists_the_known_ones(light_r18_shapes):
    with pytest.raises(ConversionError, match="Unknown config 'SOLOv2_R77'.*SOLOv2_R50_1x"):
        convert_state_dict(light_r18_shapes, config="SOLOv2_R77")


def test_missing_base_config_is_noted(light_r18_file, tmp_path):
    src, _ = light_r18_file
    result = convert_checkpoint(
        str(src), str(tmp_path / "w.pth"), configs_dir=str(tmp_path / "nowhere")
    )
    assert any("does not exist (yet)" in note for note in result.notes)
    with open(result.config_path) as f:
        written = yaml.safe_load(f)
    assert written["_BASE_"] == str(tmp_path / "nowhere" / "SOLOv2_Light_448_R18_3x.yaml")
