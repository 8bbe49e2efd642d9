"""The training augmentations of the config (INPUT.LSJ, INPUT.COLOR_JITTER): off by default,
detectron2's augmentations when on, masks rasterised and transformed with the image."""
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import small_solov2_cfg

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import polygons_to_bitmask
from detectron2.structures import BitMasks

from solov2_d2.data import SOLOv2DatasetMapper
from solov2_d2.data.augmentation import (
    FormatAwareSaturation,
    build_solov2_augmentation,
    check_augmentation_config,
    masks_to_tight_boxes,
    transform_masks,
)
from solov2_d2.data.mapper import annotation_masks


def _cfg(*opts):
    cfg = small_solov2_cfg()
    cfg.DATASETS.TRAIN = ("fruit_train",)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96, 128), 192
    cfg.merge_from_list(list(opts))
    return cfg


def _map(mapper, record, seed):
    np.random.seed(seed)
    return mapper(dict(record))


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_defaults_map_as_detectron2s_mapper(mask_format):
    """All keys off: the same augmentations, images, boxes and masks as detectron2's."""
    cfg = _cfg("INPUT.MASK_FORMAT", mask_format)
    ours, theirs = SOLOv2DatasetMapper(cfg, True), DatasetMapper(cfg, True)
    assert repr(ours.augmentations) == repr(theirs.augmentations)
    assert not ours.rasterise_masks and not ours.copy_paste
    record = DatasetCatalog.get("fruit_train")[1]
    for seed in range(3):
        a, b = _map(ours, record, seed), _map(theirs, record, seed)
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        assert type(a["instances"].gt_masks) is type(b["instances"].gt_masks)


def test_lsj_gives_square_images_of_the_size_with_masks_that_follow_the_image():
    cfg = _cfg("INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "160")
    mapper = SOLOv2DatasetMapper(cfg, True)
    names = [type(a).__name__ for a in mapper.augmentations.augs]
    assert names == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]
    record = DatasetCatalog.get("fruit_train")[0]
    sizes = set()
    for seed in range(6):
        out = _map(mapper, record, seed)
        assert out["image"].shape == (3, 160, 160)
        instances = out["instances"]
        masks = instances.gt_masks.tensor
        assert masks.shape[1:] == (160, 160) and masks.dtype == torch.bool
        assert masks.flatten(1).any(dim=1).all(), "instances cropped out are dropped"
        assert torch.equal(instances.gt_boxes.tensor, BitMasks(masks).get_bounding_boxes().tensor)
        # Padding (pad value 128 in every channel) only right of / below the scaled image.
        padded = (out["image"] == 128).all(dim=0)
        sizes.add(int((~padded).any(dim=0).sum()))
        assert not (masks & padded).any()
    assert len(sizes) > 1, "the scale is random"


def test_lsj_masks_match_the_image_transform_applied_mask_by_mask():
    """The stacked transform (flip, resize by gathered rows and columns, crop, pad) is
    detectron2's apply_segmentation of each mask (PIL's nearest resize), pixel for pixel; the
    sizes include 600 -> 195 rows, where torch's nearest-exact rounds 16 pixels otherwise."""
    record = DatasetCatalog.get("fruit_train")[2]
    h, w = record["height"], record["width"]
    masks = annotation_masks(record["annotations"], h, w)
    image = np.zeros((h, w, 3), np.uint8)
    for seed in range(4):
        np.random.seed(seed)
        augs = T.AugmentationList(
            [T.RandomFlip(), T.ResizeScale(0.3, 1.7, 200, 200), T.FixedSizeCrop((200, 200))]
        )
        transforms = augs(T.AugInput(image))
        expected = np.stack(
            [transforms.apply_segmentation(m.numpy().astype(np.uint8)) for m in masks]
        )
        if seed == 0:
            resize = next(t for t in transforms.transforms if isinstance(t, T.ResizeTransform))
            assert (resize.new_h, resize.new_w) == (195, 260)
        assert np.array_equal(transform_masks(transforms, masks).numpy(), expected.astype(bool))
    assert transform_masks(transforms, masks[:0]).shape == (0, 200, 200)


