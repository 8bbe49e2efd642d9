"""SOLOv2 training targets: which grid cells are positive for which instance, and mask targets.

Everything is computed for all instances of a batch at once, on the device of the inputs, with
no host synchronisation: Python loops run over the images and the (few) FPN levels only and use
nothing but tensor shapes; masks rasterised from polygons on the host reach the device through
pinned memory, asynchronously.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks, Instances, PolygonMasks

__all__ = ["SOLOv2Targets", "assign_targets", "instance_masks", "downsample_masks"]


@dataclass
class SOLOv2Targets:
    """Targets of a batch of B images over all T = sum(S_l^2) grid cells (levels concatenated,
    each level's cells in row-major order).

    A cell may be claimed by several instances of its image. Its category target is the class
    of the instance listed last (`labels`, `matched`), as in the reference implementations;
    for the mask loss the references pair the cell's kernel with each claiming instance's mask
    (`pair_cells`, `pair_instances`: one pair per instance and cell it claims).

    Attributes:
        labels: int64 [B, T]; the class of each cell's instance, `num_classes` for background.
        matched: int64 [B, T]; index of each cell's instance (the last claiming one) into the
            batch's instances (images concatenated in order), -1 for background.
        masks: bool [M, H/stride, W/stride]; the mask target of each of the M instances, at
            the mask feature's resolution. Cells refer to it through `matched` and
            `pair_instances` (no per-cell copies); the loss converts the masks it needs to float
            a chunk at a time.
        pair_cells: int64 [B, N]; per image, the cell (index into its T cells) of each
            (instance, cell) pair: every cell every instance of the image claims, instance by
            instance; -1 pads the rows to the same N (9 cells per level at most per instance).
        pair_instances: int64 [B, N]; the instance (index into `masks`) of each pair, -1 where
            `pair_cells` is -1.
    """

    labels: torch.Tensor
    matched: torch.Tensor
    masks: torch.Tensor
    pair_cells: torch.Tensor
    pair_instances: torch.Tensor

    def mask_pairs(self, which: str = "all") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (cell, instance) pairs the mask loss is computed for, as the `matched` and
        `cells` arguments of :func:`~solov2_d2.modeling.losses.positive_cells_dice_loss`.

        Args:
            which: "all": every instance on every cell it claims, as the reference
                implementations train (a cell claimed by two instances gives two pairs);
                "last_owner": each positive cell with its last claiming instance only.
        Returns:
            (instances int64 [B, N], cells int64 [B, N]) for "all"; (`matched` [B, T], None:
            pair k is cell k) for "last_owner".
        """
        if which == "all":
            return self.pair_instances, self.pair_cells
        if which == "last_owner":
            return self.matched, None
        raise ValueError(f"Mask loss pairs {which!r}: expected 'all' or 'last_owner'.")


def instance_masks(
    gt_instances: List[Instances], padded_size: Tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The masks of all instances of a batch (images in order) as bool [M, H, W] on `device`,
    zero-padded to the batch's `padded_size`.

    Accepts what detectron2's DatasetMapper produces for INPUT.MASK_FORMAT "polygon"
    (PolygonMasks, rasterised here on the host) and "bitmask" (BitMasks). Each image's masks are
    written straight into the batch's tensor (one copy); host masks go to another device from
    pinned memory without blocking the host.
    """
    h, w = padded_size
    counts = [len(x) for x in gt_instances]
    out = torch.zeros((sum(counts), h, w), dtype=torch.bool, device=device)
    start = 0
    for instances, count in zip(gt_instances, counts):
        gt_masks = instances.gt_masks
        if isinstance(gt_masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(gt_masks, h, w).tensor
        elif isinstance(gt_masks, BitMasks):
            masks = gt_masks.tensor
        else:
            raise TypeError(
                f"gt_masks of type {type(gt_masks).__name__} is not supported: "
                "expected PolygonMasks or BitMasks (INPUT.MASK_FORMAT 'polygon' or 'bitmask')."
            )
        if count:
            if masks.device.type == "cpu" and out.device.type != "cpu":
                masks = masks.pin_memory()
            out[start : start + count, : masks.shape[1], : masks.shape[2]].copy_(
                masks, non_blocking=True
            )
        start += count
    return out


def downsample_masks(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """Bilinear downsampling of 0/1 masks by an even integer `stride`, binarised at 0.5.

    This is what the reference implementations do with OpenCV (`cv2.resize`, INTER_LINEAR, on
    uint8 masks): with half-pixel centres, output pixel d samples input position
    stride * d + (stride - 1) / 2, the midpoint of pixels stride * d + stride / 2 - 1 and
    stride * d + stride / 2 in each direction, so the value is the mean of those 2 x 2 pixels;
    OpenCV's rounding makes a mean of 0.5 a 1. Only those pixels are read (strided slices), so
    no float copy of the full-resolution masks is made.

    Args:
        masks: bool [M, H, W], H and W divisible by `stride`.
    Returns:
        bool [M, H / stride, W / stride].
    """
    _, h, w = masks.shape
    if stride % 2 or h % stride or w % stride:
        raise ValueError(
            f"Masks of size {h}x{w} cannot be downsampled by stride {stride}: the stride must be "
            "even and divide the padded size (check the backbone's size_divisibility)."
        )
    first = stride // 2 - 1
    rows = (masks[:, first::stride], masks[:, first + 1 :: stride])
    votes = sum(r[:, :, c::stride].to(torch.uint8) for r in rows for c in (first, first + 1))
    return votes >= 2


def _row_and_column_counts(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixels set per row and per column of bool masks [M, H, W], as int32 [M, H] and [M, W].

    Reducing bool tensors element by element is slow on CPU. Instead every 8 pixels are read as
    one int64 word and words are added: the 8 bytes of a word act as 8 independent counters as
    long as none exceeds 255, so sums run over at most 255 words before the bytes are unpacked.
    That is an 8x shorter reduction with exact integer results.
    """
    m, h, w = masks.shape
    if w % 8:
        masks = F.pad(masks, (0, 8 - w % 8))
    words = masks.contiguous().view(torch.uint8).view(torch.int64)  # [M, H, W8]
    w8 = words.shape[2]
    lanes = torch.stack([words[:, :, i : i + 255].sum(dim=2) for i in range(0, w8, 255)], 2)
    rows = lanes.view(torch.uint8).view(m, h, lanes.shape[2] * 8).sum(dim=2, dtype=torch.int32)
    lanes = torch.stack([words[:, i : i + 255].sum(dim=1) for i in range(0, h, 255)], 1)
    cols = lanes.view(torch.uint8).view(m, lanes.shape[1], w8 * 8).sum(dim=1, dtype=torch.int32)
    return rows, cols[:, :w]


def _centres_of_mass(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x) centre of mass in pixel-index coordinates and area of bool [M, H, W] masks.

    Integer sums keep it exact for any image size; the division is in float64.
    """
    _, h, w = masks.shape
    rows, cols = _row_and_column_counts(masks)
    area = rows.sum(dim=1, dtype=torch.int64)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    denom = area.clamp(min=1).double()
    return (rows * ys).sum(dim=1) / denom, (cols * xs).sum(dim=1) / denom, area


def _level_claims(
    cy: torch.Tensor,
    cx: torch.Tensor,
    half_h: torch.Tensor,
    half_w: torch.Tensor,
    padded_size: Tuple[int, int],
    grid: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The cells each of M instances claims on a level with an S x S grid.

    The centre cell is the one containing the centre of mass; the claimed region is the box of
    the given half-extents around the centre, in cells, clipped to the centre cell's 3 x 3
    neighbourhood.

    Args:
        cy, cx, half_h, half_w: float64 [M], centres of mass and half-extents in pixels.
    Returns:
        int64 [M, 9]: the 3 x 3 neighbourhood of each centre cell in row-major order, as
        indices row * S + col into the level's cells, -1 where not claimed; bool [M, 9]: which
        are claimed.
    """
    cell_h = padded_size[0] / grid
    cell_w = padded_size[1] / grid
    row = torch.floor(cy / cell_h)
    col = torch.floor(cx / cell_w)
    top = torch.maximum(torch.floor((cy - half_h) / cell_h).clamp(min=0), row - 1)
    bottom = torch.minimum(torch.floor((cy + half_h) / cell_h).clamp(max=grid - 1), row + 1)
    left = torch.maximum(torch.floor((cx - half_w) / cell_w).clamp(min=0), col - 1)
    right = torch.minimum(torch.floor((cx + half_w) / cell_w).clamp(max=grid - 1), col + 1)
    steps = torch.arange(-1, 2, device=cy.device, dtype=cy.dtype)
    rows = row[:, None] + steps  # [M, 3]
    cols = col[:, None] + steps  # [M, 3]
    rows_in = (rows >= top[:, None]) & (rows <= bottom[:, None])
    cols_in = (cols >= left[:, None]) & (cols <= right[:, None])
    claimed = (rows_in[:, :, None] & cols_in[:, None, :]).flatten(1)
    cells = (rows[:, :, None] * grid + cols[:, None, :]).flatten(1).long()
    return torch.where(claimed, cells, -1), claimed


def assign_targets(
    gt_instances: List[Instances],
    padded_size: Tuple[int, int],
    num_grids: Sequence[int],
    scale_ranges: Sequence[Sequence[float]],
    sigma: float,
    num_classes: int,
    mask_stride: int,
) -> SOLOv2Targets:
    """Assign ground-truth instances to grid cells as SOLOv2 defines it.

    Per level, an instance takes part if sqrt(box area) lies in the level's scale range
    (bounds included; ranges overlap, so it may be positive on two levels). Its positive cells
    are given by :func:`_level_claims`. When instances of one image claim the same cell, the
    cell's category target is the class of the one listed last, as in the reference
    implementations; they also train the cell's kernel towards the mask of every claiming
    instance, hence the (instance, cell) pairs of :class:`SOLOv2Targets`. Instances with an
    empty mask are not assigned (their centre is undefined).

    Args:
        gt_instances: per image, with `gt_boxes` (input pixels), `gt_classes` and `gt_masks`.
        padded_size: (H, W) of the padded batch; cells are laid over it.
        num_grids: S per level.
        scale_ranges: (low, high) of sqrt(box area) per level.
        sigma: the centre region's scale.
        num_classes: label of background cells.
        mask_stride: stride of the mask feature, for the mask targets.
    """
    device = gt_instances[0].gt_classes.device
    num_images = len(gt_instances)
    # Filled on the device from lengths the host knows: no tensor is built from host values.
    image_index = torch.cat(
        [torch.full((len(x),), i, device=device) for i, x in enumerate(gt_instances)]
    )
    labels = torch.cat([x.gt_classes for x in gt_instances])
    boxes = torch.cat([x.gt_boxes.tensor for x in gt_instances]).double()
    masks = instance_masks(gt_instances, padded_size, device)

    cy, cx, area = _centres_of_mass(masks)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    scale = torch.sqrt(widths * heights)
    half_w = 0.5 * sigma * widths
    half_h = 0.5 * sigma * heights
    instance_ids = torch.arange(len(labels), device=device)

    cells, claimed, num_cells = [], [], 0
    for grid, (low, high) in zip(num_grids, scale_ranges):
        active = (scale >= low) & (scale <= high) & (area > 0)
        level_cells, level_claimed = _level_claims(cy, cx, half_h, half_w, padded_size, grid)
        cells.append(level_cells + num_cells)
        claimed.append(level_claimed & active[:, None])
        num_cells += grid * grid
    claimed = torch.cat(claimed, dim=1)  # [M, P], P = 9 cells x levels
    cells = torch.where(claimed, torch.cat(cells, dim=1), -1)
    instances = torch.where(claimed, instance_ids[:, None], -1)
    # Owner of each cell: the largest claiming index of its image, i.e. the one listed last
    # (instances are ordered image by image). Unclaimed slots go to an extra, dropped entry.
    slots = torch.where(claimed, image_index[:, None] * num_cells + cells, num_images * num_cells)
    owner = torch.full((num_images * num_cells + 1,), -1, dtype=torch.long, device=device)
    owner.scatter_reduce_(0, slots.flatten(), instances.flatten(), reduce="amax")
    matched = owner[:-1].view(num_images, num_cells)
    # Each image's pairs, instance by instance, padded with -1 to the longest image's.
    counts = [len(x) for x in gt_instances]
    width = max(counts) * claimed.shape[1]
    pairs, start = [], 0
    for count in counts:
        part = torch.stack([cells[start : start + count], instances[start : start + count]])
        pairs.append(F.pad(part.flatten(1), (0, width - part[0].numel()), value=-1))
        start += count
    pair_cells, pair_instances = torch.stack(pairs, dim=1)
    # Index -1 (background) picks the appended background label.
    cell_labels = torch.cat([labels, labels.new_full((1,), num_classes)])[matched]
    return SOLOv2Targets(
        labels=cell_labels,
        matched=matched,
        masks=downsample_masks(masks, mask_stride),
        pair_cells=pair_cells,
        pair_instances=pair_instances,
    )
