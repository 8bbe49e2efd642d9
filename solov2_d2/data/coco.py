"""
Load COCO-format instance annotations (a json file in COCO's format, images in a folder) with
the checks detectron2's `load_coco_json` leaves out, and register such datasets.

Detectron2 trusts the file, and some of its errors are lost silently: two images with the same
`id` become one (pycocotools keeps the last, and the annotations of both train on it); two
annotations with the same `id` become one ground truth object when evaluating; an annotation whose
`bbox` has zero size is dropped by the mapper's empty-box filter although its polygon is valid, so
its object trains as background. Here:

* raise ValueError naming the file and the id: two images with the same `id`, two annotations
  with the same `id`, an annotation without `segmentation` (missing, null or empty: SOLOv2 learns
  a mask for each object, and detectron2 would fail later with an unclear message), a `bbox` that
  is not a list of 4 numbers, a polygon coordinate that is not a finite number;
* fix, with one warning giving the count and the first annotation ids: a `bbox` that is empty
  (width or height not positive), not finite, or more than 1 pixel away from the box of the
  annotation's segmentation on some side, is replaced by the segmentation's box. A segmentation
  that covers no area gives an empty box too: such annotations are listed in a warning and left
  to detectron2's empty-box filter.

Everything else is detectron2's `load_coco_json` (category id mapping, `thing_classes` metadata,
its warnings). The json file is parsed once more for these checks.

Datasets registered with detectron2's own `register_coco_instances` (e.g. by a user) are switched
to this loader by :func:`check_coco_datasets`, which train_net.py calls on the datasets it uses.

Datasets without a json file (e.g. labelme folders) are evaluated by detectron2's COCOEvaluator
on a COCO conversion of their dicts, which detectron2 caches in the output folder and reuses even
after the annotations changed; :func:`refresh_coco_json` converts them again before each
evaluation. A json file with boxes that loading recomputes would score box AP against the bad
boxes: :func:`refresh_coco_json` gives the evaluator a copy with them recomputed.
"""
import collections
import json
import logging
import math
import numbers
import os
import shutil

from iopath.common.file_io import file_lock
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json, load_coco_json
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

__all__ = [
    "check_coco_datasets",
    "check_coco_json",
    "load_coco_instances",
    "refresh_coco_json",
    "register_coco_instances",
]

logger = logging.getLogger(__name__)

# A bbox further than this (pixels) from its segmentation's box on some side is replaced by it.
# Boxes of RLE masks are whole pixels, so COCO's own boxes of crowd regions differ by up to 1.
BOX_TOLERANCE = 1.0
# How many annotation ids a warning lists.
_SHOWN_IDS = 10
# Metadata key set on datasets whose `json_file` was written by refresh_coco_json: the dataset's
# own json file, or "" for a conversion of its dataset dicts.
_SOURCE_KEY = "json_file_source"
# Dataset name -> json file, of the datasets register_coco_instances registered.
_REGISTERED = {}


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first_duplicate(ids):
    """The first value of `ids` that occurs more than once, and its count; (None, 0) if none."""
    counts = collections.Counter(ids)
    for value in ids:
        if counts[value] > 1:
            return value, counts[value]
    return None, 0


def _check_segmentation(json_file, ann):
    """Raise ValueError naming the annotation if its segmentation is missing or not finite."""
    where = f"{json_file}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"
    segm = ann.get("segmentation")
    if not segm:
        raise ValueError(
            f"{where} has no segmentation (value {segm!r}): SOLOv2 learns a mask for each "
            "object. Give it a polygon or RLE segmentation, or delete the annotation."
        )
    if isinstance(segm, dict):
        return  # RLE: pycocotools checks it when decoding
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict.")
    for index, polygon in enumerate(segm):
        if not all(map(_is_number, polygon)):
            raise ValueError(f"{where}: segmentation[{index}] holds a value that is not a number.")
        # The sum of finite coordinates is finite; a NaN or an inf makes it NaN or inf.
        if not math.isfinite(sum(polygon)):
            raise ValueError(
                f"{where}: segmentation[{index}] holds a non-finite coordinate (NaN or inf)."
            )


