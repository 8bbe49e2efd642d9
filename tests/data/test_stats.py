"""tools/dataset_stats.py (solov2_d2.data.stats): statistics of fruit_train and coco_mini, and
suggested settings that a config accepts and that give every object a level."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FRUIT_CONFIG, REPO, SHARED, small_solov2_cfg

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from solov2_d2.config import add_solov2_config, check_solov2_config
from solov2_d2.data.stats import LEVELS, SCALE_RANGES, dataset_stats, main, suggest_settings


def _sizes(records):
    """sqrt(box area) of every non-crowd instance, one annotation at a time (XYWH or XYXY)."""
    out = []
    for r in records:
        for a in r["annotations"]:
            if a.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = a["bbox"]
            if a["bbox_mode"] == 1:  # XYWH_ABS
                x1, y1 = x0 + x1, y0 + y1
            out.append(((x1 - x0) * (y1 - y0)) ** 0.5)
    return np.array(out)


def _apply(suggestions):
    cfg = small_solov2_cfg()
    for key, value in suggestions.items():
        if key != "smallest_short_side":
            cfg.merge_from_list([key, str(tuple(value) if isinstance(value, list) else value)])
    return cfg


@pytest.mark.parametrize("name", ["fruit_train", "coco_mini_train", "coco_mini_val"])
def test_statistics_count_what_the_dicts_hold(name):
    if name.startswith("coco") and name not in DatasetCatalog.list():
        pytest.skip(f"{SHARED}/data/coco_mini is not here")
    records = DatasetCatalog.get(name)
    stats = dataset_stats(records, 800, 1333)
    counts = [sum(not a.get("iscrowd", 0) for a in r["annotations"]) for r in records]
    assert stats["images"] == len(records) and stats["instances"] == sum(counts)
    assert stats["images_without_instances"] == counts.count(0)
    assert stats["instances_per_image"]["p100"] == max(counts)
    assert stats["instances_per_image"]["mean"] == pytest.approx(np.mean(counts))
    sizes = _sizes(records)
    for q in (0, 5, 50, 95, 100):
        assert stats["object_size"][f"p{q}"] == pytest.approx(np.percentile(sizes, q), rel=1e-5)
    assert sum(stats["instances_per_class"].values()) == sum(counts)
    # At the input scale: each image's objects scaled by its resize to 800 / 1333.
    scales = [min(800 / min(r["height"], r["width"]), 1333 / max(r["height"], r["width"]))
              for r, n in zip(records, counts) for _ in range(n)]  # fmt: skip
    assert stats["object_size_input"]["p50"] == pytest.approx(np.median(sizes * scales), rel=1e-5)


@pytest.mark.parametrize("name", ["fruit_train", "coco_mini_train"])
@pytest.mark.parametrize("short", [288, 800])
def test_suggestions_are_a_valid_config_giving_every_object_a_level(name, short):
    if name not in DatasetCatalog.list():
        pytest.skip(f"{SHARED}/data/coco_mini is not here")
    stats = dataset_stats(DatasetCatalog.get(name), short, short * 5 // 3)
    suggestions = suggest_settings(stats)
    cfg = _apply(suggestions)
    check_solov2_config(cfg)  # as many strides, grids and ranges as levels
    ranges = suggestions["MODEL.SOLOV2.SCALE_RANGES"]
    assert ranges[0][0] == 1 and ranges[-1][1] == 2048
    assert all(a[1] >= b[0] for a, b in zip(ranges, ranges[1:])), "no gap between levels"
    # One level per octave of object size (1st to 99th percentile over the training sizes)
    # and one more, at most five; inner ranges follow the published pattern [b/2, 2b], [b, 4b]..
    train = suggestions["INPUT.MIN_SIZE_TRAIN"]
    p1 = stats["object_size_input"]["p1"] * train[0] / short
    p99 = stats["object_size_input"]["p99"] * train[-1] / short
    levels = suggestions["MODEL.SOLOV2.INSTANCE_IN_FEATURES"]
    assert len(levels) == min(5, int(np.ceil(np.log2(p99 / p1))) + 1)
    assert levels == LEVELS[: len(levels)]
    base = ranges[0][1] // 2
    assert all(r == [base * 2**k // 2, base * 2 ** (k + 1)] for k, r in enumerate(ranges[1:-1], 1))
    assert suggestions["INPUT.MIN_SIZE_TEST"] == short
    assert suggestions["INPUT.MAX_SIZE_TRAIN"] == suggestions["INPUT.MAX_SIZE_TEST"]
    grids = suggestions["MODEL.SOLOV2.NUM_GRIDS"]
    assert grids == sorted(grids, reverse=True) and min(grids) >= 2
    if name == "coco_mini_train":  # COCO's objects need all five levels: the published ones
        assert len(levels) == 5
    if len(levels) == 5:  # more octaves than levels: the published ranges
        assert ranges == SCALE_RANGES
        assert short != 800 or grids == [40, 36, 24, 16, 12]
    else:
        assert ranges[0][1] >= p1 and ranges[-1][0] <= p99, "the objects reach every level"
    assert short in train and len(train) == 3


def test_fruit_at_its_config_size_gives_the_fruit_configs_sizes_and_levels():
    """fruit_train's objects (64..210 px in 800x600 photos) are 28..104 px over the fruit
    config's training sizes 256..320: two octaves, so three levels, centred on them with
    b = 32 (the config's ranges); 95% stay >= 24 px down to a short side of 224."""
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(FRUIT_CONFIG)
    stats = dataset_stats(DatasetCatalog.get("fruit_train"), 288, 640)
    suggestions = suggest_settings(stats)
    for key in ["MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN", "MIN_SIZE_TEST", "MAX_SIZE_TEST"]:
        value = cfg.INPUT[key]
        assert suggestions["INPUT." + key] == (list(value) if isinstance(value, tuple) else value)
    for key in ["INSTANCE_IN_FEATURES", "INSTANCE_STRIDES", "SCALE_RANGES"]:
        assert suggestions["MODEL.SOLOV2." + key] == [
            list(v) if isinstance(v, (list, tuple)) else v for v in cfg.MODEL.SOLOV2[key]
        ], key
    assert suggestions["MODEL.SOLOV2.SCALE_RANGES"] == [[1, 64], [32, 128], [64, 2048]]
    # 40, 36, 24 scaled by 288 / 800 and 48 / 32.
    assert suggestions["MODEL.SOLOV2.NUM_GRIDS"] == [22, 19, 13]
    assert suggestions["smallest_short_side"] == 224
    p5 = stats["object_size_input"]["p5"]
    assert p5 * 224 / 288 >= 24 > p5 * 192 / 288


def test_no_instances_gives_the_default_levels():
    records = [{"height": 480, "width": 640, "annotations": []}]
    stats = dataset_stats(records, 800, 1333)
    assert stats["instances"] == 0 and stats["images_without_instances"] == 1
    assert suggest_settings(stats)["MODEL.SOLOV2.INSTANCE_IN_FEATURES"] == [
        "p2", "p3", "p4", "p5", "p6"
    ]


def test_command_prints_statistics_with_the_configs_input_size(capsys):
    result = main(["--dataset", "fruit_train", "--config-file", FRUIT_CONFIG])
    out = capsys.readouterr().out
    assert "Dataset fruit_train: 14 images, 134 instances" in out
    assert "object size (input 288/640)" in out and "date: 61" in out
    assert 'MODEL.SOLOV2.INSTANCE_IN_FEATURES ["p2","p3","p4"]' in out
    assert result["stats"]["input"] == {"min_size": 288, "max_size": 640}
    main(["--dataset", "fruit_train", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["stats"]["instances"] == 134 and printed["stats"]["input"]["min_size"] == 800


def test_the_script_runs_and_names_an_unknown_dataset():
    script = str(REPO / "tools" / "dataset_stats.py")
    proc = subprocess.run(
        [sys.executable, script, "--dataset", "fruit_val"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "Dataset fruit_val: 4 images" in proc.stdout
    proc = subprocess.run(
        [sys.executable, script, "--dataset", "no_such"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "--dataset 'no_such' is not registered" in proc.stderr
