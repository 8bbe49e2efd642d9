"""check_solov2_config: settings that would build a model but run meaningless or crash deep in
torch are refused when the model is built, naming the key and the allowed values."""
import pytest

from detectron2.modeling import build_model


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.SOLOV2.MAX_PER_IMAGE_TEST", 0, r"MAX_PER_IMAGE_TEST = 0; expected at least 1"),
        ("MODEL.SOLOV2.MAX_PER_IMAGE_TEST", -1, r"MAX_PER_IMAGE_TEST = -1; expected at least 1"),
        ("MODEL.SOLOV2.NMS_SIGMA", 0.0, r"NMS_SIGMA = 0.0; expected a value > 0"),
        ("MODEL.SOLOV2.NMS_SIGMA", -2.0, r"NMS_SIGMA = -2.0; expected a value > 0"),
        ("MODEL.SOLOV2.NUM_GRIDS", [40, 36, 0, 16, 12], r"NUM_GRIDS = \[40, 36, 0, 16, 12\]"),
        ("MODEL.SOLOV2.NUM_CLASSES", 0, r"NUM_CLASSES = 0; expected at least 1"),
        ("INPUT.FORMAT", "XYZ", r"INPUT.FORMAT = 'XYZ'; expected one of \['BGR', 'L', 'RGB'"),
        (
            "MODEL.PIXEL_MEAN",
            [103.5, 116.3, 123.7, 100.0],
            r"PIXEL_MEAN = \[103.5, 116.3, 123.7, 100.0\] has 4 values, but INPUT.FORMAT 'BGR' "
            r"images have 3 channels",
        ),
        ("MODEL.PIXEL_STD", [1.0, 0.0, 1.0], r"STD = \[1.0, 0.0, 1.0\]; expected 3 values > 0"),
    ],
)
def test_meaningless_values_are_refused_at_build(small_cfg, key, value, message):
    small_cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        build_model(small_cfg)


def test_grayscale_format_takes_one_or_three_normalisation_values(small_cfg):
    small_cfg.INPUT.FORMAT = "L"
    small_cfg.MODEL.PIXEL_MEAN, small_cfg.MODEL.PIXEL_STD = [128.0], [64.0]
    assert build_model(small_cfg).pixel_mean.shape[0] == 1
    small_cfg.MODEL.PIXEL_MEAN, small_cfg.MODEL.PIXEL_STD = [1.0, 2.0], [1.0, 1.0]
    with pytest.raises(ValueError, match="'L' images have 1 or 3 channels"):
        build_model(small_cfg)
