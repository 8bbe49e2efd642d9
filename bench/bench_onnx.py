"""Latency of an exported SOLOv2 in ONNX Runtime or OpenVINO (CPU), float32 and int8, next to
PyTorch eager.

Each runs the whole pipeline of one BGR image, as an application does: resize, network and
post-processing, masks pasted at the image's size (`OnnxPredictor` and `SOLOv2Predictor`,
detectron2's `DefaultPredictor`), on the same images. `--int8 FILE` adds the quantized model
(`python -m solov2_d2.export ... --quantize int8`); `--openvino` adds the files run by OpenVINO
(`OnnxPredictor(..., runtime="openvino")`, the `openvino` extra). The runtimes take turns image
by image, so a drift in the machine's speed touches all of them alike. Prints a Markdown table
of the median time per image, its spread (the 10th to 90th percentile of all timed runs), the
ratio to eager and the number of detections of each; `--json PATH` also writes the results.

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
    parser.add_argument("--int8", metavar="FILE", help="also time this int8 model")
    parser.add_argument("--openvino", action="store_true", help="also time them in OpenVINO")
    parser.add_argument(
        "--input", nargs="+", help="image files (default: the fruit_val photos)", default=[]
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per image")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per side")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options, KEY VALUE ...")
    return parser


def time_per_image(predictors, images, repeat):
    """Per predictor name: seconds of every timed run ({"times": [...]}, `repeat` runs of each
    image after one warm-up run) and the detections of each image; the predictors take turns on
    each image."""
    results = {name: {"times": [], "detections": []} for name in predictors}
    for image in images:
        for name, predictor in predictors.items():
            results[name]["detections"].append(len(predictor(image)["instances"]))
        for _ in range(repeat):
            for name, predictor in predictors.items():
                start = time.perf_counter()
                predictor(image)
                results[name]["times"].append(time.perf_counter() - start)
    for r in results.values():
        deciles = statistics.quantiles(r["times"], n=10) if len(r["times"]) > 1 else r["times"] * 9
        r.update(median_s=statistics.median(r["times"]), p10_s=deciles[0], p90_s=deciles[-1])
    return results


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
        "PyTorch eager, float32": SOLOv2Predictor(cfg),
        "ONNX Runtime, float32": OnnxPredictor(cfg, args.onnx, session_options=options),
    }
    if args.int8:
        predictors["ONNX Runtime, int8"] = OnnxPredictor(cfg, args.int8, session_options=options)
    if args.openvino:
        for precision, path in (("float32", args.onnx), ("int8", args.int8)):
            if path:
                predictors[f"OpenVINO, {precision}"] = OnnxPredictor(
                    cfg, path, runtime="openvino", num_threads=args.threads
                )
    results = time_per_image(predictors, images, args.repeat)

    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    if args.openvino:
        import openvino

        versions += f", openvino {openvino.__version__.split('-')[0]}"
    print(
        f"{len(images)} images ({', '.join(sizes)}), input short side {cfg.INPUT.MIN_SIZE_TEST}, "
        f"{args.threads} threads, {versions}"
    )
    print("| runtime | median ms / image | 10th-90th percentile | / eager | detections |")
    print("|---|---:|---:|---:|---:|")
    eager = results["PyTorch eager, float32"]["median_s"]
    for name, r in results.items():
        print(
            f"| {name} | {1000 * r['median_s']:.0f} | {1000 * r['p10_s']:.0f}-"
            f"{1000 * r['p90_s']:.0f} | {r['median_s'] / eager:.2f} | {sum(r['detections'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"files": files, "threads": args.threads, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
