"""Tests of the registration of the project's datasets (solov2_d2/data/datasets.py)."""
import solov2_d2  # noqa: F401  # isort: split

import collections
import json
import logging
import os

import pytest
from conftest import REPO, SHARED, register_shared_coco_mini

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from solov2_d2.data import register_builtin_datasets
from solov2_d2.data.datasets import DATASETS_ENV_VAR, FRUIT_CLASSES, get_datasets_root

FRUIT = ["fruit_train", "fruit_val"]
COCO_MINI = ["coco_mini_train", "coco_mini_val"]
SHARED_DATA = SHARED / "data"
requires_coco_mini = pytest.mark.skipif(
    not (SHARED_DATA / "coco_mini").is_dir(), reason=f"no coco_mini in {SHARED_DATA}"
)
# Taken before any test registers them again.
REGISTERED_ON_IMPORT = set(DatasetCatalog.list())


def _unregister():
    for name in FRUIT + COCO_MINI:
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


@pytest.fixture
def fresh_registration(monkeypatch):
    """Let a test register the datasets from nothing, without SOLOV2_DATASETS; register them back
    as the tests use them (the default root, coco_mini from the shared data) after it."""
    with monkeypatch.context() as patch:
        patch.delenv(DATASETS_ENV_VAR, raising=False)
        _unregister()
        yield patch
    _unregister()
    register_builtin_datasets()
    register_shared_coco_mini()


def _file_names(name):
    return [d["file_name"] for d in DatasetCatalog.get(name)]


def test_fruit_is_registered_on_import():
    assert set(FRUIT) <= REGISTERED_ON_IMPORT


def test_default_root_is_the_repositorys_datasets_folder(fresh_registration):
    assert get_datasets_root() == str(REPO / "datasets")
    register_builtin_datasets()
    register_builtin_datasets()  # again: registering twice must not raise
    fruit = REPO / "datasets" / "fruit"
    assert MetadataCatalog.get("fruit_val").image_root == str(fruit)
    assert _file_names("fruit_val") == [str(fruit / f"{i}.jpg") for i in range(14, 18)]
    # coco_mini may not ship with the repository: no folder, no registration.
    assert not (REPO / "datasets" / "coco_mini").exists()
    assert not set(COCO_MINI) & set(DatasetCatalog.list())


def test_fruit_ships_with_the_repository_and_loads():
    # Its licence and source travel with the photos.
    fruit = REPO / "datasets" / "fruit"
    assert "MIT" in (fruit / "LICENSE").read_text()
    assert "Tony607/labelme2coco" in (fruit / "README.md").read_text()
    assert len(list(fruit.glob("*.jpg"))) == 18

    assert MetadataCatalog.get("fruit_train").thing_classes == ["date", "fig", "hazelnut"]
    assert MetadataCatalog.get("fruit_val").evaluator_type == "coco"
    train, val = DatasetCatalog.get("fruit_train"), DatasetCatalog.get("fruit_val")
    assert [os.path.basename(d["file_name"]) for d in train] == [f"{i}.jpg" for i in range(14)]
    assert [os.path.basename(d["file_name"]) for d in val] == [f"{i}.jpg" for i in range(14, 18)]
    counts = collections.Counter(
        FRUIT_CLASSES[a["category_id"]] for d in train + val for a in d["annotations"]
    )
    assert counts == {"date": 71, "hazelnut": 53, "fig": 41}
    assert sum(len(d["annotations"]) for d in val) == 31


def test_env_var_moves_the_root(fresh_registration, tmp_path):
    os.symlink(REPO / "datasets" / "fruit", tmp_path / "fruit")
    fresh_registration.setenv(DATASETS_ENV_VAR, str(tmp_path))
    assert get_datasets_root() == str(tmp_path)
    register_builtin_datasets()
    assert MetadataCatalog.get("fruit_val").image_root == str(tmp_path / "fruit")
    assert _file_names("fruit_val") == [str(tmp_path / "fruit" / f"{i}.jpg") for i in range(14, 18)]
    assert not set(COCO_MINI) & set(DatasetCatalog.list())


