"""The checked COCO loader (solov2_d2/data/coco.py), through datasets registered in detectron2's
DatasetCatalog as the project and its users register them, and through train_net.py's data path:
duplicate ids refused, annotations without segmentation refused, empty or inconsistent boxes
recomputed; a converted dataset's ground truth is not a stale cache."""
import solov2_d2  # noqa: F401  # isort: split

import copy
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
from conftest import FRUIT, REPO, copy_fruit, small_solov2_cfg, tiny_fruit_argv

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances as d2_register_coco_instances
from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask

from solov2_d2.data import (
    SOLOv2DatasetMapper,
    check_coco_datasets,
    load_labelme_instances,
    register_coco_instances,
    register_labelme_instances,
)
from solov2_d2.data.datasets import FRUIT_CLASSES

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

NAME = "coco_check_test"


def _polygon_box(polygons):
    xs = [x for p in polygons for x in p[0::2]]
    ys = [y for p in polygons for y in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _fruit_coco(stems=("0", "1")):
    """The fruit photos `stems` as a COCO instances dict (file names relative to FRUIT): ids as in
    a COCO file (images 1.., annotations 1.., categories 1..3), bbox XYWH from the polygons."""
    records = load_labelme_instances(str(FRUIT), FRUIT_CLASSES, files=stems)
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append(
            {"id": image_id, "file_name": f"{stems[image_id - 1]}.jpg",
             "height": record["height"], "width": record["width"]}
        )  # fmt: skip
        for a in record["annotations"]:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                 "category_id": a["category_id"] + 1, "segmentation": a["segmentation"],
                 "bbox": _polygon_box(a["segmentation"]), "area": 1.0}
            )  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(FRUIT_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture
def coco_dataset(tmp_path):
    """register(data, register=...) writes `data` as a json file and registers it as NAME with
    the project's register_coco_instances (or `register`, e.g. detectron2's); returns the file."""

    def register(data, register=register_coco_instances, name=NAME):
        json_file = tmp_path / f"{name}.json"
        json_file.write_text(json.dumps(data))
        register(name, {}, str(json_file), str(FRUIT))
        return str(json_file)

    yield register
    for name in (NAME, NAME + "_d2"):
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


def _boxes(name):
    return [a["bbox"] for d in DatasetCatalog.get(name) for a in d["annotations"]]


def _num_trained_instances(name):
    """How many instances the images of dataset `name` give training, through the mapper."""
    cfg = small_solov2_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 192
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = SOLOv2DatasetMapper(cfg, True)
    return sum(len(mapper(copy.deepcopy(d))["instances"]) for d in DatasetCatalog.get(name))


def test_a_faithful_file_loads_as_detectron2_loads_it(coco_dataset, caplog):
    data = _fruit_coco()
    coco_dataset(data)
    coco_dataset(data, d2_register_coco_instances, NAME + "_d2")
    assert DatasetCatalog.get(NAME) == DatasetCatalog.get(NAME + "_d2")
    assert "recomputed" not in caplog.text
    assert MetadataCatalog.get(NAME).thing_classes == FRUIT_CLASSES
    assert MetadataCatalog.get(NAME).evaluator_type == "coco"


@pytest.mark.parametrize(
    "bbox, reason",
    [
        (lambda b: [b[0], b[1], 0.0, 0.0], "1 empty"),
        (lambda b: [b[0], b[1], b[2], -5.0], "1 empty"),
        (lambda b: [b[0], b[1], math.nan, b[3]], "1 empty"),
        (lambda b: [b[0] + 50.0, b[1], b[2], b[3]], "1 more than 1 pixel away"),
        (lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]], "1 more than 1 pixel away"),  # XYXY
    ],
    ids=["zero_size", "negative_height", "nan", "shifted", "xyxy_written"],
)
def test_empty_or_inconsistent_box_is_recomputed_and_its_object_trains(
    coco_dataset, caplog, bbox, reason
):
    data = _fruit_coco()
    good = copy.deepcopy(data["annotations"][2]["bbox"])
    data["annotations"][2]["bbox"] = bbox(good)
    json_file = coco_dataset(data)
    with caplog.at_level(logging.WARNING):
        boxes = _boxes(NAME)
    assert boxes[2] == pytest.approx(good)
    expected = [a["bbox"] for a in _fruit_coco()["annotations"]]
    assert sum(boxes, []) == pytest.approx(sum(expected, []))
    assert f"{json_file}: recomputed the bbox of 1 annotations" in caplog.text
    assert reason in caplog.text and "Annotation ids: 3." in caplog.text
    # Detectron2's loader keeps the bad box: the empty-box filter drops a zero-size one.
    if bbox(good)[2] == 0:
        coco_dataset(data, d2_register_coco_instances, NAME + "_d2")
        assert _num_trained_instances(NAME) == _num_trained_instances(NAME + "_d2") + 1
    assert _num_trained_instances(NAME) == len(data["annotations"])


