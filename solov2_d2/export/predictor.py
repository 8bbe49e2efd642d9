"""An exported SOLOv2 run by ONNX Runtime or OpenVINO, with the interfaces of detectron2's
`DefaultPredictor` and of a model in inference (for the evaluators)."""
import json
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances

from ..engine.predictor import image_for_predictor
from ..inference.masks import main_part_boxes, paste_masks
from ..inference.pipeline import detections_to_instances
from ..modeling.meta_arch import mask_extent
from .graph import INPUT_NAMES, OUTPUT_NAMES, require_export_packages
from .openvino_runtime import OpenVinoGraph

__all__ = [
    "RUNTIMES",
    "OnnxInferenceModel",
    "OnnxPredictor",
    "OnnxRuntimeGraph",
    "add_runtime_argument",
]

logger = logging.getLogger(__name__)

# The runtimes OnnxPredictor runs the graph in (its `runtime` argument).
RUNTIMES = ("onnxruntime", "openvino")


def add_runtime_argument(parser) -> None:
    """Add ``--onnx-runtime`` (one of RUNTIMES, default onnxruntime) to an argparse parser, as
    the scripts that take ``--onnx`` have it."""
    parser.add_argument(
        "--onnx-runtime",
        choices=RUNTIMES,
        default="onnxruntime",
        help="with --onnx: the runtime that runs it on the CPU (default: %(default)s; openvino "
        "needs pip install -e .[openvino])",
    )


class OnnxRuntimeGraph:
    """The graph of an exported file in an ONNX Runtime session.

    Called with the graph's inputs (``{"images": float32 [B, 3, H, W], "image_sizes": int64
    [B, 2]}``, as :meth:`OnnxPredictor.graph_inputs` returns them), it returns the outputs as
    numpy arrays in OUTPUT_NAMES order, with :class:`ExportOutputs`' shapes and dtypes.
    :attr:`metadata` holds the file's metadata (``solov2.*`` keys to strings).
    """

    def __init__(self, onnx_path: str, providers: Sequence[str], session_options=None):
        require_export_packages("onnxruntime")
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            onnx_path, sess_options=session_options, providers=list(providers)
        )
        self.metadata: Dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
        return self.session.run(list(OUTPUT_NAMES), inputs)


