"""solov2_d2.checks on the model's inputs: images without instances train through detectron2's
real data path; non-finite pixels are refused."""
import math

import pytest
import torch
from conftest import FRUIT, copy_fruit

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.modeling import build_model

from solov2_d2.data import load_labelme_instances, register_labelme_instances
from solov2_d2.data.datasets import FRUIT_CLASSES


@pytest.fixture
def labelme_dataset(tmp_path):
    """Registers a labelme folder of fruit photos under a name; removed afterwards."""
    names = []

    def register(name, stems, without_shapes=()):
        folder = copy_fruit(tmp_path / name, stems, without_shapes)
        register_labelme_instances(name, str(folder), FRUIT_CLASSES)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("stems", [["1"], ["0", "1"]], ids=["only_empty", "mixed"])
def test_images_without_instances_train_through_the_dataset_mapper(
    small_cfg, labelme_dataset, stems
):
    """A labelme image with an empty `shapes` list, kept with FILTER_EMPTY_ANNOTATIONS False, in
    batches from detectron2's DatasetMapper and train loader: alone, or with an annotated
    image (two images and a batch of two: every batch holds both)."""
    small_cfg.DATASETS.TRAIN = (labelme_dataset(f"fruit_empty_{len(stems)}", stems, ["1"]),)
    small_cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    small_cfg.DATALOADER.NUM_WORKERS = 0
    small_cfg.SOLVER.IMS_PER_BATCH = 2
    small_cfg.INPUT.MIN_SIZE_TRAIN, small_cfg.INPUT.MAX_SIZE_TRAIN = (128,), 192
    batch = next(iter(build_detection_train_loader(small_cfg)))
    empty = [x["instances"] for x in batch if len(x["instances"]) == 0]
    assert len(empty) == (1 if len(stems) == 2 else 2)
    assert not any(i.has("gt_masks") for i in empty)  # what DatasetMapper gives them

    torch.manual_seed(0)
    model = build_model(small_cfg).train()
    losses = model(batch)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert (losses["loss_mask"] > 0) == (len(stems) == 2)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.ins_head.parameters())


def test_instances_without_masks_are_still_refused(small_cfg, labelme_dataset):
    small_cfg.DATASETS.TRAIN = (labelme_dataset("fruit_no_masks", ["0"]),)
    small_cfg.MODEL.MASK_ON = False
    small_cfg.DATALOADER.NUM_WORKERS = 0
    small_cfg.SOLVER.IMS_PER_BATCH = 1
    small_cfg.INPUT.MIN_SIZE_TRAIN, small_cfg.INPUT.MAX_SIZE_TRAIN = (128,), 192
    batch = next(iter(build_detection_train_loader(small_cfg)))
    with pytest.raises(ValueError, match="set MODEL.MASK_ON True"):
        build_model(small_cfg).train()(batch)


def test_instances_without_segmentation_name_both_causes(small_cfg):
    """MODEL.MASK_ON is True, but a dataset (registered with its own loader) gives annotations
    without 'segmentation': the message must not only ask to set MODEL.MASK_ON True."""
    (record,) = load_labelme_instances(str(FRUIT), FRUIT_CLASSES, files=["0"])
    for annotation in record["annotations"]:
        del annotation["segmentation"]
    DatasetCatalog.register("fruit_boxes_only", lambda: [record])
    MetadataCatalog.get("fruit_boxes_only").thing_classes = FRUIT_CLASSES
    try:
        small_cfg.DATASETS.TRAIN = ("fruit_boxes_only",)
        assert small_cfg.MODEL.MASK_ON
        small_cfg.DATALOADER.NUM_WORKERS = 0
        small_cfg.SOLVER.IMS_PER_BATCH = 1
        small_cfg.INPUT.MIN_SIZE_TRAIN, small_cfg.INPUT.MAX_SIZE_TRAIN = (128,), 192
        batch = next(iter(build_detection_train_loader(small_cfg)))
        with pytest.raises(ValueError) as e:
            build_model(small_cfg).train()(batch)
    finally:
        DatasetCatalog.remove("fruit_boxes_only")
        MetadataCatalog.remove("fruit_boxes_only")
    n = len(record["annotations"])
    assert f"has {n} instances and no masks" in str(e.value)
    assert "MODEL.MASK_ON is False" in str(e.value)
    assert "the dataset gives annotations without 'segmentation'" in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused_by_the_model(small_cfg, value):
    model = build_model(small_cfg).eval()
    image = torch.full((3, 64, 64), 100.0)
    image[:, 10:20, 10:15] = value
    with pytest.raises(ValueError, match=r"Input 1: image of shape \(3, 64, 64\) has 150 non-fin"):
        model([{"image": torch.zeros(3, 64, 64)}, {"image": image}])
