"""SOLOv2 inference for a batch: from head outputs to detectron2 `Instances`, as the paper's steps.

The steps are those of the paper and the reference implementations (see `SOLOv2PostProcessor`),
batched over images: candidates are padded to the largest count in the batch and carried with a
validity mask, and each image's mask pixels are limited to the extent that the network computed
for it. The candidates' masks are reached through :class:`~.masks.CandidateMasks`, whose plain
computation is the spec; a faster one (the CPU's) may stand in for it with the same results.
"""
import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ..layers.dynamic_conv import flatten_levels
from .masks import CandidateMasks, main_part_boxes, masks_to_boxes
from .matrix_nms import batched_matrix_nms, sort_descending

__all__ = [
    "Detections",
    "SOLOv2PostProcessor",
    "detections_to_instances",
    "masks_to_boxes",
    "point_nms",
]

logger = logging.getLogger(__name__)


def point_nms(scores: torch.Tensor) -> torch.Tensor:
    """Keep a score only where it is the maximum of its 2 x 2 neighbourhood (up and left).

    Args:
        scores: [B, C, S, S] category probabilities.
    Returns:
        [B, C, S, S], scores that are not local maxima set to 0.
    """
    # The maximum over (i - 1, i) x (j - 1, j), as max_pool2d(kernel 2, stride 1, padding 1)
    # cropped to the grid, by two shifted maxima: several times faster on the CPU.
    lowest = float("-inf")
    pooled = torch.maximum(scores, F.pad(scores[..., :-1, :], (0, 0, 1, 0), value=lowest))
    pooled = torch.maximum(pooled, F.pad(pooled[..., :-1], (1, 0), value=lowest))
    return scores * (pooled == scores)


def detections_to_instances(
    masks: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    boxes: Optional[torch.Tensor] = None,
) -> Instances:
    """The output format: `Instances` of the masks' size with `pred_masks` (bool [N, H, W]),
    `scores` (float32 [N]), `pred_classes` (int64 [N]) and `pred_boxes` (the masks' tight boxes,
    so that box AP can be evaluated; computed from `masks` unless given as float [N, 4])."""
    result = Instances(tuple(masks.shape[-2:]))
    result.pred_masks = masks
    result.scores = scores
    result.pred_classes = classes
    result.pred_boxes = Boxes(masks_to_boxes(masks) if boxes is None else boxes)
    return result


