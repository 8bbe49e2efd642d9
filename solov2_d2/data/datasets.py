"""
Register the datasets of this project, found under one root folder:

* "fruit_train", "fruit_val": `<root>/fruit`, 18 labelme-annotated photos of dates, figs and
  hazelnuts, split by file: train = 0..13, val = 14..17 (fixed, so results stay comparable).
* "fruit_fold{k}_train", "fruit_fold{k}_val" for k = 0, 1, 2: three folds of fruit_train alone
  (val = photos 0..4, 5..9, 10..13; train = the rest), for choosing a recipe without looking
  at fruit_val.
* "coco_mini_train", "coco_mini_val": `<root>/coco_mini`, a COCO 2017 subset in COCO's own format,
  evaluated against its official json file; registered only when that folder exists, as it may
  not be redistributed with the repository. It loads with the checks of
  :func:`solov2_d2.data.coco.load_coco_instances` (duplicate ids refused, empty or inconsistent
  boxes recomputed from the segmentation).

The root is the `root` argument, else the environment variable SOLOV2_DATASETS, else
`<repo>/datasets`, where `<repo>` is the folder that holds the `solov2_d2` package (the fruit
photos ship there). Registration reads no annotations; a dataset whose files are missing raises
when it is used.
"""
import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from .coco import register_coco_instances
from .labelme import register_labelme_instances

__all__ = [
    "DATASETS_ENV_VAR",
    "FRUIT_CLASSES",
    "get_datasets_root",
    "register_builtin_datasets",
    "register_coco_mini",
]

DATASETS_ENV_VAR = "SOLOV2_DATASETS"

_DEFAULT_ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "datasets"
)

# Fixed, so category ids (and trained models) do not depend on which files are read. It is the
# alphabetical order, which is also what labelme loading gives without a class list.
FRUIT_CLASSES = ["date", "fig", "hazelnut"]

_FRUIT_SPLITS = {
    "fruit_train": [str(i) for i in range(0, 14)],
    "fruit_val": [str(i) for i in range(14, 18)],
}
for _k, _held in enumerate((range(0, 5), range(5, 10), range(10, 14))):
    _FRUIT_SPLITS[f"fruit_fold{_k}_val"] = [str(i) for i in _held]
    _FRUIT_SPLITS[f"fruit_fold{_k}_train"] = [str(i) for i in range(14) if i not in _held]

_COCO_MINI_SPLITS = {
    "coco_mini_train": ("coco_mini/train2017", "coco_mini/annotations/instances_train2017.json"),
    "coco_mini_val": ("coco_mini/val2017", "coco_mini/annotations/instances_val2017.json"),
}


def get_datasets_root(root=None):
    """
    Return the absolute path of the datasets root: `root` if given, else the environment variable
    SOLOV2_DATASETS if set, else `<repo>/datasets`.
    """
    if root is None:
        root = os.environ.get(DATASETS_ENV_VAR) or _DEFAULT_ROOT
    return os.path.abspath(os.path.expanduser(root))


def _load_if_present(name, paths, load):
    """Run `load` if all `paths` exist, else raise an error that tells where the data goes."""
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Dataset '{name}' needs {path}, which does not exist. Put the datasets there, "
                f"or set the environment variable {DATASETS_ENV_VAR} to the folder that holds "
                "them before importing solov2_d2, or call "
                "solov2_d2.data.register_builtin_datasets(root)."
            )
    return load()


def _register(name, paths, register, *args):
    """
    Register dataset `name` with `register(name, *args)`, replacing an earlier registration so
    that registering again (e.g. with another root) does not raise. Its loader first checks that
    `paths` exist.
    """
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)
    register(name, *args)
    load = DatasetCatalog.pop(name)
    DatasetCatalog.register(name, functools.partial(_load_if_present, name, paths, load))


def register_coco_mini(root):
    """Register coco_mini_train and coco_mini_val from `<root>/coco_mini`."""
    for name, (image_root, json_file) in _COCO_MINI_SPLITS.items():
        image_root, json_file = os.path.join(root, image_root), os.path.join(root, json_file)
        # The subset keeps all 80 COCO categories, so COCO's metadata (classes, id map, colors)
        # is known now, without reading the json file.
        metadata = _get_builtin_metadata("coco")
        _register(
            name, [json_file, image_root], register_coco_instances, metadata, json_file, image_root
        )


def register_builtin_datasets(root=None):
    """
    Register fruit_train, fruit_val and the folds of fruit_train under the datasets root (see
    :func:`get_datasets_root`), and coco_mini_train and coco_mini_val when the root has a
    coco_mini folder. Calling it again re-registers them.

    Args:
        root (str or None): the folder holding fruit/ (and coco_mini/).
    """
    root = get_datasets_root(root)
    fruit = os.path.join(root, "fruit")
    for name, files in _FRUIT_SPLITS.items():
        _register(name, [fruit], register_labelme_instances, fruit, FRUIT_CLASSES, files)
    if os.path.isdir(os.path.join(root, "coco_mini")):
        register_coco_mini(root)
