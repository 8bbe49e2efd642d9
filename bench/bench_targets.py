"""Time SOLOv2 target assignment for one image with many instances.

    .venv/bin/python bench/bench_targets.py                  # 800x1333, 50 instances, bitmasks
    .venv/bin/python bench/bench_targets.py --polygons       # include polygon rasterisation
    .venv/bin/python bench/bench_targets.py --device cuda
"""
import argparse
from functools import partial

import numpy as np
import torch

import solov2_d2  # noqa: F401  # isort: split

from bench_matrix_nms import median_ms

from detectron2.structures import BitMasks, Instances, PolygonMasks

from solov2_d2.modeling.targets import assign_targets


def random_instances(height, width, count, polygons, device, seed=0):
    """`count` random star-shaped polygons of sizes from 8 px to half the image."""
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(count):
        radius = rng.uniform(4, min(height, width) / 4)
        cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        r = radius * rng.uniform(0.5, 1.0, 12)
        shapes.append([np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).ravel()])
    inst = Instances((height, width))
    poly = PolygonMasks(shapes)
    inst.gt_masks = poly if polygons else BitMasks.from_polygon_masks(poly, height, width)
    inst.gt_boxes = poly.get_bounding_boxes()
    inst.gt_classes = torch.as_tensor(rng.integers(0, 80, count))
    return inst.to(device)


def time_target_assignment(height, width, instances, polygons, repeats, device):
    """Median ms of assigning the targets of one image with `instances` random instances."""
    inst = random_instances(height, width, instances, polygons, device)
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)
    run = partial(
        assign_targets,
        [inst],
        padded,
        [40, 36, 24, 16, 12],
        [(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)],
        0.2,
        80,
        4,
    )
    return median_ms([run], device, warmup=1, repeats=repeats)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--polygons", action="store_true", help="time rasterisation too")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    ms = time_target_assignment(
        args.height, args.width, args.instances, args.polygons, args.repeats, device
    )
    kind = "polygons (rasterised here)" if args.polygons else "bitmasks"
    print(
        f"target assignment, {args.height}x{args.width}, {args.instances} instances as {kind}, "
        f"{device}, {torch.get_num_threads()} threads: median {ms:.1f} ms over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
