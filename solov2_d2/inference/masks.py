"""Candidate masks as the pipeline uses them: computed and scored, compared for Matrix NMS,
computed again for the kept detections, and pasted at the output size.

`CandidateMasks` is both the interface through which :mod:`.pipeline` reaches the masks and
their plain computation (every pixel of every mask, as the paper and the reference
implementations do). The CPU's faster computation (:mod:`.cpu`) subclasses it and gives the
same results; :mod:`.paths` chooses between them.
"""
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..layers.dynamic_conv import dynamic_mask_logits

__all__ = [
    "CandidateMasks",
    "KeptMasks",
    "MIN_PRODUCT_ROWS",
    "ScoredMasks",
    "connected_parts",
    "first_last",
    "main_part_boxes",
    "mask_intersections",
    "masks_to_boxes",
    "paste_masks",
]

# Matrix products of fewer candidates take other BLAS kernels, which round differently: every
# computation of mask logits gives its products at least this many rows, so that a candidate's
# logits do not depend on how many others are computed with it.
MIN_PRODUCT_ROWS = 16
# Pasting works on at most this many bytes of float masks at a time, so that the memory of a
# huge output image is its bool masks plus this.
_PASTE_CHUNK_BYTES = 1 << 24


class ScoredMasks(NamedTuple):
    """Steps 3-4 for a chunk of n candidates of each of B images.

    areas: float32 [B, n], pixels above the threshold (exact integers);
    sums: float32 [B, n], the sums of the probabilities above the threshold;
    binary: the binary masks [B, n, H_m * W_m], in the form of the `CandidateMasks` that made them
        (a bool tensor for the plain computation): only that object's `cat`, `select`,
        `intersections` and `kept` read it.
    """

    areas: torch.Tensor
    sums: torch.Tensor
    binary: Any


