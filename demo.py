#!/usr/bin/env python
"""
Run a trained SOLOv2 model on images and write pictures of its predictions (masks, classes,
scores), one per input image, with the input's file name and size. Images are read by
:func:`solov2_d2.data.read_image` (16-bit PNG and TIFF scaled to 8 bits). An image that cannot
be read (not an image, truncated, over PIL's pixel limit) or is too elongated to resize (over
2 x INPUT.MAX_SIZE_TEST : 1) is reported and skipped; the exit status is then 1.

The demo never writes over an input or over a picture of the same run: an --output folder where
a picture would replace an input is refused (name the pictures' folder otherwise), and inputs
of the same file name (a/14.jpg, b/14.jpg) get pictures of distinct names (14.jpg, 14_1.jpg),
said in a log line.

Example:

    python demo.py --config-file configs/fruit/SOLOv2_R18_fruit.yaml \\
        --input ../shared/data/fruit/14.jpg "photos/*.jpg" --output output/demo \\
        --opts MODEL.WEIGHTS output/fruit/model_final.pth

With `--onnx output/fruit/onnx/model.onnx` (written by `python -m solov2_d2.export`), the exported
model runs in ONNX Runtime instead (or in OpenVINO, with `--onnx-runtime openvino`); the config
then gives only the input size.
"""
import argparse
import glob
import os
import sys

import cv2
import tqdm

# Bridges a detectron2 without compiled ops before any detectron2 module is imported.
import solov2_d2  # noqa: F401  # isort: split

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from solov2_d2 import add_solov2_config
from solov2_d2.checks import check_weights_are_local
from solov2_d2.data.images import check_resizable, read_image
from solov2_d2.engine.predictor import SOLOv2Predictor
from solov2_d2.export import OnnxPredictor, add_runtime_argument

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(args):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not args.onnx:  # an exported model holds its weights
        if args.onnx_runtime != "onnxruntime":
            raise ValueError(
                f"--onnx-runtime {args.onnx_runtime} runs an exported model: give --onnx FILE."
            )
        if not cfg.MODEL.WEIGHTS:
            raise ValueError(
                "MODEL.WEIGHTS is empty: the demo needs trained weights, e.g. "
                "--opts MODEL.WEIGHTS output/fruit/model_final.pth"
            )
        check_weights_are_local(cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


def list_images(inputs):
    """The image files named by `inputs`: files, folders (their images, sorted) or globs."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            files += [
                os.path.join(item, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
            ]
        elif os.path.isfile(item):
            files.append(item)
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"--input {item!r} is no file, folder or matching glob.")
            files += [m for m in matches if os.path.isfile(m)]
    if not files:
        raise FileNotFoundError(f"No image found in --input {inputs}.")
    return files


def output_paths(files, output_dir, logger=None):
    """
    The path of each picture: `output_dir` / the input's file name, except that

    * a picture that would be written over one of the `files` is refused (ValueError naming
      both): the demo never replaces an input (e.g. with --output the input folder);
    * inputs of the same file name (a/14.jpg, b/14.jpg) get distinct names: the first keeps
      it, the others get the first free name of stem_1, stem_2, ... (14_1.jpg) that is no
      other picture's plain name and no input; logged (with `logger`).

    Returns:
        list of str, one per file, all distinct.
    """
    inputs = {_same_path_key(path): path for path in files}
    plain = [os.path.join(output_dir, os.path.basename(path)) for path in files]
    for path, out in zip(files, plain):
        if _same_path_key(out) in inputs:
            raise ValueError(
                f"The picture of {path} would be written over the input "
                f"{inputs[_same_path_key(out)]}: give an --output folder other than the "
                "inputs' folders."
            )
    reserved = {_same_path_key(out) for out in plain} | set(inputs)
    taken = set()
    outputs = []
    for path, out in zip(files, plain):
        if _same_path_key(out) in taken:
            stem, ext = os.path.splitext(os.path.basename(path))
            count = 0
            while _same_path_key(out) in reserved or _same_path_key(out) in taken:
                count += 1
                out = os.path.join(output_dir, f"{stem}_{count}{ext}")
            if logger is not None:
                logger.warning(
                    f"{path}: another input is also named {stem}{ext}: its picture is {out}"
                )
        taken.add(_same_path_key(out))
        outputs.append(out)
    return outputs


def _same_path_key(path):
    """A key equal for two paths of the same file (symbolic links and case resolved)."""
    return os.path.normcase(os.path.realpath(path))


def draw_predictions(image_bgr, instances, metadata, confidence_threshold):
    """An RGB picture of `image_bgr` with the instances scoring at least the threshold."""
    instances = instances[instances.scores >= confidence_threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def get_parser():
    parser = argparse.ArgumentParser(description="SOLOv2 demo: pictures of the predictions")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", required=True, help="images: files, folders or globs (quoted)"
    )
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.3,
        help="minimum score of the instances drawn (default: %(default)s)",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run this exported model (python -m solov2_d2.export) in ONNX Runtime instead",
    )
    add_runtime_argument(parser)
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def main(args):
    """Returns, per input image, the path of its picture, or None where the image was skipped
    (it could not be read or resized: logged, and the others are done)."""
    logger = setup_logger(name="solov2_demo")
    cfg = setup_cfg(args)
    files = list_images(args.input)
    out_paths = output_paths(files, args.output, logger)
    if args.onnx:
        predictor = OnnxPredictor(cfg, args.onnx, runtime=args.onnx_runtime)
    else:
        predictor = SOLOv2Predictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if args.onnx:  # the class names the exported model records, not the config's datasets'
        metadata = predictor.metadata
    os.makedirs(args.output, exist_ok=True)
    outputs = []
    for path, out_path in zip(tqdm.tqdm(files, disable=len(files) == 1), out_paths):
        try:
            image = read_image(path, format="BGR")
            check_resizable(
                image.shape, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, f"The image {path}"
            )
        except (OSError, ValueError) as e:  # the messages name the file
            logger.error(f"Skipped: {e}")
            outputs.append(None)
            continue
        instances = predictor(image)["instances"].to("cpu")
        picture = draw_predictions(image, instances, metadata, args.confidence_threshold)
        if not cv2.imwrite(out_path, picture[:, :, ::-1]):
            raise OSError(f"Cannot write the picture of {path} to {out_path}.")
        shown = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(f"{path}: {len(instances)} instances, {shown} drawn -> {out_path}")
        outputs.append(out_path)
    failed = [path for path, out in zip(files, outputs) if out is None]
    if failed:
        logger.error(f"{len(failed)} of {len(files)} images were skipped: {failed}")
    return outputs


if __name__ == "__main__":
    sys.exit(1 if None in main(get_parser().parse_args()) else 0)
