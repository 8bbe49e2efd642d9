"""
Object-size and instances-per-image statistics of a registered dataset, and the SOLOv2 settings
they suggest (input sizes, FPN levels, SCALE_RANGES, NUM_GRIDS)::

    python tools/dataset_stats.py --dataset fruit_train [--config-file FILE] [--json]
    python -m solov2_d2.data.stats --dataset coco_mini_train --datasets-root ../shared/data

Object size is sqrt(box area), as SOLOv2 assigns instances to levels by it; sizes are given in
the images' own pixels and at the training input scale (the resize of ``INPUT.MIN_SIZE_TEST`` /
``INPUT.MAX_SIZE_TEST``, the config's or detectron2's defaults).

The suggestions (heuristics, to start tuning from; see docs/training_recipe.md):

* input sizes: the config's ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; ``MIN_SIZE_TRAIN`` jitters the
  short side by about +-10% in steps of 32 (``MAX_SIZE_TRAIN`` as at test time);
  ``smallest_short_side`` is the smallest short side (a multiple of 32) that keeps 95% of the
  objects at least ``MIN_OBJECT_SIZE`` (24) input pixels wide: the cheapest input (for a CPU),
  or, when larger than the config's, a sign that small objects are too small there;
* levels: SOLOv2's scale ranges follow one pattern, level k holding objects of size
  [b * 2^(k-1), b * 2^(k+1)] (the published b = 48: [1, 96], [48, 192], ... [384, 2048], the
  first starting at 1 and the last ending at 2048 so that no object is left out). The objects
  between the 1st and 99th percentile of size, over the training sizes, span log2(p99 / p1)
  octaves; they get one level per octave and one more (at most the five of P2..P6), with b
  placed so that the levels' centres (b * 2^k) sit around the objects' geometric mean size
  (rounded to a multiple of 16). Objects that need all five levels get the published ranges;
* NUM_GRIDS: the published grids of an 800-pixel short side ([40, 36, 24, 16, 12]) scaled so that
  an object at the centre of each level spans as many grid cells as with the published b and
  grids: by the input short side / 800 and by 48 / b; at least 2. For fruit_train they come out
  as 22/19/13, the fruit config's hand-chosen ones being 24/20/12; over three seeds the two
  differ by less than the seeds' spread (docs/training_recipe.md).
"""
import argparse
import json
import math
import sys
from typing import Dict, List, Optional

import numpy as np

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["dataset_stats", "main", "suggest_settings"]

# SOLOv2's levels (detectron2 names, strides of the kernel branch, scale ranges, grids of an
# 800-pixel short side): configs/Base-SOLOv2.yaml and add_solov2_config. The ranges are
# _scale_ranges(PUBLISHED_BASE, 5).
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
STRIDES = [8, 8, 16, 32, 32]
SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
NUM_GRIDS = [40, 36, 24, 16, 12]
PUBLISHED_BASE = 48
REFERENCE_SHORT_SIDE = 800
TRAIN_SIZE_JITTER = 0.1
MIN_OBJECT_SIZE = 24
PERCENTILES = [0, 1, 5, 25, 50, 75, 95, 99, 100]


def _summary(values: np.ndarray) -> Dict[str, float]:
    """Mean and PERCENTILES ("p0" is the minimum, "p100" the maximum) of `values`."""
    if not len(values):
        return {}
    out = {"mean": float(values.mean())}
    out.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    return out


def _input_scales(heights: np.ndarray, widths: np.ndarray, short: int, max_size: int):
    """The scale of detectron2's ResizeShortestEdge(short, max_size) per image (float64)."""
    low, high = np.minimum(heights, widths), np.maximum(heights, widths)
    scale = short / low
    return np.where(high * scale > max_size, max_size / high, scale)


