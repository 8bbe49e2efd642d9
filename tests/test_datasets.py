"""Tests of the registration of the project's datasets."""
import os

import pytest

import solov2_d2  # noqa: F401  (before detectron2: installs the compatibility bridge)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog

from solov2_d2.data import register_builtin_datasets
from solov2_d2.data.datasets import DATASETS_ENV_VAR, FRUIT_CLASSES, get_datasets_root

NAMES = ["fruit_train", "fruit_val", "coco_mini_train", "coco_mini_val"]
DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
requires_data = pytest.mark.skipif(
    not os.path.isdir(get_datasets_root()), reason=f"no datasets at {get_datasets_root()}"
)
# Taken before any test registers them again.
REGISTERED_ON_IMPORT = sorted(set(NAMES) & set(DatasetCatalog.list()))


def test_registered_on_import():
    # `import solov2_d2` registers them (reading no data).
    assert REGISTERED_ON_IMPORT == sorted(NAMES)


@pytest.fixture(scope="module", autouse=True)
def builtin():
    register_builtin_datasets()  # again: registering twice must not raise
    yield


def test_default_root():
    if DATASETS_ENV_VAR not in os.environ:
        assert get_datasets_root() == DATA
    assert MetadataCatalog.get("fruit_val").image_root == os.path.join(get_datasets_root(), "fruit")


def test_metadata():
    for name in NAMES:
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    assert MetadataCatalog.get("fruit_train").thing_classes == FRUIT_CLASSES
    assert FRUIT_CLASSES == ["date", "fig", "hazelnut"]
    coco = MetadataCatalog.get("coco_mini_val")
    assert coco.json_file == os.path.join(
        get_datasets_root(), "coco_mini", "annotations", "instances_val2017.json"
    )
    assert len(coco.thing_classes) == 80


@requires_data
def test_fruit_split():
    def stems(name):
        return [os.path.basename(d["file_name"]) for d in DatasetCatalog.get(name)]

    assert stems("fruit_train") == [f"{i}.jpg" for i in range(14)]
    assert stems("fruit_val") == [f"{i}.jpg" for i in range(14, 18)]


@requires_data
def test_coco_mini_val():
    dicts = DatasetCatalog.get("coco_mini_val")
    assert len(dicts) == 79
    assert sum(len(d["annotations"]) for d in dicts) == 624
    assert os.path.isfile(MetadataCatalog.get("coco_mini_val").json_file)


@pytest.fixture
def restore_builtin(monkeypatch):
    """Let a test re-register the builtin datasets; register them back as they were after it."""
    with monkeypatch.context() as patch:
        yield patch
    register_builtin_datasets()


@requires_data
def test_env_var_moves_root(restore_builtin, tmp_path):
    os.symlink(os.path.join(DATA, "fruit"), tmp_path / "fruit")  # and no coco_mini
    restore_builtin.setenv(DATASETS_ENV_VAR, str(tmp_path))
    register_builtin_datasets()
    assert MetadataCatalog.get("fruit_val").image_root == str(tmp_path / "fruit")
    files = [d["file_name"] for d in DatasetCatalog.get("fruit_val")]
    assert files == [str(tmp_path / "fruit" / f"{i}.jpg") for i in range(14, 18)]
    json_file = str(tmp_path / "coco_mini" / "annotations" / "instances_val2017.json")
    assert MetadataCatalog.get("coco_mini_val").json_file == json_file
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get("coco_mini_val")
    assert json_file in str(e.value) and DATASETS_ENV_VAR in str(e.value)


def test_missing_root_fails_on_use(restore_builtin, tmp_path):
    root = tmp_path / "nowhere"
    register_builtin_datasets(str(root))  # must not fail
    for name, path in [("fruit_train", root / "fruit"), ("coco_mini_train", root / "coco_mini")]:
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get(name)
        assert str(path) in str(e.value) and DATASETS_ENV_VAR in str(e.value)
