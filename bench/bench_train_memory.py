"""Peak memory of one SOLOv2 training iteration with many instances, each part in a fresh process.

    .venv/bin/python bench/bench_train_memory.py                  # R50, 2 x 800x1333, 100 each
    .venv/bin/python bench/bench_train_memory.py --device cuda
    .venv/bin/python bench/bench_train_memory.py --parts losses --instances 200

Parts (random weights, random star-shaped instances as bitmasks, bench_targets.py):

- ``iteration``: forward + backward + SGD step of the whole model;
- ``losses``: ``SOLOv2.losses`` forward + backward alone, on network outputs of the right shapes
  given as leaf tensors (target assignment, focal and Dice losses).

On the CPU the peak is the process's peak RSS (VmHWM, reset just before the part runs) and the
increase is over the RSS before it; on CUDA ``torch.cuda.max_memory_allocated`` and the increase
over ``memory_allocated`` before it. Prints a Markdown table; ``--json`` also prints the results.
"""
import argparse
import json
from typing import Tuple

import torch

import solov2_d2  # noqa: F401  # isort: split

from bench_targets import random_instances
from peak_memory import peak_memory_mb, run_in_fresh_process
from random_model import random_model_cfg

from detectron2.modeling import build_model
from detectron2.structures import ImageList

PARTS = ("iteration", "losses")


def _build(config: str, device: str):
    cfg = random_model_cfg(config, device)
    torch.manual_seed(0)
    return build_model(cfg).train(), cfg


def _inputs(spec, num_classes: int):
    """Random uint8 images [3, H, W] with `instances` random instances each (CPU, as a data
    loader gives them)."""
    g = torch.Generator().manual_seed(0)
    h, w = spec["height"], spec["width"]
    inputs = []
    for i in range(spec["batch"]):
        instances = random_instances(h, w, spec["instances"], False, "cpu", seed=i)
        instances.gt_classes %= num_classes
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        inputs.append({"image": image, "instances": instances})
    return inputs


def _padded_shape(model, inputs):
    """[B, C, H, W] of the model's padded input batch."""
    images = ImageList.from_tensors([x["image"] for x in inputs], model.backbone.size_divisibility)
    return tuple(images.tensor.shape)


def _iteration(model, cfg, inputs):
    """One SGD iteration of the whole model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

    def step():
        loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _losses(model, cfg, inputs):
    """`SOLOv2.losses` forward and backward on leaf tensors shaped like the network's outputs."""
    device = model.device
    b, _, h, w = _padded_shape(model, inputs)
    c = cfg.MODEL.SOLOV2
    dim = c.MASK_DIM * c.DYNAMIC_KERNEL_SIZE**2
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape):
        return (0.1 * torch.randn(shape, generator=g, device=device)).requires_grad_()

    cate = [leaf(b, c.NUM_CLASSES, s, s) for s in c.NUM_GRIDS]
    kernels = [leaf(b, dim, s, s) for s in c.NUM_GRIDS]
    features = leaf(b, c.MASK_DIM, h // model.mask_stride, w // model.mask_stride)
    gt = [x["instances"].to(device) for x in inputs]

    def step():
        sum(model.losses(cate, kernels, features, gt, (h, w)).values()).backward()

    return step


def positive_cells(model, inputs) -> Tuple[int, int]:
    """The numbers of positive cells of the batch and of the (cell, instance) pairs whose masks
    the Dice loss computes (MODEL.SOLOV2.MASK_LOSS_PAIRS: more than the cells where instances
    share cells with "all")."""
    gt = [x["instances"].to(model.device) for x in inputs]
    targets = model.assign_targets(gt, _padded_shape(model, inputs)[-2:])
    pairs, _ = targets.mask_pairs(model.mask_loss_pairs)
    return int((targets.matched >= 0).sum()), int((pairs >= 0).sum())


def measure_child(spec: dict) -> dict:
    """In this (fresh) process: peak memory of one run of `spec["part"]`."""
    device = torch.device(spec["device"])
    model, cfg = _build(spec["config"], spec["device"])
    inputs = _inputs(spec, cfg.MODEL.SOLOV2.NUM_CLASSES)
    positives, pairs = positive_cells(model, inputs)
    step = {"iteration": _iteration, "losses": _losses}[spec["part"]](model, cfg, inputs)
    _, peak, increase = peak_memory_mb(step, device)
    return {
        "peak_mb": round(peak, 1),
        "increase_mb": round(increase, 1),
        "positive_cells": positives,
        "mask_pairs": pairs,
    }


def measure(spec: dict) -> dict:
    """Run `measure_child` in a fresh process (so earlier parts leave nothing behind)."""
    return run_in_fresh_process(__file__, "--child", spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/SOLOv2_R50_3x.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--instances", type=int, default=100, help="per image")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(json.loads(args.child))))
        return

    spec = {k: getattr(args, k) for k in ("config", "device", "batch", "height", "width")}
    spec["instances"] = args.instances
    results = [measure(dict(spec, part=part)) for part in args.parts]
    kind = "max_memory_allocated" if torch.device(args.device).type == "cuda" else "VmHWM"
    print(
        f"Peak memory of one training step part ({kind}), {args.config}, {args.batch} images of "
        f"{args.height}x{args.width}, {args.instances} instances each, {args.device}, "
        f"torch {torch.__version__}:\n"
    )
    print(
        "| part | positive cells | mask pairs | peak MB | increase MB |\n"
        "|---|---:|---:|---:|---:|"
    )
    for r in results:
        print(
            f"| {r['part']} | {r['positive_cells']} | {r['mask_pairs']} | {r['peak_mb']:.0f} | "
            f"{r['increase_mb']:.0f} |"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
