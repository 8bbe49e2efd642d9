"""Tests of the labelme reader: the real fruit annotations, and malformed files."""
import collections
import json
import os

import pytest
from PIL import Image

import solov2_d2  # noqa: F401  (before detectron2: installs the compatibility bridge)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, polygons_to_bitmask

from solov2_d2.data import (
    get_labelme_class_names,
    load_labelme_instances,
    register_labelme_instances,
)

FRUIT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "fruit")
requires_fruit = pytest.mark.skipif(not os.path.isdir(FRUIT), reason=f"no fruit data at {FRUIT}")

# Synthetic images: small, so writing them is instant.
WIDTH, HEIGHT = 40, 30
TRIANGLE = [[5.0, 5.0], [30.0, 5.0], [15.0, 25.0]]


@pytest.fixture(scope="module")
def fruit():
    return load_labelme_instances(FRUIT)


@requires_fruit
def test_fruit_counts(fruit):
    assert len(fruit) == 18
    classes = get_labelme_class_names(FRUIT)
    counts = collections.Counter(
        classes[a["category_id"]] for d in fruit for a in d["annotations"]
    )
    assert counts == {"date": 71, "hazelnut": 53, "fig": 41}


@requires_fruit
def test_fruit_images_and_order(fruit):
    # Natural order: 2.jpg comes before 10.jpg; image_id is the position in that order.
    assert [os.path.basename(d["file_name"]) for d in fruit] == [f"{i}.jpg" for i in range(18)]
    assert [d["image_id"] for d in fruit] == list(range(18))
    assert all(os.path.isfile(d["file_name"]) for d in fruit)
    assert {(d["width"], d["height"]) for d in fruit} == {(800, 600)}


@requires_fruit
def test_fruit_annotations_inside_image(fruit):
    for d in fruit:
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYXY_ABS and a["iscrowd"] == 0
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= d["width"] and 0 <= y0 < y1 <= d["height"]
            for polygon in a["segmentation"]:
                assert len(polygon) >= 6 and len(polygon) % 2 == 0
                assert all(0 <= x <= d["width"] for x in polygon[0::2])
                assert all(0 <= y <= d["height"] for y in polygon[1::2])


@requires_fruit
def test_fruit_class_list_is_stable():
    assert get_labelme_class_names(FRUIT) == ["date", "fig", "hazelnut"]
    # A subset without some label keeps a given class list, and its ids.
    subset = load_labelme_instances(FRUIT, ["hazelnut", "fig", "date"], files=["3", "10.json"])
    assert [d["image_id"] for d in subset] == [3, 10]
    full = load_labelme_instances(FRUIT, ["hazelnut", "fig", "date"])
    assert subset[1]["annotations"] == full[10]["annotations"]
    with pytest.raises(FileNotFoundError, match="99.json"):
        load_labelme_instances(FRUIT, files=["99"])


def _write(folder, stem="img", shapes=(), image_size=(WIDTH, HEIGHT), exif=None, **fields):
    """Write an image and its labelme JSON; `fields` override or (if None) drop JSON fields."""
    image = Image.new("RGB", image_size, (120, 80, 40))
    image.save(os.path.join(folder, stem + ".jpg"), exif=exif or Image.Exif())
    if shapes is not None:
        shapes = [{"group_id": None, "flags": {}, "shape_type": "polygon", **s} for s in shapes]
    data = {
        "version": "5.2.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": stem + ".jpg",
        "imageData": None,
        "imageHeight": HEIGHT,
        "imageWidth": WIDTH,
    }
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    with open(os.path.join(folder, stem + ".json"), "w") as f:
        json.dump(data, f)
    return os.path.join(folder, stem + ".json")


def _load_one(folder, class_names=None):
    (record,) = load_labelme_instances(str(folder), class_names)
    return record


def test_valid_polygon(tmp_path):
    _write(tmp_path, shapes=[{"label": "a", "points": TRIANGLE}])
    record = _load_one(tmp_path)
    assert record["file_name"] == str(tmp_path / "img.jpg")
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    (a,) = record["annotations"]
    assert a["segmentation"] == [[5.0, 5.0, 30.0, 5.0, 15.0, 25.0]]
    assert a["bbox"] == [5.0, 5.0, 30.0, 25.0] and a["category_id"] == 0


def test_missing_image(tmp_path):
    json_file = _write(tmp_path, shapes=[{"label": "a", "points": TRIANGLE}], imagePath="gone.png")
    with pytest.raises(FileNotFoundError) as e:
        _load_one(tmp_path)
    assert json_file in str(e.value) and str(tmp_path / "gone.png") in str(e.value)


