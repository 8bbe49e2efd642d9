"""An exported SOLOv2 run by ONNX Runtime, with the interfaces of detectron2's `DefaultPredictor`
and of a model in inference (for the evaluators)."""
import logging
from typing import Dict, List, Sequence

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.structures import Instances

from ..engine.predictor import image_for_predictor
from ..inference.pipeline import SOLOv2PostProcessor, detections_to_instances
from ..modeling.meta_arch import mask_extent
from .graph import INPUT_NAMES, OUTPUT_NAMES, require_export_packages

__all__ = ["OnnxPredictor"]

logger = logging.getLogger(__name__)


class OnnxPredictor:
    """Runs a model exported by :func:`export_onnx` in ONNX Runtime.

    `predictor(image)` takes a BGR uint8 [H, W, 3] image and returns `{"instances": Instances}`
    as `DefaultPredictor` does: the image is resized as the config's INPUT.MIN_SIZE_TEST and
    MAX_SIZE_TEST say, and the instances (`pred_masks` bool [N, H, W], `scores`, `pred_classes`,
    `pred_boxes`) are at the image's size. `predictor.inference(batched_inputs)` takes a batch
    of dataset dicts as a model does, so `inference_on_dataset(predictor.inference, ...)` runs
    detectron2's evaluators on the exported model.

    The graph's masks are pasted here, with the eager model's code
    (:meth:`SOLOv2PostProcessor.paste`): upsampled by the mask stride, cropped to the image,
    resized to the output size (bilinear) and thresholded; boxes are the pasted masks' tight
    boxes.
    """

    def __init__(
        self,
        cfg,
        onnx_path: str,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options=None,
    ):
        """
        Args:
            cfg: the config the model was exported from (its INPUT.* keys are used).
            onnx_path: the exported file.
            providers: ONNX Runtime execution providers, in order of preference.
            session_options: `onnxruntime.SessionOptions` (e.g. thread counts), or None.
        """
        require_export_packages("onnxruntime")
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            onnx_path, sess_options=session_options, providers=list(providers)
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
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
        self.paster = SOLOv2PostProcessor(
            strides=(), mask_stride=mask_stride, mask_thresh=mask_thresh
        )
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT = {self.input_format!r}; expected 'RGB' or 'BGR'.")

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        """
        Args:
            original_image: uint8 [H, W, 3], BGR (as cv2.imread reads it); others are converted
                or refused as `SOLOv2Predictor` does (:func:`image_for_predictor`).
        Returns:
            {"instances": Instances} of size (H, W).
        """
        original_image = image_for_predictor(original_image)
        height, width = original_image.shape[:2]
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        # A grayscale [H, W, 1] image is replicated, as the eager model does.
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1)).expand(3, -1, -1)
        return self.inference([{"image": image, "height": height, "width": width}])[0]

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """
        Args:
            batched_inputs: per image a dict with "image", [3, H_i, W_i] in INPUT.FORMAT at the
                input size, and optionally "height", "width": the output size.
        Returns:
            per image, {"instances": Instances} of the output size.
        """
        images = [x["image"].float().numpy() for x in batched_inputs]
        sizes = np.array([x.shape[-2:] for x in images], dtype=np.int64)
        padded = [mask_extent(int(s), self.size_divisibility, 1) for s in sizes.max(axis=0)]
        batch = np.zeros((len(images), 3, *padded), dtype=np.float32)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[1], : image.shape[2]] = image
        outputs = self.session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (batch, sizes))))
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
            stride = self.paster.mask_stride
            h_m, w_m = (mask_extent(s, self.size_divisibility, stride) for s in (h, w))
            soft = found["masks"][i, :n, :h_m, :w_m]
            output_size = (x.get("height", h), x.get("width", w))
            masks, boxes = self.paster.paste(soft, (h, w), output_size)
            instances = detections_to_instances(
                masks, found["scores"][i, :n], found["classes"][i, :n], boxes
            )
            results.append({"instances": instances})
        return results