def test_root_argument_comes_before_the_env_var(fresh_registration, tmp_path):
    fresh_registration.setenv(DATASETS_ENV_VAR, str(tmp_path / "elsewhere"))
    assert get_datasets_root(str(tmp_path)) == str(tmp_path)
    assert get_datasets_root("~") == os.path.expanduser("~")


@requires_coco_mini
def test_coco_mini_registers_when_the_root_has_it(fresh_registration, tmp_path):
    os.symlink(SHARED_DATA / "coco_mini", tmp_path / "coco_mini")
    register_builtin_datasets(str(tmp_path))
    coco = MetadataCatalog.get("coco_mini_val")
    assert coco.json_file == str(tmp_path / "coco_mini" / "annotations" / "instances_val2017.json")
    assert coco.evaluator_type == "coco" and len(coco.thing_classes) == 80
    dicts = DatasetCatalog.get("coco_mini_val")
    assert len(dicts) == 79
    assert sum(len(d["annotations"]) for d in dicts) == 624
    # A root without fruit still registers it, and says where the photos go when it is used.
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get("fruit_train")
    assert str(tmp_path / "fruit") in str(e.value) and DATASETS_ENV_VAR in str(e.value)


@requires_coco_mini
def test_tests_find_coco_mini_in_the_shared_data():
    json_file = SHARED_DATA / "coco_mini" / "annotations" / "instances_val2017.json"
    if os.environ.get(DATASETS_ENV_VAR) is None:
        assert MetadataCatalog.get("coco_mini_val").json_file == str(json_file)


@requires_coco_mini
def test_coco_mini_loads_with_the_checks_and_needs_no_box_fixed(caplog):
    """COCO's own boxes agree with the segmentations (those of crowd RLE masks within a pixel):
    the checked loader gives detectron2's dicts, with no box recomputed."""
    meta = MetadataCatalog.get("coco_mini_val")
    with caplog.at_level(logging.WARNING):
        dicts = DatasetCatalog.get("coco_mini_val")
    assert "recomputed" not in caplog.text and "empty bbox" not in caplog.text
    assert dicts == load_coco_json(meta.json_file, meta.image_root, "coco_mini_val")
    assert sum(a["iscrowd"] for d in dicts for a in d["annotations"]) == 5


@requires_coco_mini
def test_coco_mini_refuses_a_duplicate_image_id(fresh_registration, tmp_path):
    """The built-in registration uses the checked loader: a copy of coco_mini whose second image
    takes the id of the first is refused, naming the file and the id."""
    shared = SHARED_DATA / "coco_mini"
    os.makedirs(tmp_path / "coco_mini" / "annotations")
    for folder in ("train2017", "val2017"):
        os.symlink(shared / folder, tmp_path / "coco_mini" / folder)
    for split in ("train", "val"):
        name = f"instances_{split}2017.json"
        data = json.loads((shared / "annotations" / name).read_text())
        if split == "val":
            first, second = data["images"][:2]
            for a in data["annotations"]:
                if a["image_id"] == second["id"]:
                    a["image_id"] = first["id"]
            second["id"] = first["id"]
        (tmp_path / "coco_mini" / "annotations" / name).write_text(json.dumps(data))
    register_builtin_datasets(str(tmp_path))
    assert len(DatasetCatalog.get("coco_mini_train")) == 80
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get("coco_mini_val")
    json_file = tmp_path / "coco_mini" / "annotations" / "instances_val2017.json"
    assert f"{json_file}: image id {first['id']} is used by 2 images" in str(e.value)


def test_the_folds_of_fruit_train_split_it_without_fruit_val():
    train = {d["file_name"] for d in DatasetCatalog.get("fruit_train")}
    held_out = []
    for k in range(3):
        fold_train = [d["file_name"] for d in DatasetCatalog.get(f"fruit_fold{k}_train")]
        fold_val = [d["file_name"] for d in DatasetCatalog.get(f"fruit_fold{k}_val")]
        assert not set(fold_train) & set(fold_val)
        assert set(fold_train) | set(fold_val) == train
        assert MetadataCatalog.get(f"fruit_fold{k}_val").evaluator_type == "coco"
        held_out += fold_val
    assert sorted(held_out) == sorted(train)  # every training photo is held out once
