"""
Read instance annotations drawn with labelme (https://github.com/wkentaro/labelme, file format of
versions 3.x to 5.x) into dicts in "Detectron2 format", and register such folders as datasets.

A labelme folder holds one JSON file per image. Each object is outlined by a `polygon` or a
`rectangle` shape; shapes with the same label and the same non-null `group_id` are the visible
pieces of one (occluded) object and become one instance with several polygons. Other shape types
(circle, line, linestrip, point, points, mask, ...) do not outline an object in a form this reader
converts: they are skipped with a warning.

Errors in the files are never passed on as data:

* raise: an unreadable JSON file, a missing or ill-typed field, a missing image, a label outside
  the given class list, `imageHeight`/`imageWidth` that disagree with the image;
* skip the shape, with a warning: an unsupported shape type, a polygon with fewer than 3 points,
  a rectangle without exactly 2 points, a point that is not finite (NaN or infinite, which
  Python's json reads from NaN and Infinity), a point more than 1 pixel outside the image, a
  polygon that covers no pixel (judged by its rasterised area, as training rasterises it, so a
  self-intersecting polygon whose signed areas cancel is kept);
* fix silently: points at most 1 pixel outside the image (clicks on its border) are moved onto it.
"""
import json
import logging
import math
import os
import re

from PIL import Image
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["load_labelme_instances", "get_labelme_class_names", "register_labelme_instances"]

logger = logging.getLogger(__name__)

# The shape types that outline an object's area.
_AREA_SHAPE_TYPES = ("polygon", "rectangle")
# Tried in this order, beside the JSON file, when it has no `imagePath`.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# labelme lets a click on the image border land slightly outside the image.
_BORDER_TOLERANCE = 1.0
_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations that transpose or rotate by 90 degrees, i.e. swap width and height.
_EXIF_SWAPS_AXES = (5, 6, 7, 8)


def _natural_key(name):
    """Sort key that orders the numbers in a name by value ("2.json" before "10.json")."""
    parts = re.split(r"(\d+)", name)
    # Odd positions of re.split with a group are the numbers; `name` breaks ties like "01"/"1".
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def _json_files(folder, files):
    """
    List the JSON files to read as (image_id, path), in natural order of their names.

    The image_id of a file is its position among all JSON files of `folder`, so a file keeps its
    id in every subset (split) of the folder.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Labelme folder {folder} does not exist.")
    names = sorted((n for n in os.listdir(folder) if n.endswith(".json")), key=_natural_key)
    image_ids = {n: i for i, n in enumerate(names)}
    if files is not None:
        wanted = {f if f.endswith(".json") else f + ".json" for f in map(str, files)}
        missing = sorted(wanted - image_ids.keys(), key=_natural_key)
        if missing:
            raise FileNotFoundError(f"Labelme folder {folder} has no file {', '.join(missing)}.")
        names = sorted(wanted, key=_natural_key)
    if not names:
        raise FileNotFoundError(f"Labelme folder {folder} has no JSON file to read.")
    return [(image_ids[n], os.path.join(folder, n)) for n in names]


def _shape_type(shape):
    # labelme reads a missing or null shape_type (files of early 3.x versions) as a polygon.
    return shape.get("shape_type") or "polygon"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_shape(json_file, index, shape):
    """Raise ValueError naming the field if an area shape lacks what this reader needs."""
    where = f"{json_file}: shapes[{index}]"
    if not isinstance(shape, dict):
        raise ValueError(f"{where} is not a JSON object.")
    if not isinstance(shape.get("shape_type", ""), (str, type(None))):
        raise ValueError(f"{where}.shape_type must be a string.")
    if _shape_type(shape) not in _AREA_SHAPE_TYPES:
        return  # skipped when loading; its other fields do not matter
    if not isinstance(shape.get("label"), str):
        raise ValueError(f"{where}.label is missing or not a string.")
    points = shape.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(map(_is_number, p)) for p in points
    ):
        raise ValueError(f"{where}.points is missing or not a list of [x, y] numbers.")
    if not isinstance(shape.get("group_id"), (int, str, type(None))):
        raise ValueError(f"{where}.group_id must be an integer, a string or null.")


def _read_json(json_file):
    """Parse a labelme JSON file; raise ValueError naming the file and field if it is unusable."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_file} is not a valid JSON file: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise ValueError(f"{json_file}: field 'shapes' is missing or not a list.")
    for key in ("imageHeight", "imageWidth"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{json_file}: field '{key}' must be a positive integer: {value!r}")
    if not isinstance(data.get("imagePath"), (str, type(None))):
        raise ValueError(f"{json_file}: field 'imagePath' must be a string.")
    for index, shape in enumerate(data["shapes"]):
        _check_shape(json_file, index, shape)
    return data


def _labels(data):
    """The labels of the area shapes of one parsed JSON file."""
    return {s["label"] for s in data["shapes"] if _shape_type(s) in _AREA_SHAPE_TYPES}


def _check_class_names(class_names):
    class_names = list(class_names)
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be a non-empty list of unique names: {class_names}")
    return class_names


def get_labelme_class_names(folder, class_names=None, files=None):
    """
    Return the class list of a labelme dataset: `class_names` if given, else the sorted unique
    labels of the polygon and rectangle shapes in the files read. Reads the JSON files only.

    Args:
        folder, class_names, files: as in :func:`load_labelme_instances`.

    Returns:
        list[str]: the class names; category_id i is class_names[i].
    """
    if class_names is not None:
        return _check_class_names(class_names)
    return _classes_of(folder, [_read_json(f) for _, f in _json_files(folder, files)])


def _classes_of(folder, parsed_files):
    """The sorted unique labels of the area shapes in parsed JSON files."""
    labels = set().union(*map(_labels, parsed_files))
    if not labels:
        raise ValueError(f"No polygon or rectangle shape in labelme folder {folder}.")
    return sorted(labels)


def _find_image(json_file, data):
    """Path of the image annotated by a JSON file; raise FileNotFoundError naming both."""
    folder = os.path.dirname(json_file)
    if data.get("imagePath"):
        # labelme on Windows writes the relative path with backslashes.
        path = os.path.normpath(os.path.join(folder, data["imagePath"].replace("\\", "/")))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{json_file}: image {path} (from imagePath) does not exist.")
        return path
    stem = os.path.splitext(json_file)[0]
    candidates = [stem + ext for e in _IMAGE_EXTENSIONS for ext in (e, e.upper())]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{json_file} has no imagePath and no image beside it: looked for {stem}"
        f"{{{','.join(_IMAGE_EXTENSIONS)}}} (any case)."
    )


