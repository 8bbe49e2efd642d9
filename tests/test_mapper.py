"""SOLOv2DatasetMapper: an image that cannot be read stops training with an error naming it."""
import pytest
from conftest import copy_fruit, small_solov2_cfg

from detectron2.data import DatasetCatalog, MetadataCatalog

from solov2_d2.data import build_resumable_train_loader, register_labelme_instances
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
