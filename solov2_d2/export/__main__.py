"""Command line: ``python -m solov2_d2.export --config-file FILE --output DIR [--format onnx]
[--max-candidates K] [--opset N] [--quantize int8 --calibration DATASET [--calibration-images N]]
[KEY VALUE ...]``, in the manner of detectron2's ``tools/deploy/export_model.py``: the config's
model with its MODEL.WEIGHTS, exported whole (pre-processing, network, post-processing with
Matrix NMS) to DIR/model.onnx; with ``--quantize int8`` also DIR/model_int8.onnx, its
convolutions in int8 for CPUs, calibrated on N images of a registered dataset."""
import argparse
import os
import sys
import time

# Bridges a detectron2 without compiled ops before any detectron2 module is imported.
import solov2_d2  # noqa: F401  # isort: split

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ..checks import check_weights_are_local
from ..config import add_solov2_config
from ..engine.checkpoint import SOLOv2Checkpointer
from . import quantize
from .graph import (
    DEFAULT_MAX_CANDIDATES,
    DEFORM_CONV_OPSET,
    MIN_OPSET,
    OPSET,
    check_opset,
    export_onnx,
    has_deformable_convs,
)


def _opset(text: str) -> int:
    """--opset: an integer the export supports (argparse names the flag in its error)."""
    try:
        opset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        check_opset(opset)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return opset


_DESCRIPTION = (
    "Export a SOLOv2 model to one ONNX file holding the input normalisation, the network and "
    "the post-processing with Matrix NMS, for a dynamic batch of images of dynamic size "
    "(multiples of the backbone's size divisibility)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m solov2_d2.export", description=_DESCRIPTION)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.onnx")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=DEFAULT_MAX_CANDIDATES,
        help=(
            "the graph's static bound on candidates per image (cells and classes above "
            "MODEL.SOLOV2.SCORE_THRESH_TEST); results equal the eager model's for images with "
            "at most this many, more are cut by category score (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--opset",
        type=_opset,
        default=OPSET,
        help=(
            f"ONNX opset, at least {MIN_OPSET}, or {DEFORM_CONV_OPSET} for models with "
            "deformable convolutions (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write DIR/model_int8.onnx: convolutions in int8 (ONNX Runtime's static "
        "quantization, QDQ, per-channel weights) for CPUs; needs --calibration",
    )
    parser.add_argument(
        "--calibration",
        metavar="DATASET",
        help="with --quantize: a registered dataset whose images (resized as at test time) "
        "set the activation ranges",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=quantize.DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help="with --quantize: calibrate on the dataset's first N images (default: %(default)s)",
    )
    opts_help = "config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth"
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help=opts_help)
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"  # the graph is device-neutral; tracing on the CPU needs no GPU
    check_weights_are_local(cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


def main(argv=None) -> str:
    """Returns the float model's path (the int8 model is beside it, see `quantized_path`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quantize and not args.calibration:
        parser.error("--quantize int8 needs --calibration DATASET (a registered dataset)")
    if args.calibration and not args.quantize:
        parser.error("--calibration is only used with --quantize int8")
    cfg = setup_cfg(args)
    if args.quantize:  # an unknown dataset or too few images, before anything is exported
        quantize.calibration_dicts(args.calibration, args.calibration_images)
    model = build_model(cfg)
    check_opset(args.opset, has_deformable_convs(model))  # before loading the weights
    # A trained model whole: empty weights or a checkpoint of another config are refused.
    SOLOv2Checkpointer(model, require_complete=True).load(cfg.MODEL.WEIGHTS)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.onnx")
    start = time.perf_counter()
    export_onnx(model, path, max_candidates=args.max_candidates, opset=args.opset, cfg=cfg)
    print(
        f"Wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, opset {args.opset}, at most "
        f"{args.max_candidates} candidates per image) in {time.perf_counter() - start:.0f} s.",
        file=sys.stderr,
    )
    if args.quantize:
        start = time.perf_counter()
        int8 = quantize.quantize_int8(cfg, path, args.calibration, args.calibration_images)
        print(
            f"Wrote {int8} ({os.path.getsize(int8) / 2**20:.1f} MiB, int8, calibrated on "
            f"{args.calibration_images} images of {args.calibration}) in "
            f"{time.perf_counter() - start:.0f} s.",
            file=sys.stderr,
        )
    return path


if __name__ == "__main__":
    main()
