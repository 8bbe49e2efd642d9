"""
Training augmentations chosen in the config, all off by default (the published recipes stay as
published):

* ``INPUT.LSJ``: large-scale jitter, detectron2's ``ResizeScale`` + ``FixedSizeCrop`` in place
  of ``ResizeShortestEdge``: the image is scaled to fit a square of ``SIZE * s`` pixels,
  ``s ~ U(MIN_SCALE, MAX_SCALE)``, then cropped at random (or padded on the right and bottom)
  to ``SIZE x SIZE``;
* ``INPUT.COLOR_JITTER``: detectron2's ``RandomBrightness``, ``RandomContrast`` and
  ``RandomSaturation`` (intensity ranges; 1 leaves the image as it is), after the geometry;
* ``INPUT.COPY_PASTE``: see :mod:`solov2_d2.data.copy_paste`.

With LSJ or copy-paste the training masks are rasterised before any geometric transform and
transformed as bitmaps (:func:`transform_masks`): cropping polygons would need shapely, and a
pasted instance cuts holes into the masks under it, which polygons cannot express.
"""
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

import detectron2.data.transforms as T
from detectron2.data import detection_utils as utils

__all__ = [
    "FormatAwareSaturation",
    "build_solov2_augmentation",
    "check_augmentation_config",
    "masks_to_tight_boxes",
    "rasterises_masks",
    "transform_masks",
]

# Formats whose 3 channels are colours; the other formats have no saturation to jitter.
_CHANNEL_WEIGHTS = {"RGB": [0.299, 0.587, 0.114], "BGR": [0.114, 0.587, 0.299]}


class FormatAwareSaturation(T.RandomSaturation):
    """detectron2's ``RandomSaturation`` (blend with the image's luma by a weight drawn from
    ``U(intensity_min, intensity_max)``), for RGB or BGR images: detectron2's assumes RGB and
    would weigh a BGR image's blue channel as red when computing the luma."""

    def __init__(self, intensity_min: float, intensity_max: float, image_format: str = "RGB"):
        super().__init__(intensity_min, intensity_max)
        self.image_format = image_format

    def get_transform(self, image: np.ndarray) -> T.Transform:
        w = np.random.uniform(self.intensity_min, self.intensity_max)
        grayscale = image.dot(_CHANNEL_WEIGHTS[self.image_format])[:, :, np.newaxis]
        return T.BlendTransform(src_image=grayscale, src_weight=1 - w, dst_weight=w)


def _check_range(value, key: str, low: float = 0.0) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{key} = {list(value)}; expected [min, max] with {low} <= min <= max.")


def check_augmentation_config(cfg) -> None:
    """Raise ValueError naming the key and its value when an ``INPUT.LSJ``,
    ``INPUT.COLOR_JITTER`` or ``INPUT.COPY_PASTE`` setting cannot work."""
    lsj, color, paste = cfg.INPUT.LSJ, cfg.INPUT.COLOR_JITTER, cfg.INPUT.COPY_PASTE
    if lsj.ENABLED:
        if not (isinstance(lsj.SIZE, int) and lsj.SIZE >= 1):
            raise ValueError(f"INPUT.LSJ.SIZE = {lsj.SIZE!r}; expected a side in pixels >= 1.")
        if not 0 < lsj.MIN_SCALE <= lsj.MAX_SCALE:
            raise ValueError(
                f"INPUT.LSJ.MIN_SCALE = {lsj.MIN_SCALE}, INPUT.LSJ.MAX_SCALE = {lsj.MAX_SCALE}; "
                "expected 0 < MIN_SCALE <= MAX_SCALE."
            )
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError(
                "INPUT.CROP.ENABLED = True with INPUT.LSJ.ENABLED = True: large-scale jitter "
                "crops already; turn one of them off."
            )
    if color.ENABLED:
        for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
            _check_range(color[key], f"INPUT.COLOR_JITTER.{key}")
        if cfg.INPUT.FORMAT not in _CHANNEL_WEIGHTS and list(color.SATURATION) != [1.0, 1.0]:
            raise ValueError(
                f"INPUT.COLOR_JITTER.SATURATION = {list(color.SATURATION)} with INPUT.FORMAT "
                f"{cfg.INPUT.FORMAT!r}: saturation needs RGB or BGR images; set it to "
                "(1.0, 1.0)."
            )
    if paste.ENABLED:
        if not 0 <= paste.PROB <= 1:
            raise ValueError(f"INPUT.COPY_PASTE.PROB = {paste.PROB}; expected a value in [0, 1].")
        if not 0 <= paste.MIN_VISIBLE_FRACTION <= 1:
            raise ValueError(
                f"INPUT.COPY_PASTE.MIN_VISIBLE_FRACTION = {paste.MIN_VISIBLE_FRACTION}; "
                "expected a value in [0, 1]."
            )
        if not cfg.MODEL.MASK_ON:
            raise ValueError(
                "INPUT.COPY_PASTE.ENABLED = True needs instance masks (MODEL.MASK_ON True)."
            )