def test_annotation_masks_rasterise_polygons_rle_and_arrays_as_detectron2():
    h, w = 40, 50
    two_parts = [[2, 2, 12, 2, 12, 12, 2, 12], [30, 20, 45, 20, 45, 35]]
    one_part = [[5, 5, 25, 8, 15, 30]]
    array = np.zeros((h, w), np.uint8)
    array[30:, 40:] = 1
    rle = mask_util.encode(np.asfortranarray(array))
    annos = [{"segmentation": s} for s in (two_parts, rle, one_part, array)]
    masks = annotation_masks(annos, h, w)
    assert masks.shape == (4, h, w) and masks.dtype == torch.bool
    assert torch.equal(masks[0], torch.from_numpy(polygons_to_bitmask(two_parts, h, w)))
    assert torch.equal(masks[2], torch.from_numpy(polygons_to_bitmask(one_part, h, w)))
    assert torch.equal(masks[1], torch.from_numpy(array.astype(bool)))
    assert torch.equal(masks[3], masks[1])
    with pytest.raises(ValueError, match="Cannot rasterise a segmentation of type ndarray"):
        annotation_masks([{"segmentation": np.zeros((3, 3))}], h, w)


def test_tight_boxes_are_detectron2s_bitmask_boxes():
    masks = torch.zeros((3, 20, 30), dtype=torch.bool)
    masks[0, 3:7, 4:9] = True
    masks[0, 15, 25] = True
    masks[2, 0, 0] = True
    expected = BitMasks(masks).get_bounding_boxes().tensor
    assert torch.equal(masks_to_tight_boxes(masks), expected)
    assert masks_to_tight_boxes(masks)[1].tolist() == [0, 0, 0, 0]


def test_color_jitter_follows_the_ranges():
    cfg = _cfg("INPUT.COLOR_JITTER.ENABLED", "True", "INPUT.COLOR_JITTER.BRIGHTNESS", "(0.5, 0.5)")
    cfg.INPUT.COLOR_JITTER.CONTRAST = (1.0, 1.0)
    cfg.INPUT.COLOR_JITTER.SATURATION = (1.0, 1.0)
    augs = build_solov2_augmentation(cfg, True)
    names = [type(a).__name__ for a in augs]
    assert names[-3:] == ["RandomBrightness", "RandomContrast", "FormatAwareSaturation"]
    # Evaluation: detectron2's resize only.
    assert [type(a).__name__ for a in build_solov2_augmentation(cfg, False)] == [
        "ResizeShortestEdge"
    ]
    plain = SOLOv2DatasetMapper(_cfg(), True)
    jittered = SOLOv2DatasetMapper(cfg, True)
    record = DatasetCatalog.get("fruit_train")[0]
    a, b = _map(plain, record, 0)["image"], _map(jittered, record, 0)["image"]
    # The geometry draws come first, so both saw the same resize and flip.
    expected = (a.float() * 0.5).clamp(0, 255).to(torch.uint8)
    assert (b.int() - expected.int()).abs().max() <= 1


def test_saturation_of_bgr_images_blends_with_their_luma():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    gray = FormatAwareSaturation(0.0, 0.0, "BGR").get_transform(bgr).apply_image(bgr)
    luma = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.abs(gray[:, :, 0].astype(int) - luma).max() <= 1
    rgb = bgr[:, :, ::-1].copy()
    assert np.array_equal(
        FormatAwareSaturation(0.0, 0.0, "RGB").get_transform(rgb).apply_image(rgb), gray
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "0"], "INPUT.LSJ.SIZE = 0"),
        (["INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.MIN_SCALE", "2.5"], "INPUT.LSJ.MIN_SCALE = 2.5"),
        (["INPUT.LSJ.ENABLED", "True", "INPUT.CROP.ENABLED", "True"], "INPUT.CROP.ENABLED"),
        (
            ["INPUT.COLOR_JITTER.ENABLED", "True", "INPUT.COLOR_JITTER.CONTRAST", "(1.2, 0.8)"],
            r"INPUT.COLOR_JITTER.CONTRAST = \[1.2, 0.8\]",
        ),
        (
            ["INPUT.COLOR_JITTER.ENABLED", "True", "INPUT.FORMAT", "L"],
            "INPUT.COLOR_JITTER.SATURATION .* with INPUT.FORMAT 'L'",
        ),
        (["INPUT.COPY_PASTE.ENABLED", "True", "INPUT.COPY_PASTE.PROB", "1.5"],
         "INPUT.COPY_PASTE.PROB = 1.5"),
        (
            ["INPUT.COPY_PASTE.ENABLED", "True", "INPUT.COPY_PASTE.MIN_VISIBLE_FRACTION", "-0.1"],
            "INPUT.COPY_PASTE.MIN_VISIBLE_FRACTION = -0.1",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(opts, message):
    cfg = _cfg(*opts)
    with pytest.raises(ValueError, match=message):
        check_augmentation_config(cfg)
    with pytest.raises(ValueError, match=message):
        SOLOv2DatasetMapper(cfg, True)


def test_disabled_groups_are_not_checked():
    check_augmentation_config(_cfg("INPUT.LSJ.SIZE", "0", "INPUT.COPY_PASTE.PROB", "2.0"))
