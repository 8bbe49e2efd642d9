"""Latency of an exported SOLOv2 in ONNX Runtime (CPU) next to PyTorch eager, on the same images.

Both run the whole pipeline of one BGR image, as an application does: resize, network and
post-processing, masks pasted at the image's size (`OnnxPredictor` and `SOLOv2Predictor`,
detectron2's `DefaultPredictor`). Prints a Markdown table of the median and minimum time per
image and the number of detections of each; `--json PATH` also writes the results.

    python -m solov2_d2.export --config-file configs/fruit/SOLOv2_R18_fruit.yaml \\
        --output output/fruit/onnx MODEL.WEIGHTS output/fruit/model_final.pth
    python bench/bench_onnx.py --config-file configs/fruit/SOLOv2_R18_fruit.yaml \\
        --onnx output/fruit/onnx/model.onnx MODEL.WEIGHTS output/fruit/model_final.pth

Time it on a quiet machine: both sides use `--threads` threads (default: all cores).
"""
import argparse
import json
import os
import statistics
import time

# Bridges a detectron2 without compiled ops before any detectron2 module is imported.
import solov2_d2  # noqa: F401  # isort: split

import cv2
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from solov2_d2 import add_solov2_config
from solov2_d2.engine.predictor import SOLOv2Predictor
from solov2_d2.export import OnnxPredictor, require_export_packages


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--onnx", required=True, metavar="FILE", help="the exported model")
    parser.add_argument(
        "--input", nargs="+", help="image files (default: the fruit_val photos)", default=[]
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per image")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per side")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options, KEY VALUE ...")
    return parser


def time_per_image(predictor, images, repeat):
    """Median and minimum seconds per image over `repeat` runs of each image (after one warm-up
    run each), and the detections of each image."""
    times, counts = [], []
    for image in images:
        counts.append(len(predictor(image)["instances"]))
        for _ in range(repeat):
            start = time.perf_counter()
            predictor(image)
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), counts


def main(args):
    require_export_packages("onnxruntime")
    import onnxruntime

    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    files = args.input or [d["file_name"] for d in DatasetCatalog.get("fruit_val")]
    images = [cv2.imread(f) for f in files]

    torch.set_num_threads(args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    predictors = {
        "PyTorch eager": SOLOv2Predictor(cfg),
        "ONNX Runtime": OnnxPredictor(cfg, args.onnx, session_options=options),
    }
    results = {}
    for name, predictor in predictors.items():
        median, best, counts = time_per_image(predictor, images, args.repeat)
        results[name] = {"median_s": median, "min_s": best, "detections": counts}

    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    print(
        f"{len(images)} images ({', '.join(sizes)}), input short side {cfg.INPUT.MIN_SIZE_TEST}, "
        f"{args.threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    print("| runtime | median ms / image | min ms / image | detections |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {1000 * r['median_s']:.1f} | {1000 * r['min_s']:.1f} | "
            f"{sum(r['detections'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": files, "threads": args.threads, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