def test_image_found_by_stem_without_image_path(tmp_path):
    _write(tmp_path, shapes=[{"label": "a", "points": TRIANGLE}], imagePath=None)
    assert _load_one(tmp_path)["file_name"] == str(tmp_path / "img.jpg")
    os.remove(tmp_path / "img.jpg")
    with pytest.raises(FileNotFoundError, match="no imagePath"):
        _load_one(tmp_path)


def test_polygon_with_two_points_is_skipped(tmp_path, caplog):
    shapes = [{"label": "a", "points": TRIANGLE[:2]}, {"label": "a", "points": TRIANGLE}]
    json_file = _write(tmp_path, shapes=shapes)
    assert len(_load_one(tmp_path)["annotations"]) == 1
    assert f"{json_file}: shapes[0]" in caplog.text and "needs 3 points" in caplog.text


def test_point_far_outside_is_skipped(tmp_path, caplog):
    json_file = _write(tmp_path, shapes=[{"label": "a", "points": TRIANGLE + [[41.5, 10.0]]}])
    assert _load_one(tmp_path)["annotations"] == []
    assert f"{json_file}: shapes[0]" in caplog.text and "(41.5, 10.0)" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_point_is_reported_as_not_finite(tmp_path, caplog, bad):
    """A NaN or infinite coordinate (json writes them as NaN, Infinity) is named as such, with
    the file, the shape index and the label, not as a point outside the image."""
    points = [TRIANGLE[0], [bad, 10.0], TRIANGLE[2]]
    shapes = [{"label": "a", "points": TRIANGLE}, {"label": "b", "points": points}]
    json_file = _write(tmp_path, shapes=shapes)
    register_labelme_instances("labelme_non_finite", str(tmp_path), ["a", "b"])
    try:
        (record,) = DatasetCatalog.get("labelme_non_finite")
    finally:
        DatasetCatalog.remove("labelme_non_finite")
        MetadataCatalog.remove("labelme_non_finite")
    assert [a["category_id"] for a in record["annotations"]] == [0]
    assert f"{json_file}: shapes[1] ('b'): skipped, point ({bad}, 10.0) is not finite" in (
        caplog.text
    )
    assert "outside" not in caplog.text


def test_point_slightly_outside_is_clipped(tmp_path, caplog):
    points = [[-0.5, 5.0], [40.5, 5.0], [15.0, 30.5]]
    _write(tmp_path, shapes=[{"label": "a", "points": points}])
    (a,) = _load_one(tmp_path)["annotations"]
    assert a["segmentation"] == [[0.0, 5.0, 40.0, 5.0, 15.0, 30.0]]
    assert a["bbox"] == [0.0, 5.0, 40.0, 30.0]
    assert caplog.text == ""


def test_degenerate_polygon_is_skipped(tmp_path, caplog):
    # Collinear after clipping: the two points below the image land on its bottom edge.
    points = [[5.0, 30.0], [10.0, 30.5], [20.0, 30.8]]
    json_file = _write(tmp_path, shapes=[{"label": "a", "points": points}])
    assert _load_one(tmp_path)["annotations"] == []
    assert f"{json_file}: shapes[0]" in caplog.text and "zero area" in caplog.text


def test_unsupported_shape_types_are_skipped(tmp_path, caplog):
    shapes = [
        {"label": "a", "points": [[10, 10], [15, 15]], "shape_type": "circle"},
        {"label": "a", "points": TRIANGLE},
        {"label": "ruler", "points": [[1, 1], [5, 5]], "shape_type": "line"},
    ]
    json_file = _write(tmp_path, shapes=shapes)
    # The label of a skipped shape is neither a class nor an error.
    assert get_labelme_class_names(str(tmp_path)) == ["a"]
    assert len(_load_one(tmp_path, ["a"])["annotations"]) == 1
    assert f"{json_file}: shapes[0]: skipped, shape type 'circle'" in caplog.text
    assert f"{json_file}: shapes[2]: skipped, shape type 'line'" in caplog.text


def test_unknown_label_with_fixed_classes(tmp_path):
    json_file = _write(tmp_path, shapes=[{"label": "kiwi", "points": TRIANGLE}])
    with pytest.raises(ValueError) as e:
        _load_one(tmp_path, ["date", "fig"])
    assert json_file in str(e.value) and "'kiwi'" in str(e.value)


