"""SOLOv2DatasetMapper: an image that cannot be read or resized stops training with an error
naming it; 16-bit images are scaled to 8 bits."""
import cv2
import numpy as np
import pytest
import torch
from conftest import FRUIT, copy_fruit, small_solov2_cfg

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.data.detection_utils import read_image as detectron2_read_image

from solov2_d2.data import (
    SOLOv2DatasetMapper,
    build_resumable_train_loader,
    register_labelme_instances,
)
from solov2_d2.data.datasets import FRUIT_CLASSES


@pytest.fixture
def truncated_fruit(tmp_path):
    """A registered labelme folder whose photo 1.jpg lost the second half of its bytes: its
    header reads (registration passes), its pixels do not."""
    folder = copy_fruit(tmp_path / "fruit", ["0", "1"])
    image = folder / "1.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    register_labelme_instances("fruit_truncated", str(folder), FRUIT_CLASSES)
    yield image
    DatasetCatalog.remove("fruit_truncated")
    MetadataCatalog.remove("fruit_truncated")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_image_is_named_when_training(truncated_fruit, num_workers):
    cfg = small_solov2_cfg()
    cfg.DATASETS.TRAIN = ("fruit_truncated",)
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    message = (
        f"Cannot load {truncated_fruit}: ValueError: Cannot read the image {truncated_fruit}: "
        "OSError: image file is truncated"
    )
    with pytest.raises(RuntimeError, match=message):
        next(iter(build_resumable_train_loader(cfg)))


def test_truncated_image_is_named_when_evaluating(truncated_fruit):
    """The evaluation path: detectron2's test loader with this mapper (as train_net.py builds
    it); the readable photo maps as detectron2's DatasetMapper maps it."""
    cfg = small_solov2_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = build_detection_test_loader(
        cfg, "fruit_truncated", mapper=SOLOv2DatasetMapper(cfg, False)
    )
    batches = iter(loader)
    (readable,) = next(batches)
    expected = DatasetMapper(cfg, False)(DatasetCatalog.get("fruit_truncated")[0])
    assert torch.equal(readable["image"], expected["image"])
    with pytest.raises(RuntimeError, match=f"Cannot load {truncated_fruit}: ValueError: .*OSError"):
        next(batches)


def _fruit_dict(file_name):
    """fruit_val's first photo (with its annotations) read from `file_name`."""
    record = dict(DatasetCatalog.get("fruit_val")[0])
    record["file_name"] = str(file_name)
    return record


@pytest.mark.parametrize("gray", [False, True], ids=["color", "gray"])
def test_16_bit_png_maps_as_the_8_bit_image(tmp_path, gray):
    """A 16-bit PNG of a fruit photo (8-bit values x 257) gives the 8-bit image's tensor, when
    evaluating and when training (annotations too); detectron2's mapper makes the grayscale one
    white."""
    rgb = detectron2_read_image(str(FRUIT / "14.jpg"), format="RGB")
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if gray else rgb[:, :, ::-1]
    eight, sixteen = tmp_path / "8.png", tmp_path / "16.png"
    assert cv2.imwrite(str(eight), image)
    assert cv2.imwrite(str(sixteen), image.astype(np.uint16) * 257)
    cfg = small_solov2_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    for is_train in (False, True):
        mapper = SOLOv2DatasetMapper(cfg, is_train)
        torch.manual_seed(0)  # the training flip
        np.random.seed(0)
        expected = mapper(_fruit_dict(eight))
        torch.manual_seed(0)
        np.random.seed(0)
        mapped = mapper(_fruit_dict(sixteen))
        assert mapped["image"].dtype == torch.uint8
        assert torch.equal(mapped["image"], expected["image"])
        if is_train:
            assert torch.equal(
                mapped["instances"].gt_masks.tensor, expected["instances"].gt_masks.tensor
            )
    if gray:
        assert (DatasetMapper(cfg, False)(_fruit_dict(sixteen))["image"] == 255).all()
    # Training from the 8-bit photo itself: the same pixels as detectron2's mapper gives.
    assert torch.equal(
        SOLOv2DatasetMapper(cfg, False)(_fruit_dict(FRUIT / "14.jpg"))["image"],
        DatasetMapper(cfg, False)(_fruit_dict(FRUIT / "14.jpg"))["image"],
    )


@pytest.mark.parametrize("is_train", [False, True])
def test_too_elongated_images_are_refused_with_shape_and_limit(tmp_path, is_train):
    """MAX_SIZE 96 shrinks an image over 192 times longer than high to 0 rows: detectron2's
    mapper fails inside PIL; this one names the file, its shape and the limit."""
    cfg = small_solov2_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64, 80), 96
    key = "INPUT.MAX_SIZE_TRAIN" if is_train else "INPUT.MAX_SIZE_TEST"
    at_limit, beyond = tmp_path / "192.png", tmp_path / "200.png"
    assert cv2.imwrite(str(at_limit), np.full((1, 192, 3), 128, dtype=np.uint8))
    assert cv2.imwrite(str(beyond), np.full((1, 200, 3), 128, dtype=np.uint8))
    mapper = SOLOv2DatasetMapper(cfg, is_train)
    assert mapper({"file_name": str(at_limit)})["image"].shape == (3, 1, 96)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        DatasetMapper(cfg, is_train)({"file_name": str(beyond)})
    message = (
        rf"Cannot load {beyond}: ValueError: The image {beyond} has shape \(1, 200, 3\): .*"
        rf"{key} = 96, it would be 0x96 pixels. .* limit 2 x {key} : 1 = 192:1"
    )
    with pytest.raises(RuntimeError, match=message):
        mapper({"file_name": str(beyond), "height": 1, "width": 200})