def dataset_stats(dataset_dicts: List[dict], min_size: int, max_size: int) -> dict:
    """Statistics of detectron2 dataset dicts (crowd annotations left out).

    Args:
        dataset_dicts: with "height", "width" and "annotations" ("bbox", "bbox_mode",
            "category_id").
        min_size, max_size: the input resize (short side, limit of the long side).
    Returns:
        a dict: "images", "instances", "images_without_instances", "instances_per_image",
        "object_size" and "object_size_input" (sqrt(box area) in image / input pixels),
        "image_short_side", "image_long_side" (summaries: mean and percentiles),
        "instances_per_class" ({category_id: count}), "input" (min_size, max_size).
    """
    heights = np.array([d["height"] for d in dataset_dicts], dtype=np.float64)
    widths = np.array([d["width"] for d in dataset_dicts], dtype=np.float64)
    annos = [
        [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)] for d in dataset_dicts
    ]
    counts = np.array([len(a) for a in annos], dtype=np.int64)
    flat = [a for image in annos for a in image]
    boxes = np.array(
        [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in flat],
        dtype=np.float64,
    ).reshape(-1, 4)
    extents = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    sizes = np.sqrt(extents[:, 0] * extents[:, 1])
    scales = _input_scales(heights, widths, min_size, max_size)
    classes, per_class = np.unique([a["category_id"] for a in flat], return_counts=True)
    return {
        "images": len(dataset_dicts),
        "instances": int(counts.sum()),
        "images_without_instances": int((counts == 0).sum()),
        "instances_per_image": _summary(counts.astype(np.float64)),
        "object_size": _summary(sizes),
        "object_size_input": _summary(sizes * np.repeat(scales, counts)),
        "image_short_side": _summary(np.minimum(heights, widths)),
        "image_long_side": _summary(np.maximum(heights, widths)),
        "instances_per_class": {int(c): int(n) for c, n in zip(classes, per_class)},
        "input": {"min_size": int(min_size), "max_size": int(max_size)},
    }