class KeptMasks(NamedTuple):
    """The kept detections' mask probabilities, for pasting.

    probs: float32 [B, k, H_m * W_m]; a faster computation may leave 0 where the probability is
        neither above the threshold minus a margin nor near such a pixel (pasting gives the
        same masks);
    near_lines: None, or bool [B, k, H_m] and [B, k, W_m], the rows and columns of each mask
        that hold a probability near or above the threshold, where the computation knows them.
    """

    probs: torch.Tensor
    near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class CandidateMasks:
    """The masks of the candidates of one batch, computed as specified: every pixel.

    Args:
        mask_features: float32 [B, E, H_m, W_m].
        inside: float32 [B, 1, H_m * W_m], 1 for the pixels inside each image's extent, else 0;
            None when every pixel is inside.
        mask_thresh: binarisation threshold of the probabilities, in [0, 1).
        mask_stride: stride of the mask features relative to the input.
        chunk_size: the number of candidates whose masks are computed at once.

    `scoring_chunk_size` is the number of candidates that the pipeline gives `score` at once
    (`chunk_size` here). `paths` says which computation each step took (for this class,
    "plain" throughout).
    """

    def __init__(
        self,
        mask_features: torch.Tensor,
        inside: Optional[torch.Tensor],
        mask_thresh: float,
        mask_stride: int,
        chunk_size: int,
    ):
        self.mask_features = mask_features
        self.inside = inside
        self.mask_thresh = mask_thresh
        self.mask_stride = mask_stride
        self.chunk_size = chunk_size
        self.scoring_chunk_size = chunk_size
        self.paths: Dict[str, str] = {}

    def _took(self, step: str, path: str) -> None:
        """Record that `step` ran `path` (a step may take several paths in one call)."""
        taken = self.paths.get(step)
        if taken is None:
            self.paths[step] = path
        elif path not in taken.split("+"):
            self.paths[step] = "+".join(sorted(taken.split("+") + [path]))

    def probs(self, kernels: torch.Tensor) -> torch.Tensor:
        """Step 3: float32 [B, n, H_m * W_m] mask probabilities of kernels [B, n, D], 0 outside
        each image's extent."""
        n = kernels.shape[1]
        if 0 < n < MIN_PRODUCT_ROWS:
            kernels = F.pad(kernels, (0, 0, 0, MIN_PRODUCT_ROWS - n))
        probs = dynamic_mask_logits(self.mask_features, kernels)[:, :n].flatten(2).sigmoid_()
        return probs if self.inside is None else probs.mul_(self.inside)

    def score(self, kernels: torch.Tensor, valid: torch.Tensor) -> ScoredMasks:
        """Steps 3-4 for the candidates of kernels [B, n, D] (valid: bool [B, n]; the results
        of invalid ones are meaningless)."""
        self._took("scoring", "plain")
        probs = self.probs(kernels)
        binary = probs > self.mask_thresh
        areas = _row_sums(binary, torch.int32).float()
        # float64 sums of the probabilities above the threshold: exact whatever the order of the
        # pixels (multiples of 2^-29 above a threshold >= 1/64, 2^24 of which need 53 bits), so
        # they depend neither on the layout nor on batch padding.
        sums = _row_sums(F.threshold_(probs, self.mask_thresh, 0.0), torch.float64).float()
        return ScoredMasks(areas, sums, binary)

    def cat(self, parts: List[Any]) -> Any:
        """The binary masks of `parts` one after the other (torch.cat along candidates)."""
        return torch.cat(parts, dim=1)

    def select(self, binary: Any, order: torch.Tensor) -> Any:
        """The binary masks int64 [B, k] of each image, in that order."""
        # Rows by advanced indexing: whole masks copied, much faster than a gather.
        return binary[torch.arange(order.shape[0], device=order.device)[:, None], order]

    def intersections(self, binary: Any) -> torch.Tensor:
        """float32 [B, n, n] pixel counts |m_i & m_j| of the binary masks."""
        self._took("intersections", "plain")
        return mask_intersections(binary)

    def kept(self, kernels: torch.Tensor, binary: Any) -> KeptMasks:
        """The probabilities of the kept detections, of kernels [B, k, D] whose binary masks are
        `binary` (from `select`), `chunk_size` candidates at a time."""
        self._took("kept masks", "plain")
        n = kernels.shape[1]
        starts = range(0, max(n, 1), self.chunk_size)
        parts = [self.probs(kernels[:, i : i + self.chunk_size]) for i in starts]
        return KeptMasks(torch.cat(parts, dim=1))

    def paste(
        self,
        probs: torch.Tensor,
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
        near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step 7 for one image (see :func:`paste_masks`; `near_lines`, those of `KeptMasks`
        for the image, serve only faster computations)."""
        self._took("pasting", "plain")
        return paste_masks(probs, image_size, output_size, self.mask_stride, self.mask_thresh)


def paste_masks(
    probs: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    mask_stride: int,
    mask_thresh: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 7: mask probabilities float32 [N, h_m, w_m] (the image's extent) upsampled by
    `mask_stride` (bilinear), cropped to the input `image_size`, resized to `output_size`
    (bilinear) and thresholded: bool [N, height, width] masks and their float32 [N, 4] XYXY
    boxes. A few masks at a time, so that the float intermediates stay within
    `_PASTE_CHUNK_BYTES` whatever the output size."""
    num, h_m, w_m = probs.shape
    height, width = output_size
    masks = torch.empty((num, height, width), dtype=torch.bool, device=probs.device)
    boxes = torch.zeros((num, 4), device=probs.device)
    upsampled = (h_m * mask_stride, w_m * mask_stride)
    largest = max(upsampled[0] * upsampled[1], height * width)
    step = max(1, _PASTE_CHUNK_BYTES // (4 * largest))
    for start in range(0, num, step):
        x = probs[start : start + step, None]
        x = F.interpolate(x, size=upsampled, mode="bilinear", align_corners=False)
        x = x[..., : image_size[0], : image_size[1]]
        if tuple(output_size) != tuple(image_size):  # resizing to the same size is identity
            x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
        masks[start : start + step] = x[:, 0] > mask_thresh
        boxes[start : start + step] = masks_to_boxes(masks[start : start + step])
    return masks, boxes


def mask_intersections(masks: torch.Tensor) -> torch.Tensor:
    """float32 [B, N, N] pixel counts |m_i & m_j| of binary masks [B, N, P] (bool or 0/1): one
    float32 batched matrix product, exact integers up to 2^24 pixels per mask."""
    flat = masks.float()
    return torch.bmm(flat, flat.transpose(1, 2))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of bool (or uint8 0/1) masks [N, H, W] as float32 [N, 4] XYXY in detectron2's
    pixel-edge convention (x1 = first column, x2 = last column + 1); an empty mask gives
    (0, 0, 0, 0)."""
    # amax of the bytes: faster than any() of bools on the CPU.
    pixels = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    rows, cols = pixels.amax(dim=2) > 0, pixels.amax(dim=1) > 0  # [N, H], [N, W]
    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    boxes = torch.stack([x0, y0, x1 + 1, y1 + 1], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


def _dilate(x: torch.Tensor) -> torch.Tensor:
    """The maximum over each pixel's 3 x 3 neighbourhood of x [N, h, w] (values >= 0; outside
    counts as 0), by shifted maxima: several times faster than max_pool2d on the CPU."""
    y = x.clone()
    y[:, 1:] = torch.maximum(y[:, 1:], x[:, :-1])
    y[:, :-1] = torch.maximum(y[:, :-1], x[:, 1:])
    z = y.clone()
    z[:, :, 1:] = torch.maximum(z[:, :, 1:], y[:, :, :-1])
    z[:, :, :-1] = torch.maximum(z[:, :, :-1], y[:, :, 1:])
    return z


def connected_parts(binary: torch.Tensor) -> torch.Tensor:
    """8-connected parts of bool masks [N, h, w], all masks at once, on their device: int64
    labels [N, h, w], 0 outside the mask, else 1 + the largest flat index (y * w + x) of a pixel
    of the pixel's part.

    Labels start as 1 + each pixel's own index and grow by a 3 x 3 maximum restricted to the
    mask, each round followed by two pointer jumps (a pixel takes the label of the pixel its
    label names, which lies in the same part and holds a label at least as large), until no
    label changes; the rounds grow more slowly than the parts' lengths.
    """
    n, h, w = binary.shape
    index = torch.arange(1, h * w + 1, device=binary.device).view(1, h, w)
    labels = torch.where(binary, index, 0)
    while True:
        flat = torch.where(binary, _dilate(labels), 0).view(n, h * w)
        for _ in range(2):
            flat = flat.gather(1, (flat - 1).clamp(min=0)) * binary.view(n, h * w)
        grown = flat.view(n, h, w)
        if torch.equal(grown, labels):
            return labels
        labels = grown


def main_part_boxes(
    masks: torch.Tensor,
    probs: torch.Tensor,
    mask_thresh: float,
    image_size: Tuple[int, int],
    mask_stride: int,
    min_part_fraction: float,
) -> torch.Tensor:
    """Boxes not widened by stray fragments (``MODEL.SOLOV2.BOX_FROM "main_parts"``).

    The parts of each mask are found at the mask features' resolution: the 8-connected parts
    (:func:`connected_parts`) of ``probs > mask_thresh``. A part is *main* if its area is at
    least `min_part_fraction` of the mask's there, or if it is the largest part. The box is
    the tight box of the pixels of the output mask that lie within one mask-feature pixel (3 x
    3 neighbourhood, which holds what bilinear upsampling spreads) of a main part; a mask whose
    parts are all main keeps its tight box (:func:`masks_to_boxes`).

    Args:
        masks: the pasted masks, bool [N, H, W] at the output size.
        probs: float32 [N, h_m, w_m], their probabilities on the image's extent at the mask
            features' resolution (pasted into `masks` by :func:`paste_masks`).
        mask_thresh: the binarisation threshold.
        image_size: (h, w) of the input image that the output (H, W) is resized from.
        mask_stride: the mask features' stride in input pixels.
        min_part_fraction: in [0, 1].
    Returns:
        float32 [N, 4] XYXY boxes; (0, 0, 0, 0) for an empty mask.
    """
    tight = masks_to_boxes(masks)
    num, h_m, w_m = probs.shape
    if num == 0:
        return tight
    binary = probs > mask_thresh
    # Parts are labelled in crops of each mask's own box, all of the largest box's size (a
    # zero-padded margin keeps the crops inside the tensor): fewer pixels per round.
    y0, y1 = first_last(binary.any(dim=2))
    x0, x1 = first_last(binary.any(dim=1))
    nonempty = binary.flatten(1).any(dim=1)
    extents = torch.stack([y1 - y0, x1 - x0]) * nonempty  # [2, N]; 0 for an empty mask
    crop_h, crop_w = (extents.amax(dim=1) + 1).tolist()  # one host read
    rows = y0[:, None] + torch.arange(crop_h, device=probs.device)  # [N, crop_h]
    cols = x0[:, None] + torch.arange(crop_w, device=probs.device)  # [N, crop_w]
    which = torch.arange(num, device=probs.device)[:, None, None]
    padded = F.pad(binary, (0, crop_w, 0, crop_h))
    crops = padded[which, rows[:, :, None], cols[:, None, :]]  # [N, crop_h, crop_w]
    labels = connected_parts(crops).view(num, -1)
    counts = torch.zeros((num, crop_h * crop_w + 1), device=probs.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=counts.dtype))
    counts[:, 0] = 0
    part_area = counts.gather(1, labels).view(crops.shape)
    total = crops.flatten(1).sum(dim=1)
    needed = torch.minimum(min_part_fraction * total, counts.amax(dim=1))
    main_crops = crops & (part_area >= needed[:, None, None])
    fragmented = (crops & ~main_crops).flatten(1).any(dim=1)
    main = torch.zeros_like(padded)
    main[which, rows[:, :, None], cols[:, None, :]] = main_crops
    near = _dilate(main[:, :h_m, :w_m].to(torch.uint8)) > 0
    picked = fragmented.nonzero()[:, 0]  # host read; usually few masks
    if not len(picked):
        return tight
    # The mask-feature pixel of each output pixel: its centre mapped to the input, divided by
    # the stride (integer arithmetic). The columns are gathered in a transposed layout, many
    # times faster than index_select on the last dimension of a bool tensor on the CPU.
    height, width = masks.shape[1:]
    out_rows = torch.arange(height, device=probs.device)
    out_cols = torch.arange(width, device=probs.device)
    out_rows = ((2 * out_rows + 1) * image_size[0] // (2 * height)) // mask_stride
    out_cols = ((2 * out_cols + 1) * image_size[1] // (2 * width)) // mask_stride
    region = near[picked].index_select(1, out_rows.clamp(max=h_m - 1)).transpose(1, 2)
    region = region.index_select(1, out_cols.clamp(max=w_m - 1)).transpose(1, 2)
    boxes = tight.clone()
    boxes[picked] = masks_to_boxes(masks[picked] & region)
    return boxes


def first_last(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [N] indices of the first and last True of each row of bool [N, L] (0 and L - 1
    for a row without any)."""
    index = torch.arange(flags.shape[1], device=flags.device)
    first = torch.where(flags, index, flags.shape[1]).amin(dim=1)
    last = torch.where(flags, index, -1).amax(dim=1)
    return first.clamp(max=flags.shape[1] - 1), last.clamp(min=0)


def _row_sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sums [B, n] over the last dimension of x [B, n, P], accumulated in `dtype`."""
    if torch.compiler.is_exporting():  # the sizes are symbolic there
        return x.sum(dim=2, dtype=dtype)
    # A few rows at a time: a cast copy of a whole chunk would be a fresh allocation each time,
    # slow to fault in.
    rows = max(1, (1 << 24) // max(1, 8 * x.shape[0] * x.shape[2]))
    return torch.cat([part.sum(dim=2, dtype=dtype) for part in x.split(rows, dim=1)], dim=1)