def check_coco_json(json_file, data=None):
    """
    Raise ValueError, naming `json_file` and the id, if a COCO instances file has two images with
    the same id, two annotations with the same id, an annotation without segmentation, a bbox
    that is not [x, y, width, height] numbers, or a non-finite polygon coordinate.

    Args:
        json_file (str): the file (read unless `data` is given; named in the messages).
        data (dict or None): its parsed content.
    """
    if data is None:
        with PathManager.open(json_file) as f:
            data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file}: field 'images' is missing or not a list.")
    images, annotations = data["images"], data.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{json_file}: field 'annotations' is not a list.")
    for field, entries in (("images", images), ("annotations", annotations)):
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{json_file}: {field}[{index}] is not a JSON object: {entry!r}")

    image_id, count = _first_duplicate([image.get("id") for image in images])
    if count:
        names = [str(image.get("file_name")) for image in images if image.get("id") == image_id]
        raise ValueError(
            f"{json_file}: image id {image_id!r} is used by {count} images ({', '.join(names)}): "
            "image ids must be unique, else one image disappears and its annotations are put on "
            "the other."
        )
    ann_id, count = _first_duplicate([ann.get("id") for ann in annotations])
    if count:
        image_ids = [ann.get("image_id") for ann in annotations if ann.get("id") == ann_id]
        raise ValueError(
            f"{json_file}: annotation id {ann_id!r} is used by {count} annotations (of image "
            f"ids {image_ids}): annotation ids must be unique, else evaluation keeps only one."
        )
    for ann in annotations:
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise ValueError(
                f"{json_file}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"
                f" has bbox {bbox!r}, which is not [x, y, width, height] numbers."
            )
        _check_segmentation(json_file, ann)


def _segmentation_box(segm):
    """XYXY box of a polygon list or an RLE dict (as load_coco_json leaves them)."""
    if isinstance(segm, dict):
        x, y, w, h = mask_util.toBbox(segm).tolist()
        return [x, y, x + w, y + h]
    xs = [x for polygon in segm for x in polygon[0::2]]
    ys = [y for polygon in segm for y in polygon[1::2]]
    return [min(xs), min(ys), max(xs), max(ys)]


def _is_empty(box):
    """Whether an XYXY box has no positive width or height (or is not finite)."""
    return not (all(map(math.isfinite, box)) and box[2] > box[0] and box[3] > box[1])


