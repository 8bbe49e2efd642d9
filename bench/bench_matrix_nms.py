"""Benchmark solov2_d2's batched Matrix NMS against the reference code bases' formulation
(mmdetection's `mask_matrix_nms`, one image, written out here); both are dense.

Both run on identical inputs in the same process: SOLOv2-like candidates, i.e. jittered copies
(shifts of a few pixels, small dilations and erosions) of a few dozen random blobs of varied
sizes, 80 classes (a minority of copies carry another class than their object), random scores,
masks at 200 x 336 (stride 4 of an 800 x 1344 input). Prints a Markdown table of the median
times and the largest difference of the decayed scores; `--json PATH` also writes the results.

    python bench/bench_matrix_nms.py            # N = 100, 500, 1000
    python bench/bench_matrix_nms.py --quick    # small and fast, for CI
    python bench/bench_matrix_nms.py --device cuda

On a machine whose cores are busy with other processes, OpenMP worker threads that spin while
waiting (by default GNU OpenMP's threads spin for a while after each parallel region) take CPU
from the main thread; many small ops then slow down far more than one large matrix product.
Run with `--threads 1` or `OMP_WAIT_POLICY=PASSIVE` there.
"""
import argparse
import json
import math
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from solov2_d2.inference.matrix_nms import matrix_nms

NUM_CLASSES = 80


def dense_matrix_nms(masks, labels, scores, sigma=2.0):
    """The reference formulation (gaussian): one N x N float matrix product over whole masks.

    Returns (decayed scores, labels, keep) of all candidates, sorted by decayed score.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    labels, scores = labels[order], scores[order]
    flat = masks[order].reshape(len(order), -1).float()
    inter = flat @ flat.T
    areas = flat.sum(dim=1)
    iou = (inter / (areas[:, None] + areas[None, :] - inter)).triu(diagonal=1)
    same_label = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    decay_iou = iou * same_label
    comp = decay_iou.max(dim=0).values.expand(len(order), len(order)).T
    decay = (torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * comp**2)).min(dim=0).values
    decayed = scores * decay
    rank = torch.sort(decayed, descending=True, stable=True).indices
    return decayed[rank], labels[rank], order[rank]


def random_blobs(num, height, width, generator):
    """bool [num, H, W] star-shaped blobs (rotated ellipses with wavy outlines), sizes from
    about 8 to 150 pixels, log-uniform."""
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    size = torch.exp(math.log(8) + rand(num) * math.log(150 / 8))
    aspect = 0.5 + rand(num)
    ry, rx = size * aspect.sqrt() / 2, size / aspect.sqrt() / 2
    cy, cx = rand(num) * height, rand(num) * width
    angle, phase2, phase3 = (rand(num) * 2 * math.pi for _ in range(3))
    wave2, wave3 = 0.15 * rand(num), 0.1 * rand(num)
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] - cy[:, None, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] - cx[:, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = xs * cos + ys * sin, -xs * sin + ys * cos
    theta = torch.atan2(v, u)
    radius = 1 + wave2[:, None, None] * torch.cos(2 * theta + phase2[:, None, None])
    radius += wave3[:, None, None] * torch.cos(3 * theta + phase3[:, None, None])
    dist = ((u / rx[:, None, None]) ** 2 + (v / ry[:, None, None]) ** 2).sqrt()
    blobs = dist <= radius
    blobs[torch.arange(num), cy.long().clamp(0, height - 1), cx.long().clamp(0, width - 1)] = True
    return blobs


def make_candidates(num, num_objects, height, width, seed):
    """SOLOv2-like candidates: masks bool [num, H, W], labels int64 [num], scores float [num]."""
    generator = torch.Generator().manual_seed(seed)
    objects = random_blobs(num_objects, height, width, generator)
    object_labels = torch.randint(NUM_CLASSES, (num_objects,), generator=generator)
    source = torch.randint(num_objects, (num,), generator=generator)
    # Small dilations (+1) and erosions (-1) by a 3 x 3 max-pool.
    morph = torch.randint(-1, 2, (num,), generator=generator)
    masks = objects[source].float()[:, None]
    dilated = F.max_pool2d(masks, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-masks, 3, stride=1, padding=1)
    masks = torch.where(morph[:, None, None, None] > 0, dilated, masks)
    masks = torch.where(morph[:, None, None, None] < 0, eroded, masks)[:, 0] > 0.5
    masks = _shift(masks, torch.randint(-3, 4, (num, 2), generator=generator))
    masks |= objects[source] & ~masks.flatten(1).any(dim=1)[:, None, None]  # no empty masks
    other_label = torch.rand(num, generator=generator) < 0.15
    labels = torch.where(
        other_label, torch.randint(NUM_CLASSES, (num,), generator=generator), object_labels[source]
    )
    scores = 0.05 + 0.95 * torch.rand(num, generator=generator)
    return masks, labels, scores


def _shift(masks, shifts):
    """Translate each mask [N, H, W] by its (dy, dx) in `shifts` [N, 2], filling with False."""
    pad = int(shifts.abs().max())
    height, width = masks.shape[1:]
    padded = F.pad(masks, (pad, pad, pad, pad))
    out = torch.empty_like(masks)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
    return out


def median_ms(fns, device, warmup, repeats):
    """Median wall time in ms of each of `fns`, called in turn in every repeat, so that both see
    the same machine load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fn_times.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def run_case(num, args, device):
    masks, labels, scores = make_candidates(num, args.objects, args.height, args.width, args.seed)
    masks, labels, scores = masks.to(device), labels.to(device), scores.to(device)
    dense = dense_matrix_nms(masks, labels, scores)
    ours = matrix_nms(masks, labels, scores)
    same_order = torch.equal(dense[2], ours[2]) and torch.equal(dense[1], ours[1])
    max_diff = (dense[0] - ours[0]).abs().max().item() if same_order else float("inf")
    inputs = (masks, labels, scores)
    dense_ms, ours_ms = median_ms(
        [partial(dense_matrix_nms, *inputs), partial(matrix_nms, *inputs)],
        device,
        warmup=1,
        repeats=args.repeats,
    )
    return {
        "N": num,
        "dense_ms": dense_ms,
        "ours_ms": ours_ms,
        "speedup": dense_ms / ours_ms,
        "same_keep_and_labels": same_order,
        "max_abs_diff": max_diff,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="for CI: N = 100, 3 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op CPU threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--objects", type=int, default=40, help="distinct objects per image")
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [100], 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = [run_case(num, args, device) for num in args.sizes]
    print(
        f"Matrix NMS, gaussian, masks {args.height}x{args.width}, {args.objects} objects, "
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"median of {args.repeats}\n"
    )
    print("| N | dense ms | ours ms | speed-up | same keep & labels | max abs diff |")
    print("|---:|---:|---:|---:|:---:|---:|")
    for r in rows:
        print(
            f"| {r['N']} | {r['dense_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{'yes' if r['same_keep_and_labels'] else 'NO'} | {r['max_abs_diff']:.2e} |"
        )
    if args.json:
        config = dict(
            vars(args),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        )
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)
    if not all(r["same_keep_and_labels"] and r["max_abs_diff"] < 1e-6 for r in rows):
        raise SystemExit("Matrix NMS results differ from the dense formulation.")


if __name__ == "__main__":
    main()
