"""Detections of fixed loads, written to one file, to check that a change leaves results alone.

    .venv/bin/python bench/dump_detections.py OUT.pt
    .venv/bin/python bench/dump_detections.py --compare A.pt B.pt

Loads (random weights, seed 0; forced candidates as in `benchmark.ForcedCandidates`):
- SOLOv2-R50 at 800x1333 on a random image, compact and heavy loads of 1000 candidates, each
  with the fast paths ("auto") and with every fast path off ("plain");
- the fruit config on every fruit photo through `DefaultPredictor` (resized input, output at
  the photo's size), compact load of 300 candidates.
The comparison prints, per load, whether masks, scores, classes and boxes are identical.
"""
import argparse
import sys
from pathlib import Path

import torch

import solov2_d2  # noqa: F401  # isort: split

import cv2
from benchmark import ForcedCandidates, build, random_images
from random_model import random_model_cfg

from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

REPO = Path(__file__).resolve().parents[1]


def _record(instances) -> dict:
    return {
        "masks": instances.pred_masks.cpu(),
        "scores": instances.scores.cpu(),
        "classes": instances.pred_classes.cpu(),
        "boxes": instances.pred_boxes.tensor.cpu(),
    }


def _set_path(model, path: str) -> None:
    """Select the post-processing path of `model` whichever version of the package runs."""
    post = model.postprocessor
    if hasattr(post, "inference_path"):
        post.inference_path = path
    if path == "plain":  # the versions that took int8 intersections even on the plain path
        try:
            from solov2_d2 import mask_intersections, matrix_nms
            matrix_nms.mask_intersections = mask_intersections.mask_intersections_float
        except ImportError:  # 0.2.0 and later: "plain" alone turns every fast path off
            return


def dump(out: Path) -> None:
    torch.set_num_threads(2)
    found = {}
    with torch.no_grad():
        model = build("configs/SOLOv2_R50_3x.yaml", "cpu")
        inputs = [{"image": image} for image in random_images(1, (800, 1333))]
        for path in ("auto", "plain"):
            _set_path(model, path)
            for load in ("compact", "heavy"):
                handles = ForcedCandidates(1000, heavy=load == "heavy").attach(model)
                found[f"R50 {load} {path}"] = _record(model(inputs)[0]["instances"])
                for h in handles:
                    h.remove()
        cfg = random_model_cfg("configs/fruit/SOLOv2_R18_fruit.yaml", "cpu")
        torch.manual_seed(0)
        predictor = DefaultPredictor(cfg)
        predictor.model = build_model(cfg).eval()
        handles = ForcedCandidates(300, objects=20).attach(predictor.model)
        for photo in sorted((REPO / "datasets" / "fruit").glob("*.jpg")):
            found[f"fruit {photo.name}"] = _record(predictor(cv2.imread(str(photo)))["instances"])
        for h in handles:
            h.remove()
    torch.save(found, out)
    print(f"{len(found)} loads written to {out}")


def compare(a: Path, b: Path) -> bool:
    x, y = torch.load(a), torch.load(b)
    same_all = set(x) == set(y)
    for key in sorted(x):
        if key not in y:
            print(f"{key}: missing in {b}")
            continue
        same = {k: torch.equal(x[key][k], y[key][k]) for k in x[key]}
        print(f"{key}: {len(x[key]['scores'])} detections, identical: {all(same.values())} {same}")
        same_all &= all(same.values())
    print("ALL IDENTICAL" if same_all else "DIFFERENCES FOUND")
    return same_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.files) else 1)
    dump(args.files[0])


if __name__ == "__main__":
    main()