def _box_fixes(annotations):
    """
    The boxes to replace among `annotations`, an iterable of (id, bbox in XYWH_ABS, segmentation
    as load_coco_json leaves it).

    Returns:
        dict, list, list, list: {id: the segmentation's box in XYWH_ABS} of the boxes to replace;
        the ids of those that are empty, of those that are more than BOX_TOLERANCE off; the ids of
        empty boxes whose segmentation covers no area either (kept).
    """
    fixes, empty, off, uncovered = {}, [], [], []
    for ann_id, bbox, segm in annotations:
        box = BoxMode.convert(list(bbox), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        segm_box = _segmentation_box(segm)
        if _is_empty(segm_box):
            if _is_empty(box):
                uncovered.append(ann_id)
            continue
        if _is_empty(box):
            empty.append(ann_id)
        elif max(abs(a - b) for a, b in zip(box, segm_box)) > BOX_TOLERANCE:
            off.append(ann_id)
        else:
            continue
        fixes[ann_id] = BoxMode.convert(segm_box, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    return fixes, empty, off, uncovered


def _ids(ids):
    more = ", ..." if len(ids) > _SHOWN_IDS else ""
    return ", ".join(map(str, ids[:_SHOWN_IDS])) + more


def _fix_boxes(json_file, dataset_dicts):
    """Replace the boxes of `dataset_dicts` (from load_coco_json, each annotation with its COCO
    `id`, which this removes) that are empty or disagree with their segmentation by the
    segmentation's box, and log what was done."""
    annotations = [ann for record in dataset_dicts for ann in record["annotations"]]
    for ann in annotations:
        if ann["bbox_mode"] != BoxMode.XYWH_ABS:  # load_coco_json's mode
            raise ValueError(f"Expected XYWH_ABS boxes from load_coco_json: {ann['bbox_mode']}")
    ids = [ann.pop("id") for ann in annotations]
    fixes, empty, off, uncovered = _box_fixes(
        (i, ann["bbox"], ann["segmentation"]) for i, ann in zip(ids, annotations)
    )
    for ann_id, ann in zip(ids, annotations):
        if ann_id in fixes:
            ann["bbox"] = fixes[ann_id]
    if fixes:
        logger.warning(
            f"{json_file}: recomputed the bbox of {len(fixes)} annotations from their "
            f"segmentation: {len(empty)} empty (zero or negative width or height, or not "
            f"finite), {len(off)} more than {BOX_TOLERANCE:g} pixel away from it. Annotation "
            f"ids: {_ids(empty + off)}."
        )
    if uncovered:
        logger.warning(
            f"{json_file}: {len(uncovered)} annotations have an empty bbox and a segmentation "
            "that covers no area either; detectron2's empty-box filter drops them. Annotation "
            f"ids: {_ids(uncovered)}."
        )


def _loaded_segmentation(segm):
    """A segmentation of a COCO file as load_coco_json leaves it: polygons of fewer than 3
    points removed (None if none is left), RLE with uncompressed counts compressed."""
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):
            return mask_util.frPyObjects(segm, *segm["size"])
        return segm
    segm = [polygon for polygon in segm if len(polygon) % 2 == 0 and len(polygon) >= 6]
    return segm or None


def load_coco_instances(json_file, image_root, dataset_name=None):
    """
    Detectron2's `load_coco_json` (same arguments and result, the metadata it sets), after the
    checks of :func:`check_coco_json`, and with the boxes that are empty or inconsistent with
    their segmentation recomputed from it (see the module's documentation).

    Args:
        json_file (str): a json file in COCO's instances format.
        image_root (str): the folder of its images.
        dataset_name (str or None): the registered name; see `load_coco_json`.

    Returns:
        list[dict]: dataset dicts; boxes in XYWH_ABS mode.
    """
    check_coco_json(json_file)
    dataset_dicts = load_coco_json(
        json_file, image_root, dataset_name, extra_annotation_keys=["id"]
    )
    _fix_boxes(json_file, dataset_dicts)
    return dataset_dicts


def register_coco_instances(name, metadata, json_file, image_root):
    """
    Detectron2's `register_coco_instances` (same arguments and metadata: `json_file`,
    `image_root`, `evaluator_type` "coco"), loading with :func:`load_coco_instances`.

    Args:
        name (str): the dataset name, e.g. "coco_mini_val".
        metadata (dict): more metadata to set, e.g. `thing_classes`.
        json_file (str): a json file in COCO's instances format.
        image_root (str): the folder of its images.
    """
    if not isinstance(name, str):
        raise TypeError(f"Dataset name must be a string: {name!r}")
    for key, value in (("json_file", json_file), ("image_root", image_root)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"Dataset {name!r}: {key} must be a path: {value!r}")
    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )
    _REGISTERED[name] = json_file


def _is_detectron2_coco_loader(loader):
    """Whether `loader` is the function detectron2's register_coco_instances registers."""
    return (
        getattr(loader, "__module__", None) == "detectron2.data.datasets.coco"
        and getattr(loader, "__qualname__", "") == "register_coco_instances.<locals>.<lambda>"
    )


