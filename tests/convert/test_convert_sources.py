"""The checkpoint families (solov2_d2/convert/sources.py): telling them apart, their fixes."""
import pytest
import torch

from convert_fixtures import key_list  # isort: split

from solov2_d2.convert import SOURCES
from solov2_d2.convert.mapping import Renamed
from solov2_d2.convert.sources import guess_source


@pytest.mark.parametrize(
    "key_file, family",
    [
        ("mmdet3_solov2_r50_fpn_1x_coco.txt", "mmdet"),
        ("adelaidet_SOLOv2_R50_3x.txt", "adelaidet"),
    ],
)
def test_published_names_tell_their_family(key_file, family):
    assert guess_source(key_list(key_file)) == family


def test_other_families_and_unknown_names():
    assert guess_source(["bbox_head.solo_cate.weight", "backbone.conv1.weight"]) == "solo"
    assert guess_source(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]) == "torchvision"
    assert guess_source(["encoder.weight"]) is None


def test_solo_drops_the_background_row_of_an_81_output_category_conv():
    weight, bias = torch.randn(81, 8, 3, 3), torch.randn(81)
    renamed = Renamed(
        {"ins_head.cate_pred.weight": weight, "ins_head.cate_pred.bias": bias},
        {"ins_head.cate_pred.weight": "bbox_head.solo_cate.weight", "ins_head.cate_pred.bias": "x"},
    )
    notes = SOURCES["solo"].adjust(renamed)
    assert torch.equal(renamed.tensors["ins_head.cate_pred.weight"], weight[1:])
    assert torch.equal(renamed.tensors["ins_head.cate_pred.bias"], bias[1:])
    assert "dropped the background row 0 of bbox_head.solo_cate.weight" in notes[0]
    # 80 outputs are the categories already.
    assert SOURCES["solo"].adjust(renamed) == []


def test_input_conventions():
    assert SOURCES["adelaidet"].input_style.format == "BGR"
    assert SOURCES["adelaidet"].input_style.stride_in_1x1
    for name in ("solo", "mmdet", "torchvision"):
        style = SOURCES[name].input_style
        assert style.format == "RGB" and not style.stride_in_1x1
    assert SOURCES["torchvision"].backbone_only