class Detections(NamedTuple):
    """Padded per-image detections before pasting, sorted by descending score.

    scores: float32 [B, M]; labels: int64 [B, M]; valid: bool [B, M] (valid entries first);
    soft_masks: float32 [B, M, H_m, W_m] mask probabilities at the mask feature's resolution
        (see `KeptMasks.probs`);
    near_lines: None or the rows and columns of each mask near the threshold (`KeptMasks`);
    masks: the `CandidateMasks` that computed them, which pastes them.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    soft_masks: torch.Tensor
    near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]]
    masks: CandidateMasks


class _Ranked(NamedTuple):
    """Candidates, each [B, n]: scores, cells, labels, valid; and their binary masks in the form
    of the `CandidateMasks` that computed them."""

    scores: torch.Tensor
    cells: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    binary: object


class SOLOv2PostProcessor:
    """Turns SOLOv2 head outputs for a batch into per-image `Instances`.

    The steps, per image as in the reference implementations, run batched:

    1. category probabilities (sigmoid) and point NMS on every level's grid;
    2. candidates: every (cell, class) pair scoring above `score_thresh`;
    3. their masks, sigmoid of one batched dynamic convolution of the mask features with the
       cells' kernels, binarised at `mask_thresh`;
    4. candidates whose binary mask is not larger than their level's stride are dropped;
    5. maskness: each score is multiplied by the mean probability inside its binary mask;
    6. the top `pre_nms_topk` by score, label-aware Matrix NMS, scores below `update_thresh`
       dropped, the top `max_per_image` kept;
    7. their masks upsampled by `mask_stride`, cropped to the image, resized to the requested
       output size (bilinear) and thresholded; boxes are the masks' tight boxes (or those of
       their main parts, not widened by stray fragments: `box_from`).

    Memory is bounded without dropping candidates: masks are computed a chunk of candidates at
    a time; scores and binary masks are pooled and the pool is cut to the top `pre_nms_topk`
    whenever it exceeds twice that (steps 3-6); the soft masks of the kept detections are
    computed again for the output. `max_candidates` > 0 caps the candidates by category score
    before any mask exists (off by default: it changes results where more candidates pass).
    `fixed_candidates` > 0 gives the candidates a static count instead (for export, where no
    size may depend on the data): exactly that many, padded with invalid entries, so that
    results are unchanged for images with at most that many candidates.

    Computation is float32 whatever the dtype of the head outputs (float16 under autocast), so
    areas, sums and intersection counts are exact up to 2^24 pixels.

    After each call, `last_paths` says which computation each mask step took ("plain",
    "blocks", "int8", "cropped"; logged at debug level).
    """

    @configurable
    def __init__(
        self,
        *,
        strides: Sequence[int],
        mask_stride: int,
        score_thresh: float = 0.1,
        mask_thresh: float = 0.5,
        pre_nms_topk: int = 500,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        update_thresh: float = 0.05,
        max_per_image: int = 100,
        max_candidates: int = 0,
        chunk_size: int = 256,
        fixed_candidates: int = 0,
        inference_path: str = "auto",
        fast_masks: Optional[Type[CandidateMasks]] = None,
        box_from: str = "tight",
        min_part_fraction: float = 0.1,
    ):
        """
        Args:
            strides: per level, the stride whose value is the minimum mask area (in mask-feature
                pixels) for that level's candidates.
            mask_stride: stride of the mask feature relative to the input.
            score_thresh: minimum category score of a candidate.
            mask_thresh: binarisation threshold of the mask probabilities, in [0, 1).
            pre_nms_topk: candidates, by rescored score, that enter Matrix NMS.
            nms_kernel, nms_sigma: Matrix NMS kernel ("gaussian" or "linear") and sigma.
            update_thresh: minimum score after Matrix NMS.
            max_per_image: detections per image.
            max_candidates: if > 0, at most this many candidates per image (by category score).
            chunk_size: candidates whose masks are computed at once.
            fixed_candidates: if > 0, the static number of candidates per image (the top by
                category score); 0: as many as the image of the batch with the most.
            inference_path: "plain", every pixel of every mask as specified above; "fast", the
                faster computation `fast_masks` wherever it applies, with the same results;
                "auto", `fast_masks` decides where it pays.
            fast_masks: a faster `CandidateMasks` with a `choose` class method (the model
                passes the CPU's, from :mod:`solov2_d2.inference.cpu`); None: always plain.
            box_from: "tight", the masks' tight boxes; "main_parts", the boxes of the masks'
                main parts, not widened by fragments smaller than `min_part_fraction` of the
                mask (:func:`~.masks.main_part_boxes`).
        """
        if box_from not in ("tight", "main_parts"):
            raise ValueError(
                f"MODEL.SOLOV2.BOX_FROM = {box_from!r}; expected 'tight' or 'main_parts'."
            )
        self.strides = list(strides)
        self.mask_stride = mask_stride
        self.score_thresh = score_thresh
        self.mask_thresh = mask_thresh
        self.pre_nms_topk = pre_nms_topk
        self.nms_kernel = nms_kernel
        self.nms_sigma = nms_sigma
        self.update_thresh = update_thresh
        self.max_per_image = max_per_image
        self.max_candidates = max_candidates
        self.chunk_size = chunk_size
        self.fixed_candidates = fixed_candidates
        self.inference_path = inference_path
        self.fast_masks = fast_masks
        self.box_from = box_from
        self.min_part_fraction = min_part_fraction
        self.last_paths: dict = {}

    @classmethod
    def from_config(cls, cfg, mask_stride: int, fast_masks=None):
        c = cfg.MODEL.SOLOV2
        return {
            "strides": c.INSTANCE_STRIDES,
            "mask_stride": mask_stride,
            "score_thresh": c.SCORE_THRESH_TEST,
            "mask_thresh": c.MASK_THRESH_TEST,
            "pre_nms_topk": c.PRE_NMS_TOPK_TEST,
            "nms_kernel": c.NMS_KERNEL,
            "nms_sigma": c.NMS_SIGMA,
            "update_thresh": c.UPDATE_THRESH_TEST,
            "max_per_image": c.MAX_PER_IMAGE_TEST,
            "max_candidates": c.MAX_MASK_CANDIDATES,
            "chunk_size": c.MASK_CHUNK_SIZE,
            "inference_path": c.INFERENCE_PATH,
            "fast_masks": fast_masks,
            "box_from": c.BOX_FROM,
            "min_part_fraction": c.BOX_MIN_PART_FRACTION,
        }

    @torch.no_grad()
    def __call__(
        self,
        cate_logits: List[torch.Tensor],
        kernels: List[torch.Tensor],
        mask_features: torch.Tensor,
        mask_extents: Sequence[Tuple[int, int]],
        image_sizes: Sequence[Tuple[int, int]],
        output_sizes: Sequence[Tuple[int, int]],
    ) -> List[Instances]:
        """
        Args:
            cate_logits: per level [B, C, S_l, S_l].
            kernels: per level [B, E * k * k, S_l, S_l].
            mask_features: [B, E, H_m, W_m] at `mask_stride` of the padded input.
            mask_extents: per image (h_m, w_m), the part of the mask features computed for the
                image (its own padded input, divided by `mask_stride`); `detect` also takes them
                as an int64 [B, 2] tensor.
            image_sizes: per image (h, w) of the input before padding.
            output_sizes: per image (height, width) of the requested output.
        Returns:
            per image, `Instances` of size `output_sizes[i]` with `pred_masks` (bool [N, H, W]),
            `scores` (float32 [N]), `pred_classes` (int64 [N]) and `pred_boxes` (tight boxes of
            the masks, or of their main parts: `box_from`), sorted by decreasing score.
        """
        found = self.detect(cate_logits, kernels, mask_features, mask_extents)
        counts = found.valid.sum(dim=1).tolist()  # host read: the sizes of the Instances
        results = []
        for i, n in enumerate(counts):  # step 7, one image at a time (each its own size)
            h_m, w_m = mask_extents[i]
            probs = found.soft_masks[i, :n, :h_m, :w_m]
            lines = None
            if found.near_lines is not None:
                lines = (found.near_lines[0][i, :n, :h_m], found.near_lines[1][i, :n, :w_m])
            masks, boxes = found.masks.paste(probs, image_sizes[i], output_sizes[i], lines)
            boxes = self.detection_boxes(masks, boxes, probs, image_sizes[i])
            scores, labels = found.scores[i, :n], found.labels[i, :n]
            results.append(detections_to_instances(masks, scores, labels, boxes))
        self.last_paths = dict(found.masks.paths)
        logger.debug(f"SOLOv2 post-processing took {self.last_paths}")
        return results

    def detection_boxes(self, masks, tight_boxes, probs, image_size) -> torch.Tensor:
        """The boxes of pasted masks that BOX_FROM asks for.

        Args:
            masks: bool [N, H, W], pasted at the output size.
            tight_boxes: float32 [N, 4], their tight boxes (as pasting gives them).
            probs: float32 [N, h_m, w_m], their probabilities on the image's extent at the mask
                features' resolution.
            image_size: (h, w) of the input image.
        Returns:
            float32 [N, 4] XYXY: `tight_boxes`, or the main parts' boxes
            (:func:`~.masks.main_part_boxes`).
        """
        if self.box_from == "tight":
            return tight_boxes
        return main_part_boxes(
            masks, probs, self.mask_thresh, image_size, self.mask_stride, self.min_part_fraction
        )

    @torch.no_grad()
    def detect(self, cate_logits, kernels, mask_features, mask_extents) -> Detections:
        """Steps 1-6 for the batch (arguments as in `__call__`)."""
        device = mask_features.device
        with torch.autocast(device.type, enabled=False):
            cate_logits = [x.float() for x in cate_logits]
            kernels = flatten_levels([x.float() for x in kernels])  # [B, T, D]
            mask_features = mask_features.float()

            # Steps 1-2.
            scores = flatten_levels([point_nms(x.sigmoid()) for x in cate_logits])  # [B, T, C]
            scores, cells, labels, valid = self._candidates(scores)  # [B, K] each
            cell_strides = torch.cat(
                [
                    torch.full((x.shape[2] * x.shape[3],), float(s), device=device)
                    for x, s in zip(cate_logits, self.strides)
                ]
            )
            cell_kernels = _cell_kernels(kernels, cells)  # [B, K, D]
            inside = _pixels_inside(mask_extents, mask_features.shape[-2:], device)
            masks = self._candidate_masks(mask_features, inside, cell_kernels, valid)

            # Steps 3-6, a chunk of candidates at a time: a chunk's masks give its scores, and
            # the candidates pooled so far are cut to the top `pre_nms_topk` whenever they
            # exceed twice that, keeping the binary masks that Matrix NMS needs.
            pool, pooled = [], 0
            size = masks.scoring_chunk_size
            for start in range(0, max(cells.shape[1], 1), size):
                part = slice(start, start + size)
                areas, sums, binary = masks.score(cell_kernels[:, part], valid[:, part])
                pool.append(
                    _Ranked(
                        scores[:, part] * (sums / areas.clamp(min=1)),  # step 5: maskness
                        cells[:, part],
                        labels[:, part],
                        valid[:, part] & (areas > cell_strides[cells[:, part]]),  # step 4
                        binary,
                    )
                )
                pooled += pool[-1].cells.shape[1]
                if pooled > 2 * self.pre_nms_topk:
                    pool = [self._top(pool, masks)]
                    pooled = pool[0].cells.shape[1]
            scores, cells, labels, valid, binary = self._top(pool, masks)
            nms = batched_matrix_nms(
                None,
                labels,
                scores,
                valid,
                kernel=self.nms_kernel,
                sigma=self.nms_sigma,
                score_thresh=self.update_thresh,
                max_per_image=self.max_per_image,
                intersections=masks.intersections(binary),
            )
            keep = nms.keep
            if self.fixed_candidates == 0:
                # Host read: no output mask is computed for padding (an export keeps the shape).
                keep = keep[:, : int(nms.valid.sum(dim=1).max())]
            width = keep.shape[1]
            kept_kernels = _cell_kernels(kernels, cells.gather(1, keep))
            kept = masks.kept(kept_kernels, masks.select(binary, keep))
            return Detections(
                scores=nms.scores[:, :width],
                labels=nms.labels[:, :width],
                valid=nms.valid[:, :width],
                soft_masks=kept.probs.view(*keep.shape, *mask_features.shape[-2:]),
                near_lines=kept.near_lines,
                masks=masks,
            )

    def _candidate_masks(self, mask_features, inside, kernels, valid) -> CandidateMasks:
        """How this batch's candidate masks are computed: the only place that chooses.

        The plain computation with `inference_path` "plain" or without `fast_masks`; else the
        one `fast_masks.choose` gives for the candidates' kernels [B, K, D] (valid: bool
        [B, K]), forced with "fast".
        """
        args = (mask_features, inside, self.mask_thresh, self.mask_stride, self.chunk_size)
        if self.inference_path == "plain" or self.fast_masks is None:
            return CandidateMasks(*args)
        force = self.inference_path == "fast"
        return self.fast_masks.choose(*args, kernels=kernels, valid=valid, force=force)

    def _candidates(self, scores: torch.Tensor):
        """Step 2: (cell, class) pairs above the score threshold, from scores [B, T, C].

        Returns float32 scores, int64 cells, int64 labels and bool valid, each [B, K], with K the
        largest candidate count of an image, or `fixed_candidates` if set (capped by
        `max_candidates` if set).
        """
        flat = scores.flatten(1)
        if self.fixed_candidates > 0:
            count = min(self.fixed_candidates, flat.shape[1])
        else:
            count = int((flat > self.score_thresh).sum(dim=1).max())  # host read: the padded size
        if self.max_candidates > 0:
            count = min(count, self.max_candidates)
        top, index = flat.topk(count, dim=1)
        # In (cell, class) order, so that later stable sorts break ties as the references do.
        index, order = index.sort(dim=1)
        top = top.gather(1, order)
        num_classes = scores.shape[2]
        return top, index // num_classes, index % num_classes, top > self.score_thresh

    def _top(self, pool: List[_Ranked], masks: CandidateMasks) -> _Ranked:
        """The top `pre_nms_topk` valid candidates of the pool by descending score; ties keep
        their order in the pool (that of the candidates)."""
        if len(pool) == 1:
            merged = pool[0]
        else:
            columns = [torch.cat(x, dim=1) for x in zip(*(p[:4] for p in pool))]
            merged = _Ranked(*columns, masks.cat([p.binary for p in pool]))
        order = sort_descending(merged.scores, merged.valid)
        if self.pre_nms_topk > 0:
            order = order[:, : self.pre_nms_topk]
        kept = [x.gather(1, order) for x in merged[:4]]
        return _Ranked(*kept, masks.select(merged.binary, order))


def _cell_kernels(kernels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The kernels [B, n, D] of the cells int64 [B, n], out of all cells' kernels [B, T, D]."""
    return kernels.gather(1, cells[..., None].expand(-1, -1, kernels.shape[2]))


def _pixels_inside(mask_extents, size, device) -> Optional[torch.Tensor]:
    """float32 [B, 1, H_m * W_m]: 1 for the mask pixels inside each image's extent, else 0; None
    when every image covers the whole map (known on the host unless the extents are a tensor, as
    in the exported graph)."""
    as_data = torch.is_tensor(mask_extents)
    if not as_data and all(tuple(e) == tuple(size) for e in mask_extents):
        return None
    rows = torch.arange(size[0], device=device)
    cols = torch.arange(size[1], device=device)
    if as_data:
        extents = mask_extents[:, :, None]  # [B, 2, 1]
        inside = (rows[:, None] < extents[:, :1]) & (cols < extents[:, 1:])  # [B, H_m, W_m]
        return inside.flatten(1)[:, None].float()
    inside = [(rows[:, None] < h) & (cols[None, :] < w) for h, w in mask_extents]
    return torch.stack(inside).flatten(1)[:, None].float()