def test_bad_json(tmp_path):
    json_file = tmp_path / "img.json"
    json_file.write_text('{"shapes": [')
    with pytest.raises(ValueError, match="is not a valid JSON file") as e:
        _load_one(tmp_path)
    assert str(json_file) in str(e.value)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"shapes": None}, "'shapes'"),
        ({"shapes": [{"label": "a"}]}, "shapes[0].points"),
        ({"shapes": [{"points": TRIANGLE}]}, "shapes[0].label"),
        ({"shapes": [{"label": "a", "points": [[1, 2, 3]]}]}, "shapes[0].points"),
        ({"imageWidth": "40"}, "'imageWidth'"),
    ],
)
def test_missing_or_bad_fields(tmp_path, fields, field):
    json_file = _write(tmp_path, **fields)
    with pytest.raises(ValueError) as e:
        _load_one(tmp_path)
    assert json_file in str(e.value) and field in str(e.value)


def test_size_mismatch(tmp_path):
    json_file = _write(tmp_path, image_size=(50, 30))
    with pytest.raises(ValueError) as e:
        _load_one(tmp_path, ["a"])
    message = str(e.value)
    assert json_file in message and "imageWidth=40" in message and "width 50" in message


def test_size_after_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x30, shown rotated by 90 degrees: 30 wide, 40 high
    _write(tmp_path, exif=exif, imageHeight=WIDTH, imageWidth=HEIGHT)
    record = _load_one(tmp_path, ["a"])
    assert (record["height"], record["width"]) == (WIDTH, HEIGHT)
    _write(tmp_path, exif=exif)  # the size of the stored pixels: swapped
    with pytest.raises(ValueError, match="EXIF"):
        _load_one(tmp_path, ["a"])


def test_group_id_merges_pieces(tmp_path):
    left = [[1.0, 1.0], [10.0, 1.0], [5.0, 10.0]]
    right = [[20.0, 2.0], [30.0, 2.0], [25.0, 20.0]]
    shapes = [
        {"label": "a", "points": left, "group_id": 7},
        {"label": "b", "points": TRIANGLE, "group_id": 7},  # another label: another instance
        {"label": "a", "points": right, "group_id": 7},
        {"label": "a", "points": TRIANGLE, "group_id": None},
        {"label": "a", "points": TRIANGLE, "group_id": None},  # null group_id: never merged
    ]
    _write(tmp_path, shapes=shapes)
    annotations = _load_one(tmp_path)["annotations"]
    assert [len(a["segmentation"]) for a in annotations] == [2, 1, 1, 1]
    assert [a["category_id"] for a in annotations] == [0, 1, 0, 0]
    assert annotations[0]["bbox"] == [1.0, 1.0, 30.0, 20.0]


def test_rectangle(tmp_path, caplog):
    shapes = [
        {"label": "a", "points": [[30.0, 20.0], [10.0, 5.0]], "shape_type": "rectangle"},
        {"label": "a", "points": [[10.0, 5.0]], "shape_type": "rectangle"},
    ]
    json_file = _write(tmp_path, shapes=shapes)
    (a,) = _load_one(tmp_path)["annotations"]
    assert a["segmentation"] == [[30.0, 20.0, 10.0, 20.0, 10.0, 5.0, 30.0, 5.0]]
    assert a["bbox"] == [10.0, 5.0, 30.0, 20.0]
    assert f"{json_file}: shapes[1]" in caplog.text and "needs 2 points" in caplog.text


def test_natural_order_and_files(tmp_path):
    for stem in ("10", "2", "1"):
        _write(tmp_path, stem=stem, shapes=[{"label": "a", "points": TRIANGLE}])
    records = load_labelme_instances(str(tmp_path))
    assert [os.path.basename(d["file_name"]) for d in records] == ["1.jpg", "2.jpg", "10.jpg"]
    records = load_labelme_instances(str(tmp_path), files=["10.json", "2"])
    assert [d["image_id"] for d in records] == [1, 2]


def test_self_intersecting_polygon_is_kept_by_its_pixel_area(tmp_path, caplog):
    """A bow-tie's signed areas cancel (shoelace area 0), but it covers 20,000 px²."""
    bow_tie = [[20.0, 20.0], [270.0, 180.0], [270.0, 20.0], [20.0, 180.0]]
    _write(
        tmp_path,
        shapes=[{"label": "a", "points": bow_tie}],
        image_size=(300, 200),
        imageWidth=300,
        imageHeight=200,
    )
    (a,) = _load_one(tmp_path)["annotations"]
    assert a["segmentation"] == [[c for p in bow_tie for c in p]]
    mask = polygons_to_bitmask(a["segmentation"], 200, 300)
    assert mask.sum() == pytest.approx(20_000, rel=0.02)
    assert caplog.text == ""
