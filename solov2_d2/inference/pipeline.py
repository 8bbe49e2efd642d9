"""SOLOv2 inference for a batch: from head outputs to detectron2 `Instances`.

The steps are those of the paper and the reference implementations (see `SOLOv2PostProcessor`),
written once, batched over images: candidates are padded to the largest count in the batch and
carried with a validity mask, and each image's mask pixels are limited to the extent that the
network computed for it.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ..layers.dynamic_conv import dynamic_mask_logits, flatten_levels
from .boxes import masks_to_boxes
from .cpu.block_groups import MIN_PRODUCT_ROWS
from .cpu.block_scoring import DENSE_FRACTION, BlockBits, MaskBlocks
from .cpu.buffers import thread_scratch
from .cpu.cropped_paste import NEAR_MARGIN, paste_cropped
from .matrix_nms import matrix_nms_decay, sort_descending

__all__ = [
    "Detections",
    "SOLOv2PostProcessor",
    "detections_to_instances",
    "masks_to_boxes",
    "point_nms",
]

# Pasting works on at most this many bytes of float masks at a time, so that the memory of a
# huge output image is its bool masks plus this.
_PASTE_CHUNK_BYTES = 1 << 24
# Cropped pasting pads a chunk's crops to their largest size: smaller chunks pad less.
_CROP_CHUNK_BYTES = 1 << 22
# Below these amounts of work the fast paths' fixed costs outweigh what they save on the CPU
# (README, "Speed"): candidates x mask pixels for mask scoring, masks x output pixels for pasting.
_BLOCKS_LEAST_WORK = 1 << 22
_CROP_LEAST_WORK = 1 << 24
# Candidates whose bounds decide at once whether mask scoring may take its fast path.
_SAMPLE = 64


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


def _cell_kernels(kernels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The kernels [B, n, D] of the cells int64 [B, n], out of all cells' kernels [B, T, D]."""
    return kernels.gather(1, cells[..., None].expand(-1, -1, kernels.shape[2]))


def _cat_masks(parts: list):
    """Binary masks of the pool one after the other: `BlockBits` if all are, else bool
    [B, n, P] (`BlockBits` made dense)."""
    if all(isinstance(p, BlockBits) for p in parts):
        return BlockBits.cat(parts)
    return torch.cat([p.dense() if isinstance(p, BlockBits) else p for p in parts], dim=1)


def _select_masks(masks, order: torch.Tensor):
    """The masks int64 [B, k] of each image of binary masks [B, n, P] (bool or `BlockBits`)."""
    if isinstance(masks, BlockBits):
        return masks.select(order)
    # Rows by advanced indexing: whole masks copied, much faster than a gather.
    return masks[torch.arange(order.shape[0], device=order.device)[:, None], order]