def _round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def _scale_ranges(base: int, num_levels: int) -> List[List[int]]:
    """[b * 2^(k-1), b * 2^(k+1)] for k < num_levels, the first from 1, the last to 2048."""
    ranges = [[base * 2**k // 2, base * 2 ** (k + 1)] for k in range(num_levels)]
    ranges[0][0], ranges[-1][1] = 1, 2048
    return ranges


def _levels_for(low: float, high: float):
    """(number of levels, b) for objects of sizes in [low, high] input pixels."""
    octaves = math.log2(max(high, 1e-6) / max(low, 1e-6))
    num_levels = min(len(LEVELS), max(1, math.ceil(octaves) + 1))
    if num_levels == len(LEVELS):
        return num_levels, PUBLISHED_BASE
    centre = math.sqrt(max(low, 1e-6) * max(high, 1e-6)) / 2 ** ((num_levels - 1) / 2)
    return num_levels, max(16, 16 * int(round(centre / 16)))


def suggest_settings(stats: dict) -> dict:
    """Config keys suggested by :func:`dataset_stats`'s result (see the module's docstring):
    {"INPUT.MIN_SIZE_TRAIN": [...], "INPUT.MIN_SIZE_TEST": int, "INPUT.MAX_SIZE_TRAIN": int,
    "INPUT.MAX_SIZE_TEST": int, "MODEL.SOLOV2.INSTANCE_IN_FEATURES": [...],
    "MODEL.SOLOV2.INSTANCE_STRIDES": [...], "MODEL.SOLOV2.SCALE_RANGES": [[low, high], ...],
    "MODEL.SOLOV2.NUM_GRIDS": [...], "smallest_short_side": int}; levels and grids are for the
    input of `stats` ("input")."""
    short, max_size = stats["input"]["min_size"], stats["input"]["max_size"]
    jitter = (1 - TRAIN_SIZE_JITTER, 1, 1 + TRAIN_SIZE_JITTER)
    train_sizes = sorted({_round32(short * f) for f in jitter})
    sizes = stats["object_size_input"]
    if sizes:  # the objects' sizes over the training sizes
        low, high = sizes["p1"] * train_sizes[0] / short, sizes["p99"] * train_sizes[-1] / short
        num_levels, base = _levels_for(low, high)
        smallest = 32 * math.ceil(short * MIN_OBJECT_SIZE / max(sizes["p5"], 1e-6) / 32)
    else:  # no instances: the default levels
        (num_levels, base), smallest = (len(LEVELS), PUBLISHED_BASE), short
    grids = [
        max(2, int(round(NUM_GRIDS[k] * short / REFERENCE_SHORT_SIDE * PUBLISHED_BASE / base)))
        for k in range(num_levels)
    ]
    return {
        "INPUT.MIN_SIZE_TRAIN": train_sizes,
        "INPUT.MAX_SIZE_TRAIN": int(max_size),
        "INPUT.MIN_SIZE_TEST": int(short),
        "INPUT.MAX_SIZE_TEST": int(max_size),
        "MODEL.SOLOV2.INSTANCE_IN_FEATURES": LEVELS[:num_levels],
        "MODEL.SOLOV2.INSTANCE_STRIDES": STRIDES[:num_levels],
        "MODEL.SOLOV2.SCALE_RANGES": _scale_ranges(base, num_levels),
        "MODEL.SOLOV2.NUM_GRIDS": grids,
        "smallest_short_side": int(smallest),
    }


def _format(name: str, stats: dict, suggestions: dict, class_names=None) -> str:
    def row(title, summary):
        if not summary:
            return f"  {title:<28} -"
        cells = " ".join(f"{k}={summary[k]:.4g}" for k in ["p0", "p5", "p50", "p95", "p100"])
        return f"  {title:<28} mean={summary['mean']:.4g} {cells}"

    inp = stats["input"]
    per_class = [
        f"{class_names[c] if class_names and c < len(class_names) else c}: {n}"
        for c, n in sorted(stats["instances_per_class"].items(), key=lambda cn: -cn[1])
    ]
    lines = [
        f"Dataset {name}: {stats['images']} images, {stats['instances']} instances "
        f"({stats['images_without_instances']} images without any)",
        row("instances per image", stats["instances_per_image"]),
        row("image short side (px)", stats["image_short_side"]),
        row("image long side (px)", stats["image_long_side"]),
        row("object size (image px)", stats["object_size"]),
        row(f"object size (input {inp['min_size']}/{inp['max_size']})",
            stats["object_size_input"]),
        "  instances per class: " + ", ".join(per_class[:20]) + (", ..." * (len(per_class) > 20)),
        "",
        "Suggested settings (a starting point; object size = sqrt(box area)):",
    ]  # fmt: skip
    for key, value in suggestions.items():
        if key != "smallest_short_side":
            lines.append(f"  {key} {json.dumps(value).replace(' ', '')}")
    lines.append(
        f"  smallest input short side keeping 95% of the objects >= {MIN_OBJECT_SIZE} px: "
        f"{suggestions['smallest_short_side']} (levels and grids above are for "
        f"{inp['min_size']})"
    )
    return "\n".join(lines)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--dataset", required=True, help="a registered dataset, e.g. fruit_train")
    parser.add_argument(
        "--config-file",
        "--config",
        default="",
        help="a config whose INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST give the input scale "
        "(default: detectron2's, 800 / 1333)",
    )
    parser.add_argument(
        "--datasets-root", default=None, help="register the builtin datasets under this folder"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    """Print the statistics and suggestions of ``--dataset``; return them as a dict with keys
    "stats" and "suggestions"."""
    args = argument_parser().parse_args(argv)
    import solov2_d2
    from solov2_d2.data import register_builtin_datasets

    if args.datasets_root:
        register_builtin_datasets(args.datasets_root)
    if args.dataset not in DatasetCatalog.list():
        raise SystemExit(
            f"--dataset {args.dataset!r} is not registered; registered: "
            f"{', '.join(sorted(DatasetCatalog.list()))} (builtin ones need --datasets-root "
            "or SOLOV2_DATASETS when their folder is elsewhere)."
        )
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    stats = dataset_stats(
        DatasetCatalog.get(args.dataset), cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    )
    suggestions = suggest_settings(stats)
    result = {"dataset": args.dataset, "stats": stats, "suggestions": suggestions}
    names = MetadataCatalog.get(args.dataset).get("thing_classes")
    text = _format(args.dataset, stats, suggestions, names)
    print(json.dumps(result, indent=2) if args.json else text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
