"""SOLOv2DatasetMapper: an image that cannot be read stops training with an error naming it."""
import pytest
import torch
from conftest import copy_fruit, small_solov2_cfg

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)

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
    message = f"Cannot load {truncated_fruit}: OSError: image file is truncated"
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
    with pytest.raises(RuntimeError, match=f"Cannot load {truncated_fruit}: OSError"):
        next(batches)