class OnnxPredictor:
    """Runs a model exported by :func:`export_onnx` in ONNX Runtime (the default) or in Intel's
    OpenVINO (``runtime="openvino"``, :class:`OpenVinoGraph`); both run the graph alone, and
    everything after it (pasting, boxes, checks) is this class's.

    `predictor(image)` takes a BGR uint8 [H, W, 3] image and returns `{"instances": Instances}`
    as `DefaultPredictor` does: the image is resized as the config's INPUT.MIN_SIZE_TEST and
    MAX_SIZE_TEST say, and the instances (`pred_masks` bool [N, H, W], `scores`, `pred_classes`,
    `pred_boxes`) are at the image's size. `predictor.inference(batched_inputs)` takes a batch
    of dataset dicts as a model does, so `inference_on_dataset(predictor.inference, ...)` runs
    detectron2's evaluators on the exported model.

    The graph's masks are pasted here, with the eager model's code
    (:meth:`SOLOv2PostProcessor.paste`): upsampled by the mask stride, cropped to the image,
    resized to the output size (bilinear) and thresholded; boxes are the pasted masks' tight
    boxes, or those of their main parts (``MODEL.SOLOV2.BOX_FROM "main_parts"``, with the eager
    model's :func:`~solov2_d2.inference.masks.main_part_boxes`).

    The input format, test sizes and box settings are those the file records (the export's
    config); a config with other values is refused (ValueError naming the key and both values),
    since its images would be read in another channel order or at another size, or boxed
    otherwise, than the model was exported for.
    Files exported before these were recorded use the config's values. The class names the file
    records are in :attr:`thing_classes` and :attr:`metadata`.
    """

    def __init__(
        self,
        cfg,
        onnx_path: str,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options=None,
        runtime: str = "onnxruntime",
        num_threads: Optional[int] = None,
    ):
        """
        Args:
            cfg: the config the model was exported from (its INPUT.FORMAT, MIN_SIZE_TEST and
                MAX_SIZE_TEST must agree with the file's; its DATASETS.TEST gives the
                metadata of files that record no class names).
            onnx_path: the exported file.
            providers: ONNX Runtime execution providers, in order of preference.
            session_options: `onnxruntime.SessionOptions` (e.g. thread counts), or None.
            runtime: "onnxruntime" or "openvino" (needs the `openvino` extra).
            num_threads: OpenVINO's inference threads, or None for OpenVINO's default (ONNX
                Runtime's are set in `session_options`).
        """
        if runtime == "onnxruntime":
            if num_threads is not None:
                raise ValueError(
                    "num_threads is OpenVINO's: set ONNX Runtime's threads in session_options."
                )
            self.graph = OnnxRuntimeGraph(onnx_path, providers, session_options)
        elif runtime == "openvino":
            if session_options is not None:
                raise ValueError(
                    "session_options are ONNX Runtime's: give OpenVINO's threads as num_threads."
                )
            self.graph = OpenVinoGraph(onnx_path, num_threads)
        else:
            raise ValueError(
                f"Unknown runtime {runtime!r}; expected one of {', '.join(map(repr, RUNTIMES))}."
            )
        self.runtime = runtime
        # ONNX Runtime's session, to run or time the bare graph; None with OpenVINO.
        self.session = getattr(self.graph, "session", None)
        metadata = self.graph.metadata
        try:
            self.size_divisibility = int(metadata["solov2.size_divisibility"])
            self.max_candidates = int(metadata["solov2.max_candidates"])
            mask_stride = int(metadata["solov2.mask_stride"])
            mask_thresh = float(metadata["solov2.mask_thresh"])
        except KeyError as e:
            raise ValueError(
                f"{onnx_path} has no SOLOv2 metadata ({e.args[0]}): export the model with "
                "python -m solov2_d2.export."
            ) from None
        self.mask_stride, self.mask_thresh = mask_stride, mask_thresh
        recorded = {
            "INPUT.FORMAT": ("input_format", cfg.INPUT.FORMAT, str),
            "INPUT.MIN_SIZE_TEST": ("min_size_test", cfg.INPUT.MIN_SIZE_TEST, int),
            "INPUT.MAX_SIZE_TEST": ("max_size_test", cfg.INPUT.MAX_SIZE_TEST, int),
            "MODEL.SOLOV2.BOX_FROM": ("box_from", cfg.MODEL.SOLOV2.BOX_FROM, str),
            "MODEL.SOLOV2.BOX_MIN_PART_FRACTION": (
                "box_min_part_fraction",
                float(cfg.MODEL.SOLOV2.BOX_MIN_PART_FRACTION),
                float,
            ),
        }
        values = {}
        for key, (name, given, kind) in recorded.items():
            stored = metadata.get(f"solov2.{name}")
            if stored is not None and kind(stored) != given:
                raise ValueError(
                    f"{onnx_path} was exported with {key} {kind(stored)!r}, but the config has "
                    f"{key} {given!r}: give the config the model was exported with (or set "
                    f"{key} {kind(stored)!r})."
                )
            values[key] = given if stored is None else kind(stored)
        min_size, max_size = values["INPUT.MIN_SIZE_TEST"], values["INPUT.MAX_SIZE_TEST"]
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)
        self.input_format = values["INPUT.FORMAT"]
        self.box_from = values["MODEL.SOLOV2.BOX_FROM"]
        self.box_min_part_fraction = values["MODEL.SOLOV2.BOX_MIN_PART_FRACTION"]
        if self.box_from not in ("tight", "main_parts"):
            raise ValueError(
                f"MODEL.SOLOV2.BOX_FROM = {self.box_from!r}; expected 'tight' or 'main_parts'."
            )
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT = {self.input_format!r}; expected 'RGB' or 'BGR'.")
        self.num_classes: Optional[int] = None
        if "solov2.num_classes" in metadata:
            self.num_classes = int(metadata["solov2.num_classes"])
        # The class names of the export's datasets, or None (files exported before they were
        # recorded, datasets without names).
        self.thing_classes: Optional[List[str]] = None
        if "solov2.thing_classes" in metadata:
            self.thing_classes = json.loads(metadata["solov2.thing_classes"])
        self._test_datasets = list(cfg.DATASETS.TEST)

    @property
    def metadata(self) -> Metadata:
        """Dataset metadata to draw the predictions with: the config's first test dataset's
        if its ``thing_classes`` are those the file records (or the file records none), else
        metadata holding only the recorded ``thing_classes``."""
        dataset = MetadataCatalog.get(self._test_datasets[0] if self._test_datasets else "__unused")
        if self.thing_classes is None or dataset.get("thing_classes") == self.thing_classes:
            return dataset
        return Metadata(name="solov2_onnx", thing_classes=list(self.thing_classes))

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        """
        Args:
            original_image: uint8 [H, W, 3], BGR (as cv2.imread reads it); others are converted
                or refused as `SOLOv2Predictor` does (:func:`image_for_predictor`).
        Returns:
            {"instances": Instances} of size (H, W).
        """
        return self.inference([self.model_input(original_image)])[0]

    def model_input(self, original_image: np.ndarray) -> Dict:
        """The dataset dict of :meth:`inference` for a BGR image (as `__call__` takes it):
        "image" float32 [3, h, w] in the input format at the test size, "height", "width"."""
        original_image = image_for_predictor(original_image, self.aug)
        height, width = original_image.shape[:2]
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        # A grayscale [H, W, 1] image is replicated, as the eager model does.
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1)).expand(3, -1, -1)
        return {"image": image, "height": height, "width": width}

    def graph_inputs(self, batched_inputs: List[Dict]) -> Dict[str, np.ndarray]:
        """The graph's inputs for dataset dicts (see :meth:`inference`): "images" float32
        [B, 3, H, W], the images zero-padded to a common size of multiples of the size
        divisibility, and "image_sizes" int64 [B, 2], their (h, w)."""
        images = [x["image"].float().numpy() for x in batched_inputs]
        sizes = np.array([x.shape[-2:] for x in images], dtype=np.int64)
        padded = [mask_extent(int(s), self.size_divisibility, 1) for s in sizes.max(axis=0)]
        batch = np.zeros((len(images), 3, *padded), dtype=np.float32)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[1], : image.shape[2]] = image
        return dict(zip(INPUT_NAMES, (batch, sizes)))

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """
        Args:
            batched_inputs: per image a dict with "image", [3, H_i, W_i] in INPUT.FORMAT at the
                input size, and optionally "height", "width": the output size (positive).
        Returns:
            per image, {"instances": Instances} of the output size; [] for no inputs.
        """
        if len(batched_inputs) == 0:
            return []
        for i, x in enumerate(batched_inputs):
            output_size = (x.get("height", 1), x.get("width", 1))
            if min(output_size) < 1:
                raise ValueError(
                    f"Input {i}: output size {output_size[0]} x {output_size[1]} (\"height\", "
                    "\"width\"); expected positive sizes, or leave them out for the input's size."
                )
        inputs = self.graph_inputs(batched_inputs)
        sizes = inputs["image_sizes"]
        outputs = self.graph(inputs)
        found = dict(zip(OUTPUT_NAMES, (torch.from_numpy(x) for x in outputs)))

        results = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, sizes.tolist())):
            if found["num_candidates"][i] > self.max_candidates:
                logger.warning(
                    f"Image {i} has {int(found['num_candidates'][i])} candidates, more than the "
                    f"graph's bound of {self.max_candidates}: the lowest-scored were dropped "
                    "(export with a larger --max-candidates to keep them)."
                )
            n = int(found["count"][i])
            stride = self.mask_stride
            h_m, w_m = (mask_extent(s, self.size_divisibility, stride) for s in (h, w))
            soft = found["masks"][i, :n, :h_m, :w_m]
            output_size = (x.get("height", h), x.get("width", w))
            masks, boxes = paste_masks(soft, (h, w), output_size, stride, self.mask_thresh)
            if self.box_from == "main_parts":
                boxes = main_part_boxes(
                    masks, soft, self.mask_thresh, (h, w), stride, self.box_min_part_fraction
                )
            instances = detections_to_instances(
                masks, found["scores"][i, :n], found["classes"][i, :n], boxes
            )
            results.append({"instances": instances})
        return results


class OnnxInferenceModel(torch.nn.Module):
    """An :class:`OnnxPredictor` as a model in inference for detectron2's evaluation
    (`inference_on_dataset`, `DefaultTrainer.test`): called on a batch of dataset dicts, it
    returns what :meth:`OnnxPredictor.inference` does. It has no parameters; `eval()` and
    `train()` change nothing."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor
        self.eval()

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.training:
            raise RuntimeError("An exported model only runs inference: call .eval() first.")
        return self.predictor.inference(batched_inputs)