def _image_size(json_file, image_file):
    """
    Return (height, width) of an image as detectron2's `read_image` gives it, i.e. after its EXIF
    orientation. Reads the header only.
    """
    try:
        with Image.open(image_file) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
            except Exception:  # read_image also ignores unreadable EXIF data
                orientation = None
    except OSError as e:
        raise ValueError(f"{json_file}: cannot read image {image_file}: {e}") from e
    if orientation in _EXIF_SWAPS_AXES:
        width, height = height, width
    return height, width


def _check_image_size(json_file, data, image_file, height, width):
    stated = (data.get("imageHeight", height), data.get("imageWidth", width))
    if stated != (height, width):
        raise ValueError(
            f"{json_file} states imageHeight={stated[0]}, imageWidth={stated[1]}, but image "
            f"{image_file} has height {height}, width {width} (after its EXIF orientation). "
            "Swapped sizes mean the annotation tool ignored the EXIF orientation."
        )


def _pixel_area(polygon, height, width):
    """Number of pixels a flat polygon [x0, y0, x1, y1, ...] covers when rasterised the way
    detectron2 rasterises polygon masks (pycocotools)."""
    return int(mask_util.area(mask_util.frPyObjects([polygon], height, width))[0])


def _shape_to_polygon(json_file, index, shape, height, width):
    """
    Convert a polygon or rectangle shape into a flat polygon [x0, y0, x1, y1, ...] inside the
    image, or log why it cannot be used and return None.
    """
    where = f"{json_file}: shapes[{index}] ({shape['label']!r})"
    points = [tuple(p) for p in shape["points"]]
    if _shape_type(shape) == "rectangle":
        if len(points) != 2:
            logger.warning(f"{where}: skipped, a rectangle needs 2 points, it has {len(points)}.")
            return None
        (x0, y0), (x1, y1) = points
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif len(points) < 3:
        logger.warning(f"{where}: skipped, a polygon needs 3 points, it has {len(points)}.")
        return None
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            logger.warning(f"{where}: skipped, point ({x}, {y}) is not finite (NaN or infinite).")
            return None
    for x, y in points:
        tol = _BORDER_TOLERANCE
        if not (-tol <= x <= width + tol and -tol <= y <= height + tol):
            logger.warning(
                f"{where}: skipped, point ({x}, {y}) lies more than {tol:g} pixel outside the "
                f"image (width {width}, height {height})."
            )
            return None
    points = [(min(max(x, 0), width), min(max(y, 0), height)) for x, y in points]
    polygon = [float(c) for point in points for c in point]
    if _pixel_area(polygon, height, width) == 0:
        logger.warning(f"{where}: skipped, its polygon covers no pixel (zero area).")
        return None
    return polygon


