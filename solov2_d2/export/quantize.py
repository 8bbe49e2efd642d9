"""Int8 post-training quantization of an exported SOLOv2 for CPUs, with ONNX Runtime's static
quantization (`onnxruntime.quantization.quantize_static`).

The convolutions of the network with constant weights (backbone, FPN, heads, mask branch) run
in int8: QDQ format, int8 weights per output channel, uint8 activations of ranges measured on
images of a registered dataset, resized as at test time. Everything else stays float32: the
input normalisation, deformable convolutions, the dynamic mask convolution (its kernels are the
network's outputs), the post-processing with Matrix NMS. The quantized file carries the float
file's metadata, so :class:`OnnxPredictor` runs it unchanged.
"""
import logging
import os
from typing import Dict, Iterator, List, Optional

from detectron2.data import DatasetCatalog

from ..data.images import read_image
from .graph import require_export_packages
from .predictor import OnnxPredictor

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "calibration_dicts",
    "calibration_inputs",
    "quantize_int8",
    "quantized_path",
]

logger = logging.getLogger(__name__)

# Images whose activation ranges set the quantization's scales.
DEFAULT_CALIBRATION_IMAGES = 32


def quantized_path(float_path: str) -> str:
    """Where the int8 model of `float_path` is written: DIR/model.onnx -> DIR/model_int8.onnx."""
    root, ext = os.path.splitext(float_path)
    return f"{root}_int8{ext or '.onnx'}"


def calibration_dicts(dataset: str, num_images: int) -> List[Dict]:
    """The first `num_images` dataset dicts of the registered `dataset`.

    Raises:
        KeyError: `dataset` is not registered (the message names the registered datasets).
        ValueError: `num_images` < 1, or the dataset has fewer images.
    """
    if num_images < 1:
        raise ValueError(f"--calibration-images {num_images}; expected a number >= 1.")
    if dataset not in DatasetCatalog.list():
        raise KeyError(
            f"Calibration dataset {dataset!r} is not registered. Registered datasets: "
            f"{', '.join(sorted(DatasetCatalog.list()))}."
        )
    dicts = DatasetCatalog.get(dataset)
    if len(dicts) < num_images:
        raise ValueError(
            f"Calibration dataset {dataset!r} has {len(dicts)} images, fewer than the "
            f"{num_images} asked for (--calibration-images): ask for at most {len(dicts)}."
        )
    return dicts[:num_images]


def calibration_inputs(predictor: OnnxPredictor, dicts: List[Dict]) -> Iterator[Dict]:
    """The graph's inputs for each image of `dicts`, one image at a time, as
    `predictor(image)` makes them: "images" float32 [1, 3, H, W] resized to the test size and
    padded, "image_sizes" int64 [1, 2]."""
    for d in dicts:
        image = read_image(d["file_name"], format="BGR")
        yield predictor.graph_inputs([predictor.model_input(image)])


def _dynamic_convs(model) -> List[str]:
    """Names of the Conv nodes whose weights are not constants (the dynamic mask convolution)."""
    constants = {x.name for x in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] not in constants
    ]


def quantize_int8(
    cfg,
    float_path: str,
    dataset: str,
    num_images: int = DEFAULT_CALIBRATION_IMAGES,
    output_path: Optional[str] = None,
) -> str:
    """Write the int8 model of the exported file `float_path`, calibrated on `dataset`.

    Args:
        cfg: the config the model was exported from (for :class:`OnnxPredictor`).
        float_path: a file written by :func:`export_onnx`.
        dataset: a registered dataset; its first `num_images` images calibrate.
        num_images: images to calibrate on.
        output_path: the int8 file; by default :func:`quantized_path` (next to `float_path`).
    Returns:
        the path of the int8 file.
    Raises:
        KeyError, ValueError: see :func:`calibration_dicts` (before anything is computed).
    """
    require_export_packages("onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    dicts = calibration_dicts(dataset, num_images)
    output_path = output_path or quantized_path(float_path)
    predictor = OnnxPredictor(cfg, float_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.inputs = calibration_inputs(predictor, dicts)

        def get_next(self):
            return next(self.inputs, None)

    model = onnx.load(float_path)
    excluded = _dynamic_convs(model)
    logger.info(
        f"Quantizing {float_path} to int8 with {num_images} images of {dataset}; kept in float: "
        f"{len(excluded)} convolution(s) with dynamic weights."
    )
    quantize_static(
        model,
        output_path,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
    )
    quantized = onnx.load(output_path)
    metadata = {p.key: p.value for p in model.metadata_props}
    metadata["solov2.quantization"] = (
        f"int8 QDQ (Conv, per-channel weights), calibrated on {num_images} images of {dataset}"
    )
    onnx.helper.set_model_props(quantized, metadata)
    onnx.save(quantized, output_path)
    return output_path