def test_box_within_a_pixel_of_its_segmentation_is_kept(coco_dataset, caplog):
    data = _fruit_coco()
    x, y, w, h = data["annotations"][0]["bbox"]
    data["annotations"][0]["bbox"] = [x - 0.9, y + 0.5, w + 1.8, h - 0.5]
    coco_dataset(data)
    assert _boxes(NAME)[0] == [x - 0.9, y + 0.5, w + 1.8, h - 0.5]
    assert "recomputed" not in caplog.text


def test_duplicate_image_id_is_refused(coco_dataset):
    data = _fruit_coco()
    data["images"][1]["id"] = 1
    for a in data["annotations"]:
        a["image_id"] = 1
    json_file = coco_dataset(data)
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(NAME)
    assert f"{json_file}: image id 1 is used by 2 images (0.jpg, 1.jpg)" in str(e.value)


def test_duplicate_annotation_id_is_refused(coco_dataset):
    data = _fruit_coco()
    data["annotations"][-1]["id"] = 4
    json_file = coco_dataset(data)
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(NAME)
    assert f"{json_file}: annotation id 4 is used by 2 annotations (of image ids [1, 2])" in str(
        e.value
    )


@pytest.mark.parametrize("segmentation", ["missing", None, []])
def test_annotation_without_segmentation_is_refused(coco_dataset, segmentation):
    data = _fruit_coco()
    if segmentation == "missing":
        del data["annotations"][3]["segmentation"]
    else:
        data["annotations"][3]["segmentation"] = segmentation
    json_file = coco_dataset(data)
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(NAME)
    assert f"{json_file}: annotation id 4 (image id 1) has no segmentation" in str(e.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bbox", [], "has bbox [], which is not [x, y, width, height] numbers"),
        ("bbox", [1, 2, 3], "has bbox [1, 2, 3], which is not"),
        ("segmentation", [[1.0, 2.0, math.inf, 4.0, 5.0, 6.0]], "non-finite coordinate"),
        ("segmentation", [[1.0, 2.0, "3", 4.0, 5.0, 6.0]], "is not a number"),
    ],
)
def test_malformed_box_or_polygon_is_refused(coco_dataset, field, value, message):
    data = _fruit_coco()
    data["annotations"][1][field] = value
    json_file = coco_dataset(data)
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get(NAME)
    assert f"{json_file}: annotation id 2 (image id 1)" in str(e.value)
    assert message in str(e.value)