def _load_file(json_file, image_id, data, category_ids):
    """Convert one parsed labelme JSON file into a dataset dict."""
    image_file = _find_image(json_file, data)
    height, width = _image_size(json_file, image_file)
    _check_image_size(json_file, data, image_file, height, width)

    # instance key -> (label, polygons); insertion order keeps the order of the shapes.
    instances = {}
    for index, shape in enumerate(data["shapes"]):
        shape_type = _shape_type(shape)
        if shape_type not in _AREA_SHAPE_TYPES:
            logger.warning(f"{json_file}: shapes[{index}]: skipped, shape type {shape_type!r}.")
            continue
        label = shape["label"]
        if label not in category_ids:
            raise ValueError(
                f"{json_file}: shapes[{index}] has label {label!r}, which is not one of the "
                f"classes {list(category_ids)}."
            )
        polygon = _shape_to_polygon(json_file, index, shape, height, width)
        if polygon is None:
            continue
        group_id = shape.get("group_id")
        key = index if group_id is None else (label, group_id)
        instances.setdefault(key, (label, []))[1].append(polygon)

    annotations = []
    for label, polygons in instances.values():
        xs = [x for polygon in polygons for x in polygon[0::2]]
        ys = [y for polygon in polygons for y in polygon[1::2]]
        annotations.append(
            {
                "bbox": [min(xs), min(ys), max(xs), max(ys)],
                "bbox_mode": BoxMode.XYXY_ABS,
                "segmentation": polygons,
                "category_id": category_ids[label],
                "iscrowd": 0,
            }
        )
    return {
        "file_name": image_file,
        "height": height,
        "width": width,
        "image_id": image_id,
        "annotations": annotations,
    }


def load_labelme_instances(folder, class_names=None, files=None):
    """
    Load a folder of labelme JSON files as instance segmentation dataset dicts.

    Args:
        folder (str): directory with the labelme JSON files (not its subdirectories). Each file's
            image is at its `imagePath`, relative to `folder`; a file without `imagePath` uses
            the image beside it with the same name and a common image extension.
        class_names (list[str] or None): the classes, in the order of their category ids. A label
            outside it is an error. None: the sorted unique labels of the files read, see
            :func:`get_labelme_class_names`.
        files (iterable[str] or None): the JSON files of `folder` to read, by name or stem
            ("3.json" or "3"); None reads all of them.

    Returns:
        list[dict]: dataset dicts in natural order of the file names ("2.json" before "10.json").
        `height` and `width` are the image's (after EXIF orientation); `image_id` is the
        position of the file among all JSON files of `folder`; each annotation has a
        `bbox` in XYXY_ABS mode, `segmentation` (a list of flat polygons), `category_id`
        and `iscrowd` (always 0). The images are not read, only their headers.
    """
    json_files = _json_files(folder, files)
    parsed = [_read_json(f) for _, f in json_files]
    if class_names is None:
        class_names = _classes_of(folder, parsed)
    category_ids = {name: i for i, name in enumerate(_check_class_names(class_names))}
    dataset_dicts = [
        _load_file(f, image_id, data, category_ids)
        for (image_id, f), data in zip(json_files, parsed)
    ]
    num_instances = sum(len(d["annotations"]) for d in dataset_dicts)
    logger.info(f"Loaded {len(dataset_dicts)} images, {num_instances} instances from {folder}.")
    return dataset_dicts


def register_labelme_instances(name, folder, class_names=None, files=None):
    """
    Register a labelme folder as an instance segmentation dataset.

    The dataset is loaded when it is first used. Its class list is fixed now, from
    `class_names` or else from the labels in the JSON files (images are not read), and set as
    the `thing_classes` metadata with `image_root` and `evaluator_type` "coco".

    Args:
        name (str): the dataset name, e.g. "fruit_train".
        folder, class_names, files: as in :func:`load_labelme_instances`.
    """
    thing_classes = get_labelme_class_names(folder, class_names, files)
    if files is not None:
        files = list(files)  # the caller's iterable may be consumed or changed later
    DatasetCatalog.register(name, lambda: load_labelme_instances(folder, thing_classes, files))
    MetadataCatalog.get(name).set(
        thing_classes=thing_classes, evaluator_type="coco", image_root=folder
    )
