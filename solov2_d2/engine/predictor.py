"""A DefaultPredictor that checks the array it is given before detectron2 resizes it.

Detectron2's :class:`DefaultPredictor` resizes the array before the model sees it, and fails
there in ways that name nothing useful (uint16, int64 or bool arrays: NotImplementedError from
torch's interpolation; a [C, H, W] array: a PIL TypeError; an empty array: ZeroDivisionError; a
2-D array: "axes don't match array"; an image over 2 x ``INPUT.MAX_SIZE_TEST`` times longer
than wide or the reverse: "height and width must be > 0"), or runs without complaint on a float
image in [0, 1], which the model sees as black, and resizes a float image otherwise than the
same picture as uint8 (without antialiasing), so that its detections differ.
"""
from typing import Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.engine import DefaultPredictor

from ..data.images import check_resizable
from ..modeling.meta_arch import check_finite_image
from .checkpoint import SOLOv2Checkpointer

__all__ = ["SOLOv2Predictor", "image_for_predictor"]


def image_for_predictor(
    image: np.ndarray, resize: Optional[T.ResizeShortestEdge] = None
) -> np.ndarray:
    """
    Check an image given to the predictor and convert it to what detectron2's resize takes.

    Accepted, as they are: [H, W, 3] (in ``INPUT.FORMAT`` order) or [H, W, 1], uint8.
    Converted: a 2-D [H, W] array to [H, W, 1] (grayscale, replicated by the model); an integer
    array whose values all lie in 0..255 to uint8 (lossless); a float array (any float dtype)
    whose values are all integers in 0..255 to uint8 (lossless), so that the same picture gives
    the same detections whatever its dtype; any other float array with values in [0, 255] to
    float32, which detectron2 resizes with torch's bilinear interpolation without
    antialiasing (uint8 images are resized by PIL, with it): close to, not the same as, the
    uint8 path.
    Refused, with a message saying what to do: anything but a numpy array (TypeError); a bool
    array, an integer array with values outside 0..255 (e.g. 16-bit), a float array with values
    outside 0..255, NaN or inf, a float array in [0, 1], a [C, H, W] array, 4 or other numbers
    of channels, an empty array, and, given `resize`, an image it would shrink to 0 pixels on a
    side (ValueError, giving the shape and the limit: see
    :func:`~solov2_d2.data.images.check_resizable`).

    Args:
        image: the image, [H, W, 3], [H, W, 1] or [H, W].
        resize: the predictor's resize (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``).

    Returns:
        np.ndarray [H, W, 3 or 1], uint8 or float32.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"The image is a {type(image).__name__}; expected a numpy array [H, W, 3] (e.g. "
            "from cv2.imread, or np.asarray(pil_image) with INPUT.FORMAT RGB)."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3, 4):
            hint = "it looks channels-first: pass image.transpose(1, 2, 0)"
        elif image.ndim == 3 and image.shape[2] == 4:
            hint = "convert 4-channel images first, e.g. cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)"
        else:
            hint = "give an [H, W, 3] color image or an [H, W] grayscale one"
        raise ValueError(f"The image has shape {image.shape}; expected [H, W, 3]: {hint}.")
    if image.size == 0:
        raise ValueError(f"The image is empty: shape {image.shape}.")
    if resize is not None:
        check_resizable(image.shape, min(resize.short_edge_length), resize.max_size)

    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        raise ValueError(
            "The image is a bool array (a mask?); expected uint8 values 0..255, e.g. "
            "image.astype(np.uint8) * 255."
        )
    if np.issubdtype(image.dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"The image is {image.dtype} with values in {low}..{high}; expected 0..255. "
                "Scale it to 8 bits first (for a 16-bit image, e.g. (image // 257).astype("
                "np.uint8))."
            )
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        check_finite_image(
            torch.from_numpy(np.ascontiguousarray(image.astype(np.float32, copy=False))),
            "The image",
        )
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"The image is {image.dtype} with values in [{low:g}, {high:g}]; expected "
                "pixel values in [0, 255]."
            )
        if 0 < high <= 1:
            raise ValueError(
                f"The image is {image.dtype} with values in [{low:g}, {high:g}], which the "
                "model would see as black: it expects pixel values in [0, 255]. Pass "
                "image * 255."
            )
        # Tested in the array's own dtype: float32 would round e.g. 12.0000001 to 12.
        if np.array_equal(image, np.floor(image)):
            return image.astype(np.uint8)
        return image.astype(np.float32, copy=False)
    raise ValueError(f"The image has dtype {image.dtype}; expected uint8.")


class SOLOv2Predictor(DefaultPredictor):
    """
    Detectron2's :class:`DefaultPredictor` (same config, call and output), which

    * checks and converts the image with :func:`image_for_predictor` before resizing it, and
    * refuses weights that leave part of the model at its random initialisation (empty
      ``MODEL.WEIGHTS``, a checkpoint of another config): see
      :class:`~solov2_d2.engine.checkpoint.SOLOv2Checkpointer`.
    """

    def __init__(self, cfg, *, allow_incomplete_weights: bool = False):
        """
        Args:
            cfg: the model's config; ``MODEL.WEIGHTS`` is loaded.
            allow_incomplete_weights: run a model whose weights are missing or do not fit.
        """
        # DefaultPredictor would load the weights with detectron2's checkpointer, which loads
        # what fits and only logs the rest: it gets none here, and ours loads them.
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        super().__init__(no_weights)
        self.cfg = cfg.clone()
        SOLOv2Checkpointer(self.model, require_complete=not allow_incomplete_weights).load(
            cfg.MODEL.WEIGHTS
        )

    def __call__(self, original_image: np.ndarray) -> dict:
        """
        Args:
            original_image: [H, W, 3] in ``INPUT.FORMAT`` order, uint8 (others are converted
                or refused: see :func:`image_for_predictor`).
        Returns:
            {"instances": Instances} at the size of `original_image`.

        The model runs in eval mode, also when it was put in train() mode since (which would
        make it expect training inputs); its mode is restored afterwards.
        """
        training = self.model.training
        self.model.eval()
        try:
            return super().__call__(image_for_predictor(original_image, self.aug))
        finally:
            self.model.train(training)
