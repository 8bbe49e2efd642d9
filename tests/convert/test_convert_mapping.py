"""Renaming and fitting to the model (solov2_d2/convert/mapping.py): every tensor accounted for,
every problem named."""
import pytest
import torch

from solov2_d2.convert import ConversionError, convert_state_dict
from solov2_d2.convert.mapping import DropRule, Rule, fit_to_model, rename

RULES = [Rule(r"a\.(\d)\.w", "ours.{1}.weight"), Rule(r"b\.w", lambda m: None)]
DROP = [DropRule(r".*\.counter", "update counter")]


def test_rename_maps_drops_and_reports_every_unknown_name():
    renamed = rename({"a.0.w": torch.ones(1), "x.counter": torch.ones(1)}, RULES, DROP, "Test")
    assert list(renamed.tensors) == ["ours.0.weight"]
    assert renamed.origin == {"ours.0.weight": "a.0.w"}
    assert renamed.dropped == {"x.counter": "update counter"}

    state_dict = {"a.0.w": torch.ones(1), "b.w": torch.ones(1), "c": torch.ones(1), "d": 3}
    with pytest.raises(ConversionError) as e:
        rename(state_dict, RULES + [Rule(r"a\.0\.(w)", "ours.0.weight")], DROP, "Test")
    message = str(e.value)
    assert "2 tensor(s) have names that are not part of a Test SOLOv2 checkpoint" in message
    assert "    b.w\n    c" in message and "d (int)" in message


def test_two_names_onto_one_parameter_are_refused():
    rules = [Rule(r"(a|b)\.w", "ours.weight")]
    with pytest.raises(ConversionError, match="a.w and b.w -> ours.weight"):
        rename({"a.w": torch.ones(1), "b.w": torch.ones(1)}, rules, [], "Test")


def test_dcn_v1_offsets_are_widened_to_dcn_v2_with_the_modulation_at_one():
    renamed = rename(
        {"w": torch.randn(18, 4, 3, 3), "b": torch.randn(18)},
        [Rule("w", "conv.conv_offset.weight"), Rule("b", "conv.conv_offset.bias")],
        [],
        "Test",
    )
    shapes = {"conv.conv_offset.weight": (27, 4, 3, 3), "conv.conv_offset.bias": (27,)}
    tensors, notes, left_at_init = fit_to_model(renamed, shapes)
    weight, bias = tensors["conv.conv_offset.weight"], tensors["conv.conv_offset.bias"]
    assert torch.equal(weight[:18], renamed.tensors["conv.conv_offset.weight"])
    assert not weight[18:].any()
    assert torch.sigmoid(bias[18:]).eq(1.0).all()
    assert "2 DCNv1 offset tensor(s) widened to DCNv2" in notes[0] and left_at_init == []


def test_missing_head_tensor_is_named(light_r18_shapes):
    del light_r18_shapes["mask_head.cls_convs.1.gn.weight"]
    with pytest.raises(ConversionError, match="lacks 1 tensor") as e:
        convert_state_dict(light_r18_shapes, source="mmdet")
    assert "ins_head.cate_tower.1.norm.weight" in str(e.value)


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
