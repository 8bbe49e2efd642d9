"""solov2_d2/config.py: add_solov2_config adds the SOLOv2 keys, each one read by the model;
check_solov2_config refuses settings that would build a model but run meaningless or crash deep
in torch, naming the key and the allowed values."""
import re

import pytest
from conftest import REPO

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config
from solov2_d2.config import check_solver_config


def solov2_cfg():
    cfg = get_cfg()
    add_solov2_config(cfg)
    return cfg


def test_only_model_solov2_model_ema_and_input_augmentations_are_added():
    cfg, plain = solov2_cfg(), get_cfg()
    assert cfg.MODEL.pop("SOLOV2") and cfg.pop("MODEL_EMA")
    # The training augmentations (solov2_d2.data.augmentation), all off by default.
    for key in ("LSJ", "COLOR_JITTER", "COPY_PASTE"):
        assert cfg.INPUT.pop(key).ENABLED is False
    assert cfg == plain


def test_every_key_is_read_by_the_package():
    # A key nothing reads would be a setting that silently does nothing.
    sources = "\n".join(
        path.read_text()
        for path in (REPO / "solov2_d2").rglob("*.py")
        if path.name != "config.py"
    )
    keys = list(solov2_cfg().MODEL.SOLOV2)
    unread = [k for k in keys if not re.search(rf"(\.|[\"']){k}\b", sources)]
    assert unread == []
    assert "INSTANCE_IN_CHANNELS" not in keys  # the heads take the FPN's channels


def test_defaults_are_the_papers():
    c = solov2_cfg().MODEL.SOLOV2
    assert c.NUM_GRIDS == [40, 36, 24, 16, 12] and c.INSTANCE_STRIDES == [8, 8, 16, 32, 32]
    assert c.SCALE_RANGES == [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    assert (c.INSTANCE_CHANNELS, c.NUM_INSTANCE_CONVS, c.MASK_DIM) == (512, 4, 256)
    assert (c.SIGMA, c.DICE_LOSS_WEIGHT, c.FOCAL_LOSS_ALPHA, c.FOCAL_LOSS_GAMMA) == (
        0.2,
        3.0,
        0.25,
        2.0,
    )
    assert (c.NMS_KERNEL, c.NMS_SIGMA, c.MAX_PER_IMAGE_TEST) == ("gaussian", 2.0, 100)


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
        ("MODEL.SOLOV2.PRE_NMS_TOPK_TEST", 0, r"PRE_NMS_TOPK_TEST = 0; expected a positive"),
        ("MODEL.SOLOV2.MASK_CHUNK_SIZE", 0, r"MASK_CHUNK_SIZE = 0; expected a positive"),
        ("MODEL.SOLOV2.MAX_MASK_CANDIDATES", -1, r"MAX_MASK_CANDIDATES = -1; expected 0"),
        ("MODEL.SOLOV2.MASK_THRESH_TEST", 1.0, r"MASK_THRESH_TEST = 1.0; expected a value in"),
        ("MODEL.SOLOV2.INFERENCE_PATH", "gpu", r"INFERENCE_PATH = 'gpu'; expected 'auto', 'plain'"),
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


def test_inference_path_reaches_the_post_processor(small_cfg):
    assert build_model(small_cfg).postprocessor.inference_path == "auto"
    small_cfg.merge_from_list(["MODEL.SOLOV2.INFERENCE_PATH", "plain"])
    assert build_model(small_cfg).postprocessor.inference_path == "plain"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOLVER.CHECKPOINT_PERIOD", 0, r"SOLVER.CHECKPOINT_PERIOD = 0; expected an integer >= 1"),
        ("SOLVER.MAX_ITER", 0, r"SOLVER.MAX_ITER = 0; expected an integer >= 1"),
        ("SOLVER.IMS_PER_BATCH", 0, r"SOLVER.IMS_PER_BATCH = 0; expected an integer >= 1"),
        ("SOLVER.BASE_LR", -0.01, r"SOLVER.BASE_LR = -0.01; expected a finite value >= 0"),
        ("SOLVER.BASE_LR", float("nan"), r"SOLVER.BASE_LR = nan; expected a finite value"),
        ("SOLVER.WARMUP_ITERS", -1, r"SOLVER.WARMUP_ITERS = -1; expected a finite value >= 0"),
        ("SOLVER.WEIGHT_DECAY", -1e-4, r"SOLVER.WEIGHT_DECAY = -0.0001; expected a finite"),
        ("SOLVER.WARMUP_FACTOR", 2.0, r"SOLVER.WARMUP_FACTOR = 2.0; expected a value in \[0, 1\]"),
        ("SOLVER.WARMUP_METHOD", "cosine", r"SOLVER.WARMUP_METHOD = 'cosine'; expected 'linear'"),
        ("SOLVER.GAMMA", 0.0, r"SOLVER.GAMMA = 0.0; expected a value > 0"),
        ("TEST.EVAL_PERIOD", -5, r"TEST.EVAL_PERIOD = -5; expected 0 \(evaluate only at the end"),
        ("SOLVER.STEPS", (100, 50), r"SOLVER.STEPS = \[100, 50\]; expected strictly increasing"),
        ("SOLVER.STEPS", (0,), r"SOLVER.STEPS = \[0\]: every step must be > 0"),
        ("SOLVER.STEPS", (500, 1000), r"STEPS = \[500, 1000\]: .*not equal SOLVER.MAX_ITER = 1000"),
    ],
)  # fmt: skip
def test_solver_values_that_would_crash_or_mislead_training_are_refused(key, value, message):
    cfg = solov2_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", 1000, "SOLVER.STEPS", (), key, value])
    with pytest.raises(ValueError, match=message):
        check_solver_config(cfg)


def test_solver_defaults_and_edge_values_pass():
    cfg = solov2_cfg()
    check_solver_config(cfg)  # detectron2's defaults
    cfg.merge_from_list(["SOLVER.MAX_ITER", 1, "SOLVER.STEPS", (), "SOLVER.BASE_LR", 0.0])
    cfg.merge_from_list(["SOLVER.WARMUP_ITERS", 0, "TEST.EVAL_PERIOD", 0])
    check_solver_config(cfg)
    # The steps of a cosine schedule are not read.
    cfg.merge_from_list(["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.STEPS", (5,)])
    check_solver_config(cfg)
    # A published schedule shortened by MAX_ITER alone: detectron2 drops the later steps.
    cfg.merge_from_list(["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.MAX_ITER", 40])
    cfg.merge_from_list(["SOLVER.STEPS", (60000, 80000)])
    check_solver_config(cfg)
