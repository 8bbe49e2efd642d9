"""add_solov2_config (solov2_d2/config.py): the SOLOv2 keys, each one read by the model."""
import re

from conftest import REPO

from detectron2.config import get_cfg

from solov2_d2 import add_solov2_config


def solov2_cfg():
    cfg = get_cfg()
    add_solov2_config(cfg)
    return cfg


def test_only_model_solov2_is_added():
    cfg, plain = solov2_cfg(), get_cfg()
    assert cfg.MODEL.pop("SOLOV2") and cfg == plain


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