def rasterises_masks(cfg, is_train: bool) -> bool:
    """Whether the training masks are rasterised before the transforms (LSJ or copy-paste)."""
    return is_train and (cfg.INPUT.LSJ.ENABLED or cfg.INPUT.COPY_PASTE.ENABLED)


def build_solov2_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """detectron2's ``build_augmentation`` (``ResizeShortestEdge``, ``RandomFlip``), with, in
    training, ``INPUT.LSJ`` in place of the resize and ``INPUT.COLOR_JITTER`` at the end.
    ``INPUT.CROP`` is added by ``DatasetMapper.from_config``, as in detectron2."""
    check_augmentation_config(cfg)
    augs = utils.build_augmentation(cfg, is_train)
    if not is_train:
        return augs
    if cfg.INPUT.LSJ.ENABLED:
        lsj = cfg.INPUT.LSJ
        augs = [a for a in augs if not isinstance(a, T.ResizeShortestEdge)]
        augs += [
            T.ResizeScale(lsj.MIN_SCALE, lsj.MAX_SCALE, lsj.SIZE, lsj.SIZE),
            T.FixedSizeCrop((lsj.SIZE, lsj.SIZE), pad_value=lsj.PAD_VALUE),
        ]
    if cfg.INPUT.COLOR_JITTER.ENABLED:
        color = cfg.INPUT.COLOR_JITTER
        augs += [T.RandomBrightness(*color.BRIGHTNESS), T.RandomContrast(*color.CONTRAST)]
        if cfg.INPUT.FORMAT in _CHANNEL_WEIGHTS:
            augs.append(FormatAwareSaturation(*color.SATURATION, image_format=cfg.INPUT.FORMAT))
    return augs


def _nearest_indices(t: T.ResizeTransform) -> Tuple[torch.Tensor, torch.Tensor]:
    """The source row (int64 [new_h]) and column (int64 [new_w]) of each pixel of PIL's
    nearest resize, which detectron2's ``apply_segmentation`` uses: found by resizing images of
    row and column numbers, so that PIL's own rounding picks them."""

    def pick(size: int, new_size: int) -> torch.Tensor:
        numbers = Image.fromarray(np.arange(size, dtype=np.int32)[None])
        picked = np.asarray(numbers.resize((int(new_size), 1), Image.NEAREST))[0]
        return torch.from_numpy(picked.astype(np.int64))

    return pick(t.h, t.new_h), pick(t.w, t.new_w)


# Transforms whose apply_segmentation maps an H x W x N array channel by channel.
_STACKABLE = (T.HFlipTransform, T.VFlipTransform, T.CropTransform, T.PadTransform)


def transform_masks(transforms: T.TransformList, masks: torch.Tensor) -> torch.Tensor:
    """Apply `transforms` (the image's) to instance masks, all instances at once.

    Flips, crops and pads act on the stack of masks; a ``ResizeTransform`` gathers the rows and
    columns that PIL's nearest resize (detectron2's ``apply_segmentation``) picks; photometric
    transforms leave masks alone; any other transform is applied mask by mask with its
    ``apply_segmentation``.

    Args:
        transforms: the transforms applied to the image of size (H, W).
        masks: bool [N, H, W].
    Returns:
        bool [N, H', W'] for the transformed image's (H', W').
    """
    out = masks.to(torch.uint8)
    for t in transforms.transforms:
        if isinstance(t, (T.NoOpTransform, T.BlendTransform)):
            continue
        if isinstance(t, T.ResizeTransform):
            rows, cols = _nearest_indices(t)
            out = out.index_select(1, rows).index_select(2, cols)
            continue
        if isinstance(t, _STACKABLE):
            array = t.apply_segmentation(out.permute(1, 2, 0).numpy())
            if array.ndim == 2:  # a crop or pad of H x W x 0 may come back 2-D
                array = array[:, :, None][:, :, :0]
            out = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
            continue
        shape = t.apply_segmentation(np.zeros(out.shape[1:], np.uint8)).shape
        parts = [torch.from_numpy(t.apply_segmentation(m.numpy())) for m in out]
        out = torch.stack(parts) if parts else out.new_zeros((0, *shape))
    return out.bool()


def masks_to_tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (float32 [N, 4]) of bool masks [N, H, W], as detectron2's
    ``BitMasks.get_bounding_boxes``: (min x, min y, max x + 1, max y + 1); zeros for an empty
    mask."""
    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    if n == 0:
        return boxes
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    boxes[:, 0] = torch.where(cols, xs, inf).amin(dim=1)
    boxes[:, 1] = torch.where(rows, ys, inf).amin(dim=1)
    boxes[:, 2] = torch.where(cols, xs, -inf).amax(dim=1) + 1
    boxes[:, 3] = torch.where(rows, ys, -inf).amax(dim=1) + 1
    empty = ~cols.any(dim=1)
    boxes[empty] = 0
    return boxes