def check_coco_datasets(names):
    """
    Give the COCO-format datasets among `names` this module's checks.

    A dataset registered with detectron2's `register_coco_instances` is registered again with
    :func:`load_coco_instances` (same json file, image root and metadata), so that it is checked
    and its boxes fixed when loaded. Another dataset whose metadata has a `json_file` and
    `evaluator_type` "coco" (its own loader) has the json file checked now with
    :func:`check_coco_json`. Other datasets, and those registered by this module, pass.

    Args:
        names (iterable[str]): registered dataset names.
    """
    for name in names:
        metadata = MetadataCatalog.get(name)
        json_file = metadata.get(_SOURCE_KEY, metadata.get("json_file"))
        if not json_file:  # none, or a conversion of the dataset dicts
            continue
        if _is_detectron2_coco_loader(DatasetCatalog.data.get(name)):
            image_root = metadata.image_root
            DatasetCatalog.remove(name)
            DatasetCatalog.register(
                name, lambda j=json_file, r=image_root, n=name: load_coco_instances(j, r, n)
            )
            _REGISTERED[name] = json_file
            logger.info(f"Dataset {name!r} ({json_file}) is loaded with solov2_d2's checks.")
        elif metadata.get("evaluator_type") == "coco" and _REGISTERED.get(name) != json_file:
            check_coco_json(json_file)


def _write_fixed_boxes(json_file, output_path):
    """
    Write a copy of the COCO file `json_file` whose boxes that are empty or inconsistent with
    their segmentation are replaced as load_coco_instances replaces them, to `output_path`, and
    return that path; return `json_file` if no box needs replacing (nothing is written).
    """
    with PathManager.open(json_file) as f:
        data = json.load(f)
    check_coco_json(json_file, data)
    annotations = data.get("annotations", [])
    segms = [_loaded_segmentation(ann["segmentation"]) for ann in annotations]
    fixes = _box_fixes(
        (i, ann["bbox"], segm) for i, (ann, segm) in enumerate(zip(annotations, segms)) if segm
    )[0]
    if not fixes:
        return json_file
    for index, box in fixes.items():
        annotations[index]["bbox"] = box
    PathManager.mkdirs(os.path.dirname(output_path))
    with file_lock(output_path):
        with PathManager.open(output_path + ".tmp", "w") as f:
            json.dump(data, f)
        shutil.move(output_path + ".tmp", output_path)
    logger.info(
        f"Evaluating against {output_path}: {json_file} with the {len(fixes)} boxes recomputed "
        "from their segmentation as when loading."
    )
    return output_path


def _set_json_file(metadata, json_file, source):
    """Set the metadata's json_file, and _SOURCE_KEY to `source` unless it is `json_file`.
    Metadata refuses to change a value: the old ones are deleted first."""
    for key in ("json_file", _SOURCE_KEY):
        if metadata.get(key) is not None:
            delattr(metadata, key)
    metadata.json_file = json_file
    if source != json_file:
        setattr(metadata, _SOURCE_KEY, source)


def refresh_coco_json(dataset_name, output_dir):
    """
    Make the ground truth detectron2's COCOEvaluator will read for `dataset_name` current, and
    return its path. Call it before creating the evaluator.

    COCOEvaluator reads the metadata's `json_file`. A dataset without one (e.g. a labelme
    folder) it converts into `<output_dir>/<dataset_name>_coco_format.json`, a cache it then
    reuses even after the dataset's annotations were edited (and records as the dataset's
    `json_file` for the rest of the process). Here such a dataset is converted again, now, into
    that file. A dataset registered with its own json file is evaluated against it, unless some
    of its boxes are empty or inconsistent with their segmentation: then against a copy with
    those boxes recomputed, as :func:`load_coco_instances` recomputes them for training,
    `<output_dir>/<dataset_name>_fixed_boxes.json`. The file is recorded as the metadata's
    `json_file` (the dataset's own file, if any, as `json_file_source`).

    Args:
        dataset_name (str): a registered dataset with `thing_classes` metadata.
        output_dir (str): the evaluator's output folder.

    Returns:
        str: the json file the evaluator will read.
    """
    metadata = MetadataCatalog.get(dataset_name)
    source = metadata.get(_SOURCE_KEY, metadata.get("json_file"))
    if source:
        fixed = os.path.join(output_dir, f"{dataset_name}_fixed_boxes.json")
        path = _write_fixed_boxes(source, fixed)
    else:
        path = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
        convert_to_coco_json(dataset_name, path, allow_cached=False)
        source = ""
    _set_json_file(metadata, path, source)
    return path
