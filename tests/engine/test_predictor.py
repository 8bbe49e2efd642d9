"""SOLOv2Predictor: arrays of other types, layouts, ranges and shapes get a clear error or a
documented conversion before detectron2's resize; weights that leave the model random are
refused."""
import cv2
import numpy as np
import pytest
import torch
from conftest import FRUIT, small_solov2_cfg

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from solov2_d2.engine.checkpoint import IncompleteWeightsError
from solov2_d2.engine.predictor import SOLOv2Predictor, image_for_predictor


def _cfg(num_classes=3):
    cfg = small_solov2_cfg(num_classes)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    # Untrained but with detections: category scores start near 0.5.
    cfg.MODEL.SOLOV2.PRIOR_PROB = 0.5
    cfg.MODEL.SOLOV2.MAX_MASK_CANDIDATES = 20
    cfg.MODEL.SOLOV2.MAX_PER_IMAGE_TEST = 10
    return cfg


def _save_model(cfg, folder):
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    cfg = _cfg()
    cfg.MODEL.WEIGHTS = _save_model(cfg, tmp_path_factory.mktemp("weights"))
    return SOLOv2Predictor(cfg)


@pytest.fixture(scope="module")
def photo():
    """A real fruit photo (BGR uint8), small so that the model runs fast."""
    return cv2.resize(cv2.imread(str(FRUIT / "14.jpg")), (96, 72), interpolation=cv2.INTER_AREA)


def _same(a, b):
    a, b = a["instances"], b["instances"]
    assert len(a) > 0
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.int32])
def test_integer_arrays_within_0_255_are_converted_losslessly(predictor, photo, dtype):
    _same(predictor(photo.astype(dtype)), predictor(photo))


def test_integer_arrays_beyond_8_bits_are_refused(predictor, photo):
    with pytest.raises(ValueError, match=r"uint16 with values in 2056\.\.65535; expected 0\.\.255"):
        predictor(photo.astype(np.uint16) * 257)
    signed = photo.astype(np.int64)
    signed[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"int64 with values in -1\.\.255"):
        predictor(signed)


def test_bool_arrays_are_refused(predictor, photo):
    with pytest.raises(ValueError, match="bool array"):
        predictor(photo > 100)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_float_images_of_integer_values_give_the_uint8_detections(predictor, photo, dtype):
    """Detectron2 resizes float arrays with torch without antialiasing (uint8 ones with PIL):
    the same picture would give other detections as float. Integer values 0..255 are uint8."""
    image = photo.astype(dtype)
    converted = image_for_predictor(image)
    assert converted.dtype == np.uint8 and np.array_equal(converted, photo)
    _same(predictor(image), predictor(photo))


def test_float_images_of_other_values_are_float32(predictor, photo):
    image = np.minimum(photo.astype(np.float64) + 0.25, 255)
    converted = image_for_predictor(image)
    assert converted.dtype == np.float32 and np.array_equal(converted, image.astype(np.float32))
    # 12.0000001 is no integer, although float32 would round it to 12.
    nearly = photo.astype(np.float64)
    nearly[0, 0, 0] = 12.0000001
    assert image_for_predictor(nearly).dtype == np.float32
    # Resized with torch (uint8 images with PIL): close to the uint8 detections, not equal.
    assert len(predictor(image)["instances"]) > 0


def test_float_images_in_0_1_are_refused(predictor, photo):
    message = r"float32 with values in \[0.03137.*, 1\], which the model would see as black"
    with pytest.raises(ValueError, match=message + r".*Pass image \* 255"):
        predictor(photo.astype(np.float32) / 255)


def test_nan_patch_is_refused(predictor, photo):
    image = photo.astype(np.float32)
    image[10:20, 10:30] = np.nan
    with pytest.raises(ValueError, match=r"shape \(72, 96, 3\) has 600 non-finite values"):
        predictor(image)


def test_channels_first_array_is_refused(predictor, photo):
    with pytest.raises(ValueError, match=r"shape \(3, 72, 96\).*transpose\(1, 2, 0\)"):
        predictor(photo.transpose(2, 0, 1))


def test_four_channels_are_refused(predictor, photo):
    with pytest.raises(ValueError, match="COLOR_BGRA2BGR"):
        predictor(cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA))


def test_2d_grayscale_is_a_one_channel_image(predictor, photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    out = predictor(gray)
    assert out["instances"].image_size == (72, 96)
    _same(out, predictor(gray[:, :, None]))


def test_too_elongated_images_are_refused_with_shape_and_limit(predictor):
    """MAX_SIZE_TEST 96: an image over 192 times longer than high would be resized to 0 rows
    (detectron2 fails inside PIL: "height and width must be > 0")."""
    out = predictor(np.full((1, 192, 3), 128, dtype=np.uint8))  # 0.5 rows, rounded to 1
    assert out["instances"].image_size == (1, 192)
    message = (
        r"The image has shape \(1, 200, 3\): resized to a short side of 64 and a long side of "
        r"at most INPUT.MAX_SIZE_TEST = 96, it would be 0x96 pixels. Its aspect ratio, 200.0:1, "
        r"exceeds the limit 2 x INPUT.MAX_SIZE_TEST : 1 = 192:1"
    )
    for dtype in (np.uint8, np.float32):
        with pytest.raises(ValueError, match=message):
            predictor(np.full((1, 200, 3), 128, dtype=dtype))
    with pytest.raises(ValueError, match=r"shape \(3000, 10, 1\).*it would be 96x0 pixels"):
        predictor(np.zeros((3000, 10), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 10, 3), (10, 0)])
def test_empty_arrays_are_refused(predictor, shape):
    with pytest.raises(ValueError, match="The image is empty"):
        predictor(np.zeros(shape, dtype=np.uint8))


def test_other_types_are_refused(predictor, photo):
    with pytest.raises(TypeError, match="The image is a Tensor; expected a numpy array"):
        predictor(torch.from_numpy(photo))


def test_empty_weights_are_refused_unless_allowed():
    cfg = _cfg()
    with pytest.raises(IncompleteWeightsError, match="MODEL.WEIGHTS is empty"):
        SOLOv2Predictor(cfg)
    assert len(SOLOv2Predictor(cfg, allow_incomplete_weights=True)(np.zeros((32, 32, 3)))) == 1


def test_weights_of_another_head_are_refused(tmp_path, photo):
    cfg = _cfg(num_classes=3)
    cfg.MODEL.WEIGHTS = _save_model(_cfg(num_classes=2), tmp_path)
    with pytest.raises(IncompleteWeightsError) as e:
        SOLOv2Predictor(cfg)
    assert cfg.MODEL.WEIGHTS in str(e.value)
    assert "ins_head.cate_pred.weight ([3, 128, 3, 3] in the model, [2, 128, 3, 3]" in str(e.value)


def test_a_model_left_in_train_mode_still_predicts_and_keeps_its_mode(predictor, photo):
    expected = predictor(photo)
    predictor.model.train()
    try:
        _same(predictor(photo), expected)
        assert predictor.model.training
    finally:
        predictor.model.eval()