def _row_sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sums [B, n] over the last dimension of x [B, n, P], accumulated in `dtype`.

    Used for areas (int32 counts of bool masks) and for probability sums in float64, exact for
    probabilities that are 0 or above a threshold >= 1/64 (multiples of 2^-29, of which 2^24
    need 53 bits): exact sums depend neither on the order of the pixels nor on batch padding.
    """
    if torch.compiler.is_exporting():  # the sizes are symbolic there
        return x.sum(dim=2, dtype=dtype)
    # A few rows at a time: a cast copy of a whole chunk would be a fresh allocation each time,
    # slow to fault in.
    rows = max(1, (1 << 24) // max(1, 8 * x.shape[0] * x.shape[2]))
    return torch.cat([part.sum(dim=2, dtype=dtype) for part in x.split(rows, dim=1)], dim=1)


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
        (the fast path may leave 0 at pixels that are not above the threshold minus
        `NEAR_MARGIN` nor next to one: pasting gives the same masks);
    near_lines: bool [B, M, H_m] and [B, M, W_m], the rows and columns of each mask with a
        probability above the threshold minus `NEAR_MARGIN`, where the fast path knows them
        (else None).
    """

    scores: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    soft_masks: torch.Tensor
    near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class _Ranked(NamedTuple):
    """Candidates, each [B, n]: scores, cells, labels, valid; binary masks [B, n, H_m * W_m]
    (bool, or `BlockBits` on the fast path)."""

    scores: torch.Tensor
    cells: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    binary: Union[torch.Tensor, BlockBits]


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
       output size (bilinear) and thresholded; boxes are the masks' tight boxes.

    Memory is bounded without dropping candidates: masks are computed for `chunk_size`
    candidates at a time; scores and binary masks are pooled and the pool is cut to the top
    `pre_nms_topk` whenever it exceeds twice that (steps 3-6); the soft masks of the kept
    detections are computed again for the output. `max_candidates` > 0 caps the candidates by
    category score before any mask exists (off by default: it changes results where more
    candidates pass). `fixed_candidates`
    > 0 gives the candidates a static count instead (for export, where no size may depend on the
    data): exactly that many, padded with invalid entries, so that results are unchanged for
    images with at most that many candidates.

    Computation is float32 whatever the dtype of the head outputs (float16 under autocast), so
    areas, sums and intersection counts are exact up to 2^24 pixels.
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
            inference_path: "plain", every pixel of every mask as specified above; "fast",
                only the blocks of pixels where a mask may pass the threshold, when scoring
                candidates (:class:`MaskBlocks`) and when pasting where the output has the
                input's size (:func:`paste_cropped`), with the same results (each falls back to
                the plain path where most pixels may pass); "auto", fast on the CPU outside an
                export where the work is large enough for it to pay, and plain elsewhere.
        """
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

    @classmethod
    def from_config(cls, cfg, mask_stride: int):
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
            the masks), sorted by decreasing score.
        """
        found = self.detect(cate_logits, kernels, mask_features, mask_extents)
        counts = found.valid.sum(dim=1).tolist()  # host read: the sizes of the Instances
        results = []
        for i, n in enumerate(counts):
            h_m, w_m = mask_extents[i]
            soft = found.soft_masks[i, :n, :h_m, :w_m]
            lines = None
            if found.near_lines is not None:
                lines = (found.near_lines[0][i, :n, :h_m], found.near_lines[1][i, :n, :w_m])
            masks, boxes = self.paste(soft, image_sizes[i], output_sizes[i], lines)
            results.append(
                detections_to_instances(masks, found.scores[i, :n], found.labels[i, :n], boxes)
            )
        return results

    @torch.no_grad()
    def detect(
        self,
        cate_logits: List[torch.Tensor],
        kernels: List[torch.Tensor],
        mask_features: torch.Tensor,
        mask_extents: Sequence[Tuple[int, int]],
    ) -> Detections:
        """Steps 1-6 for the batch (arguments as in `__call__`)."""
        device = mask_features.device
        with torch.autocast(device.type, enabled=False):
            cate_logits = [x.float() for x in cate_logits]
            kernels = flatten_levels([x.float() for x in kernels])  # [B, T, D]
            mask_features = mask_features.float()
            inside = self._pixels_inside(mask_extents, mask_features.shape[-2:], device)

            scores = flatten_levels([point_nms(x.sigmoid()) for x in cate_logits])  # [B, T, C]
            scores, cells, labels, valid = self._candidates(scores)  # [B, K] each
            cell_strides = torch.cat(
                [
                    torch.full((x.shape[2] * x.shape[3],), float(s), device=device)
                    for x, s in zip(cate_logits, self.strides)
                ]
            )
            # Steps 3-6 a chunk of candidates at a time: a chunk's masks give its scores, and
            # the candidates pooled so far are cut to the top `pre_nms_topk` whenever they
            # exceed twice that, keeping the binary masks that Matrix NMS needs.
            blocks = self._mask_blocks(mask_features, kernels, inside, cells, valid)
            pool, pooled = [], 0
            chunks = self._scored_chunks(mask_features, kernels, cells, valid, inside, blocks)
            for part, areas, soft_sums, binary in chunks:
                pool.append(
                    _Ranked(
                        scores[:, part] * (soft_sums / areas.clamp(min=1)),  # maskness
                        cells[:, part],
                        labels[:, part],
                        valid[:, part] & (areas > cell_strides[cells[:, part]]),
                        binary,
                    )
                )
                pooled += binary.shape[1]
                if pooled > 2 * self.pre_nms_topk:
                    pool = [self._top(pool)]
                    pooled = pool[0].binary.shape[1]
            scores, cells, labels, valid, binary = self._top(pool)
            sparse = isinstance(binary, BlockBits)
            decay = matrix_nms_decay(
                binary,
                labels,
                valid,
                kernel=self.nms_kernel,
                sigma=self.nms_sigma,
                intersections=binary.intersections(blocks.scratch) if sparse else None,
            )
            scores = scores * decay
            valid &= scores >= self.update_thresh

            rank = sort_descending(scores, valid)
            if self.max_per_image > 0:
                rank = rank[:, : self.max_per_image]
            if self.fixed_candidates == 0:
                # Host read: no output mask is computed for padding (an export keeps the shape).
                rank = rank[:, : int(valid.sum(dim=1).max())]
            scores, cells, labels, valid = (
                x.gather(1, rank) for x in (scores, cells, labels, valid)
            )
            # The fast path computes the kept masks only near their pixels above the threshold,
            # which is all that pasting reads, from the blocks that scoring kept where it can.
            near = self.mask_thresh - NEAR_MARGIN
            kept = None
            if blocks is not None:
                known = binary.select(rank) if sparse else None
                kept = blocks.probs(_cell_kernels(kernels, cells), near, known)
            if kept is None:
                parts = self._chunks(cells.shape[1])
                soft = torch.cat(
                    [self._mask_probs(mask_features, kernels, cells[:, p], inside) for p in parts],
                    dim=1,
                )
            else:
                soft = kept.probs
            return Detections(
                scores=scores.masked_fill(~valid, 0),
                labels=labels.masked_fill(~valid, -1),
                valid=valid,
                soft_masks=soft.view(*cells.shape, *mask_features.shape[-2:]),
                near_lines=None if kept is None else (kept.rows, kept.cols),
            )

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

    @staticmethod
    def _pixels_inside(mask_extents, size, device) -> Optional[torch.Tensor]:
        """float32 [B, 1, H_m * W_m]: 1 for the mask pixels inside each image's extent, else 0;
        None when every image covers the whole map (known on the host unless the extents are
        a tensor, as in the exported graph)."""
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

    def _chunks(self, count: int, size: int = 0, start: int = 0) -> List[slice]:
        """Slices of `size` (default `chunk_size`) candidates out of `count` from `start` (one,
        empty, if there is none)."""
        size = size or self.chunk_size
        stop = start + count
        return [slice(i, min(i + size, stop)) for i in range(start, max(stop, start + 1), size)]

    def _fast(self, device: torch.device, work: int, least_work: int) -> bool:
        """Whether a fast path runs (`inference_path`): with "auto", on the CPU outside an export
        where its plain counterpart has at least `least_work` units of work (below that, the
        fast path's fixed costs outweigh what it saves)."""
        if self.inference_path == "auto":
            cpu = device.type == "cpu" and not torch.compiler.is_exporting()
            return cpu and work >= least_work
        return self.inference_path == "fast"

    def _mask_blocks(self, mask_features, kernels, inside, cells, valid) -> Optional[MaskBlocks]:
        """The fast path of steps 3-4 for the candidates `cells` [B, K] (valid: bool [B, K]) of
        this batch, or None (also for kernels larger than 1 x 1)."""
        work = cells.shape[1] * mask_features.shape[2] * mask_features.shape[3]
        fast = self._fast(mask_features.device, work, _BLOCKS_LEAST_WORK)
        if not fast or kernels.shape[2] != mask_features.shape[1]:
            return None
        blocks = MaskBlocks(mask_features, inside, thread_scratch())
        # Where most blocks of a sample of the candidates may pass (large masks), the chunks
        # would take the plain path after computing their bounds: skip that work at once.
        step = max(1, cells.shape[1] // _SAMPLE)
        sample = _cell_kernels(kernels, cells[:, ::step])
        if blocks.pass_fraction(sample, valid[:, ::step], self.mask_thresh) > DENSE_FRACTION:
            return None
        return blocks

    def _scored_chunks(self, mask_features, kernels, cells, valid, inside, blocks):
        """Steps 3-4, a chunk of candidates at a time. Yields per chunk its slice of the
        candidates `cells` [B, K] (valid: bool [B, K]), float32 areas [B, n], float32 sums of
        the probabilities above the threshold [B, n] and binary masks [B, n, H_m * W_m] (bool, or
        `BlockBits`).

        The fast path (`blocks`, from `_mask_blocks`) takes 4 x `chunk_size` candidates at a time
        (it holds at most bool masks where the plain path holds float32 probabilities) and gives
        the same results; chunks where most pixels may pass take the plain path, `chunk_size` at
        a time.
        """
        size = 4 * self.chunk_size if blocks is not None else self.chunk_size
        for part in self._chunks(cells.shape[1], size):
            if blocks is not None:
                chunk = _cell_kernels(kernels, cells[:, part])
                found = blocks.score(chunk, valid[:, part], self.mask_thresh)
                if found is not None:
                    areas, soft_sums, binary = found
                    yield part, areas.float(), soft_sums.float(), binary
                    continue
            for sub in self._chunks(part.stop - part.start, start=part.start):
                probs = self._mask_probs(mask_features, kernels, cells[:, sub], inside)
                binary = probs > self.mask_thresh
                areas = _row_sums(binary, torch.int32).float()
                soft_sums = _row_sums(F.threshold_(probs, self.mask_thresh, 0.0), torch.float64)
                yield sub, areas, soft_sums.float(), binary

    def _mask_probs(self, mask_features, kernels, cells, inside) -> torch.Tensor:
        """Step 3: float32 [B, n, H_m * W_m] mask probabilities of the candidates `cells`
        [B, n], 0 outside each image's extent (`inside`; None: every pixel is inside)."""
        chunk = _cell_kernels(kernels, cells)
        n = chunk.shape[1]
        if 0 < n < MIN_PRODUCT_ROWS:  # padded, any chunk size gives the same logits
            chunk = F.pad(chunk, (0, 0, 0, MIN_PRODUCT_ROWS - n))
        probs = dynamic_mask_logits(mask_features, chunk)[:, :n].flatten(2).sigmoid_()
        return probs if inside is None else probs.mul_(inside)

    def _top(self, pool: List["_Ranked"]) -> "_Ranked":
        """The top `pre_nms_topk` valid candidates of the pool by descending score; ties keep
        their order in the pool (that of the candidates)."""
        if len(pool) == 1:
            merged = pool[0]
        else:
            columns = [torch.cat(x, dim=1) for x in zip(*(p[:4] for p in pool))]
            merged = _Ranked(*columns, _cat_masks([p.binary for p in pool]))
        order = sort_descending(merged.scores, merged.valid)
        if self.pre_nms_topk > 0:
            order = order[:, : self.pre_nms_topk]
        kept = [x.gather(1, order) for x in merged[:4]]
        return _Ranked(*kept, _select_masks(merged.binary, order))

    def paste(
        self,
        soft: torch.Tensor,
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
        near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step 7 for one image: mask probabilities [N, h_m, w_m] (the image's extent) -> bool
        [N, height, width] masks of the requested output and their float32 [N, 4] XYXY boxes.

        Masks are processed a few at a time, so that the float intermediates stay within
        `_PASTE_CHUNK_BYTES` whatever the output size. Where the output has the input's size, the
        fast path (:func:`paste_cropped`) upsamples each mask only around its pixels near the
        threshold, with the same results; `near_lines` (`Detections.near_lines` of the image)
        saves it finding them.
        """
        work = soft.shape[0] * output_size[0] * output_size[1]
        if tuple(output_size) == tuple(image_size) and self._fast(
            soft.device, work, _CROP_LEAST_WORK
        ):
            found = paste_cropped(
                soft, self.mask_thresh, self.mask_stride, image_size, _CROP_CHUNK_BYTES,
                near_lines,
            )
            if found is not None:
                return found
        num, h_m, w_m = soft.shape
        height, width = output_size
        masks = torch.empty((num, height, width), dtype=torch.bool, device=soft.device)
        boxes = torch.zeros((num, 4), device=soft.device)
        upsampled = (h_m * self.mask_stride, w_m * self.mask_stride)
        largest = max(upsampled[0] * upsampled[1], height * width)
        step = max(1, _PASTE_CHUNK_BYTES // (4 * largest))
        for start in range(0, num, step):
            x = soft[start : start + step, None]
            x = F.interpolate(x, size=upsampled, mode="bilinear", align_corners=False)
            x = x[..., : image_size[0], : image_size[1]]
            if tuple(output_size) != tuple(image_size):  # resizing to the same size is identity
                x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
            masks[start : start + step] = x[:, 0] > self.mask_thresh
            boxes[start : start + step] = masks_to_boxes(masks[start : start + step])
        return masks, boxes