def test_train_net_checks_datasets_registered_with_detectron2(coco_dataset, tmp_path):
    """A dataset a user registered with detectron2's register_coco_instances, trained by
    train_net.py: its setup switches it to the checked loader, whose errors stop the training
    data path; a zero-size box is recomputed."""
    data = _fruit_coco()
    good = data["annotations"][0]["bbox"]
    data["annotations"][0]["bbox"] = [good[0], good[1], 0, 0]
    coco_dataset(data, d2_register_coco_instances)
    argv = tiny_fruit_argv(tmp_path, "DATASETS.TRAIN", f"('{NAME}',)")
    cfg = train_net.setup(train_net.argument_parser().parse_args(argv))
    assert _boxes(NAME)[0] == pytest.approx(good)

    data["images"][1]["id"] = 1
    (tmp_path / f"{NAME}.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="image id 1 is used by 2 images"):
        train_net.Trainer.build_train_loader(cfg)


def test_check_coco_datasets_checks_a_json_file_of_another_loader(coco_dataset, tmp_path):
    data = _fruit_coco()
    del data["annotations"][0]["segmentation"]
    json_file = tmp_path / "other.json"
    json_file.write_text(json.dumps(data))
    DatasetCatalog.register(NAME, lambda: [])
    MetadataCatalog.get(NAME).set(json_file=str(json_file), evaluator_type="coco")
    with pytest.raises(ValueError, match=f"{json_file}: annotation id 1 .* no segmentation"):
        check_coco_datasets([NAME])
    check_coco_datasets(["fruit_val"])  # no json file: nothing to check


def _perfect_predictions(record):
    """Instances predicting the annotations of a dataset dict (polygons), score 1."""
    height, width = record["height"], record["width"]
    annotations = record["annotations"]
    instances = Instances((height, width))
    masks = [polygons_to_bitmask(a["segmentation"], height, width) for a in annotations]
    instances.pred_masks = torch.as_tensor(np.stack(masks))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    instances.pred_boxes = Boxes(torch.tensor(boxes))
    instances.scores = torch.ones(len(annotations))
    instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
    return instances


def test_evaluation_after_editing_annotations_uses_the_new_ground_truth(tmp_path):
    """train_net.py's evaluator for a labelme dataset (no json file): COCOEvaluator caches its
    COCO conversion in the output folder and would reuse it after the annotations changed."""
    folder = copy_fruit(tmp_path / "fruit", ["14"])
    register_labelme_instances("fruit_edited", str(folder), FRUIT_CLASSES)
    try:
        cfg = small_solov2_cfg()
        cfg.OUTPUT_DIR = str(tmp_path / "out")
        evaluator = train_net.Trainer.build_evaluator(cfg, "fruit_edited")
        before = len(evaluator._coco_api.anns)
        data = json.loads((folder / "14.json").read_text())
        del data["shapes"][:3]
        (folder / "14.json").write_text(json.dumps(data))
        evaluator = train_net.Trainer.build_evaluator(cfg, "fruit_edited")
        assert len(evaluator._coco_api.anns) == before - 3
        # Predictions that are exactly the edited annotations score 100 against them (the three
        # removed objects of a stale ground truth would be missed).
        evaluator.reset()
        (record,) = DatasetCatalog.get("fruit_edited")
        evaluator.process([record], [{"instances": _perfect_predictions(record)}])
        results = evaluator.evaluate()
        assert results["segm"]["AP"] == pytest.approx(100.0)
        assert results["bbox"]["AP"] == pytest.approx(100.0)
        # Another output folder (another run in this process) gets its own conversion.
        other = train_net.Trainer.build_evaluator(cfg, "fruit_edited", str(tmp_path / "other"))
        assert len(other._coco_api.anns) == before - 3
        assert (tmp_path / "other" / "fruit_edited_coco_format.json").is_file()
    finally:
        DatasetCatalog.remove("fruit_edited")
        MetadataCatalog.remove("fruit_edited")


def test_evaluation_scores_against_the_recomputed_boxes(coco_dataset, tmp_path):
    """A COCO file with a zero-size box: train_net.py's evaluator reads a copy with the box
    recomputed (as training loads it), so predictions equal to the loaded dicts score 100 box
    AP; once the file is corrected, the file itself."""
    data = _fruit_coco(("14",))
    good = data["annotations"][0]["bbox"]
    data["annotations"][0]["bbox"] = [good[0], good[1], 0.0, 0.0]
    json_file = coco_dataset(data)
    cfg = small_solov2_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    evaluator = train_net.Trainer.build_evaluator(cfg, NAME)
    assert evaluator._coco_api.anns[1]["bbox"] == pytest.approx(good)
    assert MetadataCatalog.get(NAME).json_file != json_file
    evaluator.reset()
    (record,) = DatasetCatalog.get(NAME)
    evaluator.process([record], [{"instances": _perfect_predictions(record)}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert json.loads(open(json_file).read())["annotations"][0]["bbox"][2] == 0.0  # untouched

    data["annotations"][0]["bbox"] = good
    with open(json_file, "w") as f:
        json.dump(data, f)
    evaluator = train_net.Trainer.build_evaluator(cfg, NAME)
    assert MetadataCatalog.get(NAME).json_file == json_file
    assert evaluator._coco_api.anns[1]["bbox"] == pytest.approx(good)
