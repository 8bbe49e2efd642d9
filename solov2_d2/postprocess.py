"""SOLOv2 inference for a whole batch: from head outputs to detectron2 `Instances`."""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from .heads import dynamic_mask_logits, flatten_levels
from .matrix_nms import batched_matrix_nms

__all__ = ["SOLOv2PostProcessor", "detections_to_instances", "masks_to_boxes", "point_nms"]


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
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    cols = masks.any(dim=1)  # [N, W]
    rows = masks.any(dim=2)  # [N, H]
    # argmax returns the first True; on the flipped axis it finds the last one.
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * cols.any(dim=1, keepdim=True)


def detections_to_instances(
    masks: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor
) -> Instances:
    """The output format: `Instances` of the masks' size with `pred_masks` (bool [N, H, W]),
    `scores` (float [N]), `pred_classes` (int64 [N]) and `pred_boxes` (the masks' tight boxes,
    so that box AP can be evaluated)."""
    result = Instances(tuple(masks.shape[-2:]))
    result.pred_masks = masks
    result.scores = scores
    result.pred_classes = classes
    result.pred_boxes = Boxes(masks_to_boxes(masks))
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
            mask_thresh: binarisation threshold of the soft masks.
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
        kernels = flatten_levels(kernels)  # [B, T, D]
        cell_strides = torch.cat(
            [
                torch.full((x.shape[2] * x.shape[3],), s, device=scores.device)
                for x, s in zip(cate_logits, self.strides)
            ]
        )
        num_images, _, num_classes = scores.shape

        k = min(self.max_mask_candidates, scores.shape[1] * num_classes)
        cand_scores, flat_index = scores.flatten(1).topk(k, dim=1)  # sorted, [B, K]
        cells = flat_index // num_classes
        labels = flat_index % num_classes
        valid = cand_scores > self.score_thresh

        cand_kernels = kernels.gather(1, cells[..., None].expand(-1, -1, kernels.shape[2]))
        soft = dynamic_mask_logits(mask_features, cand_kernels).sigmoid_()  # [B, K, Hm, Wm]
        binary = (soft > self.mask_thresh) & self._image_areas(image_sizes, soft)
        areas = binary.sum(dim=(2, 3))
        valid &= areas > cell_strides[cells]
        maskness = (soft * binary).sum(dim=(2, 3)) / areas.clamp(min=1)
        cand_scores = cand_scores * maskness

        nms = batched_matrix_nms(
            binary,
            labels,
            cand_scores,
            valid,
            kernel=self.nms_kernel,
            sigma=self.nms_sigma,
            score_thresh=self.update_thresh,
            pre_nms_topk=self.pre_nms_topk,
            max_per_image=self.max_per_image,
            mask_areas=areas,
        )
        kept_masks = soft.gather(
            1, nms.keep[..., None, None].expand(-1, -1, *soft.shape[-2:])
        )  # [B, K', Hm, Wm]
        counts = nms.valid.sum(dim=1).tolist()  # the one host sync: Instances sizes

        return [
            detections_to_instances(
                self._paste(kept_masks[i, : counts[i]], image_sizes[i], output_sizes[i]),
                nms.scores[i, : counts[i]],
                nms.labels[i, : counts[i]],
            )
            for i in range(num_images)
        ]

    def _image_areas(self, image_sizes, masks: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, Hm, Wm]: the pixels of `masks` [B, K, Hm, Wm] that cover each image
        (not the batch padding)."""
        hm, wm = masks.shape[-2:]
        sizes = torch.tensor(image_sizes, device=masks.device)
        extent = (sizes + self.mask_stride - 1) // self.mask_stride  # [B, 2], ceil
        rows = torch.arange(hm, device=sizes.device) < extent[:, :1]  # [B, Hm]
        cols = torch.arange(wm, device=sizes.device) < extent[:, 1:]  # [B, Wm]
        return (rows[:, :, None] & cols[:, None, :])[:, None]

    def _paste(self, soft, image_size, output_size) -> torch.Tensor:
        """Soft masks [N, Hm, Wm] -> bool [N, height, width] masks of the requested output.

        Upsampled by `mask_stride` (bilinear), cropped to the image's own area and resized to
        the output size, then thresholded. Only the rows and columns that bilinear upsampling
        reads for the image's own pixels (its extent plus one) are upsampled: the result is
        identical to upsampling the whole padded map, for less work.
        """
        h, w = image_size
        if soft.shape[0] == 0:
            return torch.zeros((0, *output_size), dtype=torch.bool, device=soft.device)
        s = self.mask_stride
        rows = min(soft.shape[1], -(-h // s) + 1)
        cols = min(soft.shape[2], -(-w // s) + 1)
        x = F.interpolate(
            soft[None, :, :rows, :cols],
            size=(rows * s, cols * s),
            mode="bilinear",
            align_corners=False,
        )[..., :h, :w]
        if (h, w) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return x[0] > self.mask_thresh
