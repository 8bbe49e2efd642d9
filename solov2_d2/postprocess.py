"""SOLOv2 inference for a whole batch: from head outputs to detectron2 `Instances`."""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from .candidate_masks import candidate_masks, lazy_zeros, runs
from .grouping import ceil_log2, groups
from .heads import flatten_levels
from .matrix_nms import batched_matrix_nms, first_last, mask_boxes

__all__ = [
    "SOLOv2PostProcessor",
    "detections_to_instances",
    "masks_to_boxes",
    "point_nms",
]

# Pasting: a pasted pixel is a convex combination of soft mask values (two bilinear stages), so
# it exceeds the threshold t only if one of them exceeds t / (1 + 2^-20) (float rounding of the
# four 1-D interpolations included). Masks are pasted only where they exceed this fraction of t.
_PASTE_MARGIN = 1 - 2.0**-18


def point_nms(scores: torch.Tensor) -> torch.Tensor:
    """Keep a score only where it is the maximum of its 2 x 2 neighbourhood (up and left).

    Args:
        scores: [B, C, S, S] category probabilities.
    Returns:
        [B, C, S, S], scores that are not local maxima set to 0.
    """
    pooled = F.max_pool2d(scores, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return scores * (pooled == scores)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of bool masks [N, H, W] as float [N, 4] XYXY in detectron2's pixel-edge
    convention (x1 = first column, x2 = last column + 1); an empty mask gives (0, 0, 0, 0)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    return _boxes_in_window(masks, 0, 0)


def _boxes_in_window(masks: torch.Tensor, top, left) -> torch.Tensor:
    """float [N, 4] XYXY tight boxes of bool masks [N, h, w] that sit at (`top`, `left`) (ints or
    int64 [N]) of a larger image; (0, 0, 0, 0) for an empty mask."""
    # (amax of bytes: several times faster than any() of bools.)
    pixels = masks.view(torch.uint8)
    y0, y1 = first_last(pixels.amax(dim=2) > 0)
    x0, x1 = first_last(pixels.amax(dim=1) > 0)
    boxes = torch.stack([x0 + left, y0 + top, x1 + 1 + left, y1 + 1 + top], dim=1).float()
    return boxes * (y1 >= 0)[:, None]


def detections_to_instances(
    masks: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    boxes: Optional[torch.Tensor] = None,
) -> Instances:
    """The output format: `Instances` of the masks' size with `pred_masks` (bool [N, H, W]),
    `scores` (float [N]), `pred_classes` (int64 [N]) and `pred_boxes` (the masks' tight boxes,
    so that box AP can be evaluated; computed from `masks` unless given as float [N, 4])."""
    result = Instances(tuple(masks.shape[-2:]))
    result.pred_masks = masks
    result.scores = scores
    result.pred_classes = classes
    result.pred_boxes = Boxes(masks_to_boxes(masks) if boxes is None else boxes)
    return result


class SOLOv2PostProcessor:
    """Turns SOLOv2 head outputs for a batch into per-image `Instances`.

    Steps, batched across images: sigmoid and point NMS on the category grids; the top
    `max_mask_candidates` (cell, class) pairs above `score_thresh`, chosen BEFORE any mask is
    computed so that memory and time are bounded by the config; their masks by one batched
    dynamic convolution; binarisation; masks not larger than their level's stride dropped;
    maskness rescoring; Matrix NMS; top `max_per_image`; upsampling to the input, cropping of each
    image's own area and resizing to the requested output size.

    Unlike the reference implementations, mask pixels in the batch padding outside an image's
    own area are not counted, so an image gets the same result alone or in any batch.

    Speed (the results are those of the steps above): masks are computed only for candidates
    above the threshold (none at all when no cell scores), and only in the blocks of pixels where
    they can exceed the thresholds (:mod:`solov2_d2.candidate_masks`); the candidates' masks are
    reduced to binary masks, areas and maskness sums, and the soft masks of the kept detections
    are computed again afterwards (an exact repeat: at most `max_per_image` of them); each kept
    mask is upsampled and resized only inside the window of the output where it can exceed the
    threshold, and its box is read from that window.
    """

    @configurable
    def __init__(
        self,
        *,
        strides: Sequence[int],
        mask_stride: int,
        score_thresh: float = 0.1,
        max_mask_candidates: int = 500,
        mask_thresh: float = 0.5,
        pre_nms_topk: int = 500,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        update_thresh: float = 0.05,
        max_per_image: int = 100,
    ):
        """
        Args:
            strides: per level, the stride whose value is the minimum mask area (in mask-feature
                pixels) for that level's candidates.
            mask_stride: stride of the mask feature relative to the input.
            score_thresh: minimum category score of a candidate.
            max_mask_candidates: candidates per image whose masks are computed.
            mask_thresh: binarisation threshold of the soft masks, in [0, 1).
            pre_nms_topk, nms_kernel, nms_sigma: Matrix NMS input size, kernel and sigma.
            update_thresh: minimum score after Matrix NMS.
            max_per_image: detections per image.
        """
        self.strides = list(strides)
        self.mask_stride = mask_stride
        self.score_thresh = score_thresh
        self.max_mask_candidates = max_mask_candidates
        self.mask_thresh = mask_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_kernel = nms_kernel
        self.nms_sigma = nms_sigma
        self.update_thresh = update_thresh
        self.max_per_image = max_per_image

    @classmethod
    def from_config(cls, cfg, mask_stride: int):
        c = cfg.MODEL.SOLOV2
        return {
            "strides": c.INSTANCE_STRIDES,
            "mask_stride": mask_stride,
            "score_thresh": c.SCORE_THRESH_TEST,
            "max_mask_candidates": c.MAX_MASK_CANDIDATES,
            "mask_thresh": c.MASK_THRESH_TEST,
            "pre_nms_topk": c.PRE_NMS_TOPK_TEST,
            "nms_kernel": c.NMS_KERNEL,
            "nms_sigma": c.NMS_SIGMA,
            "update_thresh": c.UPDATE_THRESH_TEST,
            "max_per_image": c.MAX_PER_IMAGE_TEST,
        }

    @torch.no_grad()
    def __call__(
        self,
        cate_logits: List[torch.Tensor],
        kernels: List[torch.Tensor],
        mask_features: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
        output_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """
        Args:
            cate_logits: per level [B, C, S_l, S_l].
            kernels: per level [B, E * k * k, S_l, S_l].
            mask_features: [B, E, H_m, W_m] at `mask_stride` of the padded input.
            image_sizes: per image (h, w) of the input before padding.
            output_sizes: per image (height, width) of the requested output.
        Returns:
            per image, `Instances` of size `output_sizes[i]` with `pred_masks` (bool [N, H, W]),
            `scores` (float [N]), `pred_classes` (int64 [N]) and `pred_boxes` (tight boxes of
            the masks), sorted by decreasing score.
        """
        scores = flatten_levels([point_nms(x.sigmoid()) for x in cate_logits])  # [B, T, C]
        cell_strides = torch.cat(
            [
                torch.full((x.shape[2] * x.shape[3],), s, device=scores.device)
                for x, s in zip(cate_logits, self.strides)
            ]
        )
        num_images, _, num_classes = scores.shape

        k = min(self.max_mask_candidates, scores.shape[1] * num_classes)
        cand_scores, flat_index = scores.flatten(1).topk(k, dim=1)  # sorted, [B, K]
        # A host read of the largest candidate count, so that no mask is computed for
        # candidates below the threshold (often all of them).
        k = int((cand_scores > self.score_thresh).sum(dim=1).max())
        if k == 0:
            soft = mask_features.new_empty((0, *mask_features.shape[2:]))
            return [
                self._instances(soft, scores.new_empty(0), flat_index.new_empty(0), size, out)
                for size, out in zip(image_sizes, output_sizes)
            ]
        cand_scores, flat_index = cand_scores[:, :k], flat_index[:, :k]
        cells = flat_index // num_classes
        labels = flat_index % num_classes
        valid = cand_scores > self.score_thresh

        kernels = flatten_levels(kernels)  # [B, T, D]
        cand_kernels = kernels.gather(1, cells[..., None].expand(-1, -1, kernels.shape[2]))
        s = self.mask_stride
        extents = [(-(-h // s), -(-w // s)) for h, w in image_sizes]  # ceil
        masks = candidate_masks(
            mask_features,
            cand_kernels,
            extents,
            self.mask_thresh,
            self.mask_thresh * _PASTE_MARGIN,
            valid,
        )
        areas = masks.areas
        valid &= areas > cell_strides[cells]
        cand_scores = cand_scores * (masks.soft_sums / areas.clamp(min=1))  # maskness

        nms = batched_matrix_nms(
            masks.binary,
            labels,
            cand_scores,
            valid,
            kernel=self.nms_kernel,
            sigma=self.nms_sigma,
            score_thresh=self.update_thresh,
            pre_nms_topk=self.pre_nms_topk,
            max_per_image=self.max_per_image,
            mask_areas=areas,
            mask_boxes=masks.boxes,
        )
        counts = nms.valid.sum(dim=1).tolist()  # host read: Instances sizes
        num_kept = max(counts, default=0)
        # The soft masks of the kept candidates where pasting reads them.
        soft = masks.soft_masks(nms.keep[:, :num_kept], nms.valid[:, :num_kept])  # [B, N, Hm, Wm]

        return [
            self._instances(
                soft[i, :n], nms.scores[i, :n], nms.labels[i, :n], image_sizes[i], output_sizes[i]
            )
            for i, n in enumerate(counts)
        ]

    def _instances(self, soft, scores, labels, image_size, output_size) -> Instances:
        """`Instances` of one image from the soft masks [N, Hm, Wm] of its detections."""
        masks, boxes = self._paste(soft, image_size, output_size)
        return detections_to_instances(masks, scores, labels, boxes)

    def _paste(self, soft, image_size, output_size) -> Tuple[torch.Tensor, torch.Tensor]:
        """Soft masks [N, Hm, Wm] -> bool [N, height, width] masks of the requested output and
        their float [N, 4] XYXY tight boxes.

        The result is that of upsampling the masks by `mask_stride` (bilinear), cropping the
        image's own area, resizing it to the output size (bilinear) and thresholding, but each
        mask is processed only inside the window of the output where it can exceed the threshold
        (outside, every soft value it depends on is below `_PASTE_MARGIN` times the threshold).
        Masks with windows of similar sizes are processed together, padded to the largest
        window. The upsampling is F.interpolate of a crop, bit-identical to that of the whole
        map for power-of-two strides; the resizing, where the output size is not the image's,
        gathers and weights pixels as F.interpolate does, identical up to float rounding.
        """
        num = soft.shape[0]
        height, width = output_size
        masks = lazy_zeros((num, height, width), torch.bool, soft.device)
        boxes = torch.zeros((num, 4), device=soft.device)
        if num == 0:
            return masks, boxes
        s = self.mask_stride
        # The mask pixels that bilinear upsampling reads for the image's own pixels.
        rows = min(soft.shape[1], -(-image_size[0] // s) + 1)
        cols = min(soft.shape[2], -(-image_size[1] // s) + 1)
        axis_y = _PasteAxis(image_size[0], height, rows, s, soft.device)
        axis_x = _PasteAxis(image_size[1], width, cols, s, soft.device)
        # Boxes of the pixels above the margin, cut to those that the image's pixels read.
        high = mask_boxes(soft > self.mask_thresh * _PASTE_MARGIN)
        top, bottom = axis_y.windows(high[:, 0], high[:, 2].clamp(max=rows - 1))
        left, right = axis_x.windows(high[:, 1], high[:, 3].clamp(max=cols - 1))
        sizes_y, sizes_x = bottom - top, right - left

        # Group the masks by window size class (powers of two).
        classes = max(height, width).bit_length() + 1
        bins = ceil_log2(sizes_y.clamp(min=1)) * classes + ceil_log2(sizes_x.clamp(min=1))
        nonempty = (sizes_y > 0) & (sizes_x > 0)
        for index, (size_y, size_x) in groups(bins, nonempty, classes * classes, sizes_y, sizes_x):
            y0 = top[index].clamp(max=height - size_y)
            x0 = left[index].clamp(max=width - size_x)
            window = self._window_masks(soft, index, axis_y, axis_x, y0, x0, size_y, size_x)
            # The windows' rows are disjoint runs of the output's pixels.
            rows = _window(index * height + y0, size_y) * width + x0[:, None]
            runs(masks, size_x)[rows.flatten()] = window.view(-1, size_x)
            boxes[index] = _boxes_in_window(window, y0, x0)
        return masks, boxes

    def _window_masks(self, soft, index, axis_y, axis_x, y0, x0, size_y: int, size_x: int):
        """bool [n, size_y, size_x]: the output windows at (y0, x0) (int64 [n]) of the masks
        `index` (int64 [n]) of `soft` [N, Hm, Wm], all of one size."""
        s = self.mask_stride
        crop_y, crop_h = axis_y.crop(y0, size_y)
        crop_x, crop_w = axis_x.crop(x0, size_x)
        rows = _window(index * soft.shape[1] + crop_y, crop_h) * soft.shape[2] + crop_x[:, None]
        crops = runs(soft, crop_w)[rows.flatten()].view(-1, 1, crop_h, crop_w)
        up = F.interpolate(
            crops, size=(crop_h * s, crop_w * s), mode="bilinear", align_corners=False
        )[:, 0]
        # Resizing: columns first, then rows (F.interpolate's order); then the window.
        if axis_x.resized:
            up = axis_x.resample(up, x0, crop_x, size_x)
        if axis_y.resized:
            up = axis_y.resample(up.transpose(1, 2), y0, crop_y, size_y).transpose(1, 2)
        up = (up > self.mask_thresh).contiguous()
        height, width = up.shape[1:]
        rows = _window(torch.arange(len(index), device=up.device) * height, size_y)
        rows = (rows + axis_y.window_start(y0, crop_y)[:, None]) * width
        rows = rows + axis_x.window_start(x0, crop_x)[:, None]
        return runs(up, size_x)[rows.flatten()].view(-1, size_y, size_x)


def _window(start: torch.Tensor, size: int) -> torch.Tensor:
    """int64 [N, size]: positions start .. start + size - 1 of each of N windows."""
    return start[:, None] + torch.arange(size, device=start.device)


class _PasteAxis:
    """One axis (rows or columns) of pasting: mask pixels 0 .. `extent` - 1 are upsampled by
    `stride` (bilinear); of the result, the image's `size` pixels are resized to `out_size`
    (bilinear, align_corners False). Positions along the axis are int64 [N] tensors, one per
    mask; sizes are host ints shared by a group of masks.
    """

    def __init__(self, size: int, out_size: int, extent: int, stride: int, device):
        self.size, self.out_size, self.extent, self.stride = size, out_size, extent, stride
        self.resized = size != out_size
        if self.resized:
            # F.interpolate's source coordinate of each output pixel and its two neighbours.
            scale = torch.tensor(size, dtype=torch.float32, device=device) / out_size
            source = (torch.arange(out_size, device=device) + 0.5) * scale - 0.5
            source = source.clamp(min=0)
            self.first = source.floor().long().clamp(max=size - 1)
            self.second = (self.first + 1).clamp(max=size - 1)
            self.weight = source - self.first  # of the second

    def windows(self, low: torch.Tensor, high: torch.Tensor):
        """Output windows [start, end) (int64 [N] each) outside which a mask whose pixels above
        the paste margin lie in [low, high] (high < low: none) cannot exceed the threshold."""
        s = self.stride
        # Upsampled pixel u reads mask pixels floor((u + 0.5) / s - 0.5) and the next one.
        start = ((low - 1) * s).clamp(0, self.size)
        end = ((high + 2) * s).clamp(0, self.size)
        if self.resized:
            start = torch.searchsorted(self.second, start)
            end = torch.searchsorted(self.first, end - 1, right=True)
        return start, torch.where(high >= low, end, start)

    def crop(self, start: torch.Tensor, size: int) -> Tuple[torch.Tensor, int]:
        """The mask pixels [crop_start, crop_start + crop_size) to upsample for the output
        windows [start, start + size): crop_start int64 [N], crop_size a host int."""
        s = self.stride
        # The windows read upsampled pixels first .. first + span at most.
        if self.resized:
            first = self.first[start]
            span = math.ceil((size - 1) * self.size / self.out_size) + 3  # +1: float rounding
        else:
            first, span = start, size - 1
        # Upsampled pixel u reads mask pixels u // s - 1 .. u // s + 1 at most: the windows read
        # no mask pixel outside the crop, and no upsampled pixel that F.interpolate's clamping at
        # the crop's borders (unlike the whole map's) changes.
        crop_size = min(self.extent, span // s + 4)
        return (first // s - 1).clamp(0, self.extent - crop_size), crop_size

    def resample(self, x, start, crop_start, size: int) -> torch.Tensor:
        """Resize along the last dim: output pixels [start, start + size) of upsampled crops x
        (float [N, R, C], starting at upsampled pixel crop_start * stride)."""
        offset = (crop_start * self.stride)[:, None]
        position = _window(start, size)
        shape = (*x.shape[:2], size)
        first = (self.first[position] - offset)[:, None].expand(shape)
        second = (self.second[position] - offset)[:, None].expand(shape)
        weight = self.weight[position][:, None]
        return x.gather(2, first) * (1 - weight) + x.gather(2, second) * weight

    def window_start(self, start, crop_start) -> torch.Tensor:
        """int64 [N]: where output pixel `start` is in upsampled crops (starting at upsampled
        pixel crop_start * stride) that were resized if needed."""
        if self.resized:
            return torch.zeros_like(start)
        return start - crop_start * self.stride
