"""Broken or mismatched inputs stop the conversion with a message naming the problem; the file
interface (containers, metadata, URLs, the command line, detectron2's .pkl format)."""
import pickle

import pytest
import torch
import yaml

from convert_fixtures import (  # isort: split
    cfg_from_yaml,
    empty_model,
    key_list,
    load_strictly,
    stub_configs_dir,
    synthetic,
)

from solov2_d2.convert import ConversionError, convert_checkpoint, convert_state_dict
from solov2_d2.convert.__main__ import main

LIGHT_R18 = "mmdet3_solov2-light_r18_fpn_ms-3x_coco.txt"


@pytest.fixture
def light_r18_shapes():
    """The mmdetection light R18 checkpoint as meta tensors: shapes only, enough to convert."""
    return synthetic(key_list(LIGHT_R18), device="meta")


def test_missing_head_tensor_is_named(light_r18_shapes):
    del light_r18_shapes["mask_head.cls_convs.1.gn.weight"]
    with pytest.raises(ConversionError, match="lacks 1 tensor") as e:
        convert_state_dict(light_r18_shapes, source="mmdet")
    assert "ins_head.cate_tower.1.norm.weight" in str(e.value)


def test_missing_predictor_is_named(light_r18_shapes):
    del light_r18_shapes["mask_head.conv_cls.weight"]
    with pytest.raises(ConversionError, match=r"number of categories.*ins_head\.cate_pred\.weight"):
        convert_state_dict(light_r18_shapes, source="mmdet")


def test_unknown_tensor_is_named(light_r18_shapes):
    light_r18_shapes["mask_head.extra_conv.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ConversionError, match="not part of a mmdetection") as e:
        convert_state_dict(light_r18_shapes, source="mmdet")
    assert "mask_head.extra_conv.weight" in str(e.value)


def test_tensor_with_a_known_name_but_no_place_in_the_model_is_named(light_r18_shapes):
    # A third mask-branch conv on level 1, which has only one: a valid name, no such layer.
    light_r18_shapes["mask_head.mask_feature_head.convs_all_levels.1.conv1.conv.weight"] = (
        torch.empty(128, 128, 3, 3, device="meta")
    )
    with pytest.raises(ConversionError, match="no place in the model") as e:
        convert_state_dict(light_r18_shapes, source="mmdet")
    assert "mask_head.level_convs.1.1.weight (from mask_head.mask_feature_head." in str(e.value)


def test_shape_mismatch_is_named(light_r18_shapes):
    # The first kernel-tower conv without its 2 coordinate channels.
    light_r18_shapes["mask_head.kernel_convs.0.conv.weight"] = torch.empty(
        256, 256, 3, 3, device="meta"
    )
    with pytest.raises(ConversionError, match="wrong shape") as e:
        convert_state_dict(light_r18_shapes, source="mmdet")
    assert (
        "ins_head.kernel_tower.0.weight (from mask_head.kernel_convs.0.conv.weight): "
        "checkpoint (256, 256, 3, 3), model (256, 258, 3, 3)"
    ) in str(e.value)


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


@pytest.mark.parametrize(
    "url", ["https://example.com/solov2_r50.pth", "torchvision://resnet50", "s3://bucket/x.pth"]
)
def test_url_is_refused_without_network(url, tmp_path):
    with pytest.raises(ConversionError, match="is a URL; the converter does not download"):
        convert_checkpoint(url, str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()


def test_cli_reports_failures_and_writes_nothing(tmp_path, capsys):
    assert main(["https://example.com/x.pth", str(tmp_path / "out.pth")]) == 1
    assert "is a URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class TrainingState:
    """Stands for objects of classes a converter cannot (and must not) import, such as
    mmengine's log buffers in an mmdetection 3.x checkpoint."""

    def __init__(self):
        self.history = [1.0, 2.0]


@pytest.fixture(scope="module")
def light_r18_file(tmp_path_factory):
    """A synthetic mmdetection light R18 checkpoint file whose metadata holds an object of a
    class outside torch (which torch's safe loader refuses)."""
    path = tmp_path_factory.mktemp("src") / "solov2_light_r18.pth"
    source_sd = synthetic(key_list(LIGHT_R18))
    torch.save({"meta": {"message_hub": TrainingState()}, "state_dict": source_sd}, path)
    return path, source_sd


def test_cli_converts_and_prints_the_config(light_r18_file, tmp_path, capsys):
    src, source_sd = light_r18_file
    configs = stub_configs_dir(tmp_path / "configs")
    dst = tmp_path / "out" / "solov2_light_r18.pth"
    assert main([str(src), str(dst), "--from", "mmdet", "--configs-dir", str(configs)]) == 0
    printed = capsys.readouterr().out
    assert "Config: SOLOv2_Light_448_R18_3x" in printed
    assert "Dropped on purpose: 20 (BatchNorm update counter)" in printed
    config_path = tmp_path / "out" / "solov2_light_r18.yaml"
    assert config_path.read_text() in printed

    loaded = load_strictly(empty_model(cfg_from_yaml(config_path)), dst)
    assert torch.equal(loaded["ins_head.cate_pred.weight"], source_sd["mask_head.conv_cls.weight"])


def test_detectron2_pkl_format(light_r18_file, tmp_path):
    src, source_sd = light_r18_file
    configs = stub_configs_dir(tmp_path / "configs")
    dst = tmp_path / "solov2_light_r18.pkl"
    result = convert_checkpoint(str(src), str(dst), configs_dir=str(configs))
    with open(dst, "rb") as f:
        assert pickle.load(f)["__author__"].startswith("solov2_d2.convert from mmdetection")
    loaded = load_strictly(empty_model(cfg_from_yaml(result.config_path)), dst)
    assert torch.equal(
        loaded["mask_head.conv_pred.norm.weight"],
        source_sd["mask_head.mask_feature_head.conv_pred.gn.weight"],
    )


def test_missing_base_config_is_noted(light_r18_file, tmp_path):
    src, _ = light_r18_file
    result = convert_checkpoint(
        str(src), str(tmp_path / "w.pth"), configs_dir=str(tmp_path / "nowhere")
    )
    assert any("does not exist (yet)" in note for note in result.notes)
    with open(result.config_path) as f:
        written = yaml.safe_load(f)
    assert written["_BASE_"] == str(tmp_path / "nowhere" / "SOLOv2_Light_448_R18_3x.yaml")


def test_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "not_a_checkpoint.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.01}}, path)
    with pytest.raises(ConversionError, match="holds no state dict.*'epoch', 'optimizer'"):
        convert_checkpoint(str(path), str(tmp_path / "out.pth"))


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="Cannot read .*notes.pth as a PyTorch checkpoint"):
        convert_checkpoint(str(path), str(tmp_path / "out.pth"))


def test_cli_refuses_to_overwrite_its_source(light_r18_file, tmp_path, capsys):
    src, _ = light_r18_file
    before = src.read_bytes()
    link = tmp_path / "same.pth"
    link.symlink_to(src)
    for dst in (src, link):
        assert main([str(src), str(dst), "--from", "mmdet"]) == 1
        assert f"{dst} is the source checkpoint {src}" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert not src.with_suffix(".yaml").exists()
