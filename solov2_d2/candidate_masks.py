"""The masks of SOLOv2's inference candidates, computed only where they can be foreground.

A candidate's mask logit at a pixel is the dot product of its dynamic 1 x 1 kernel k with the
E-channel mask feature f there. Over a block of `BLOCK` x `BLOCK` pixels whose features lie
between lo_e and hi_e per channel, k . f <= sum_e max(k_e lo_e, k_e hi_e): one small matrix
product bounds every (candidate, block) pair. Where the bound is below the logit of a
threshold, no pixel of the block can exceed it, and its logits are not computed. A candidate of a
trained model covers a few blocks of the image, so most of the work of the dense product over all
pixels is skipped, exactly: the computed pixels are the dense product's (the same dot products,
up to the order of float operations), the skipped ones are provably below the threshold.

The pairs that remain are computed as batched matrix products, blocks grouped by how many
candidates they need (two groups per power of two), so the number of operations grows only with
the logarithm of the candidates, not with the image.
"""
import math
import mmap
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .grouping import ceil_log2, groups
from .heads import dynamic_mask_logits

__all__ = ["BLOCK", "CandidateMasks", "candidate_masks", "lazy_zeros", "runs"]

# Side of the blocks, in mask-feature pixels. Small blocks bound the logits tightly (on the fruit
# model, 8 x 8 blocks keep 19% of the (candidate, block) pairs where 5% truly reach the
# threshold); larger ones make larger matrix products. 4, 8, 16: 171, 90, 181 ms for 500
# candidates at 200 x 336 (bench/benchmark.py's forced load).
BLOCK = 8
# Float32 rounding of the bound and of the logits: an error of at most E * 2^-24 (E <= 2^12)
# of the sum of the absolute products, covered with margin.
_RELATIVE_MARGIN = 2.0**-10
_ABSOLUTE_MARGIN = 1e-3


class CandidateMasks:
    """What post-processing needs of the candidates' masks (see :func:`candidate_masks`).

    Attributes:
        binary: bool [B, K, H', W'] (H', W' >= H, W; False beyond H, W): soft mask >
            mask_thresh inside the image.
        areas: int64 [B, K], pixel counts of `binary`.
        soft_sums: float32 [B, K], sums of the soft mask over `binary`.
        boxes: None, or int64 [B, K, 4]: inclusive pixel boxes (y0, x0, y1, x1) that contain
            `binary` (the blocks it touches; Matrix NMS needs no tighter ones), (H', W', -1, -1)
            for an empty mask.
    """

    def __init__(
        self, binary, areas, soft_sums, soft, size, boxes=None, grid=None, masks=None, blocks=None
    ):
        self.binary, self.areas, self.soft_sums, self.boxes = binary, areas, soft_sums, boxes
        # Dense: soft [B, K, H, W]. Block-sparse: the soft masks of the computed (candidate,
        # block) pairs, float [P, BLOCK * BLOCK], their flat candidate and block indices.
        self._soft, self._size, self._grid, self._masks, self._blocks = (
            soft, size, grid, masks, blocks
        )

    def soft_masks(self, keep: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """float [B, N, H, W]: the soft masks of candidates `keep` (int64 [B, N]; only where
        `kept`, bool [B, N], is True; 0 elsewhere), where pasting their pixels above the support
        threshold reads them (2 pixels around those), 0 where they are surely below it."""
        b, n = keep.shape
        images = torch.arange(b, device=keep.device)[:, None]
        if self._grid is None:
            return self._soft[images, keep] * kept[..., None, None]
        k = self.binary.shape[1]
        grid = self._grid
        slot = torch.full((b * k,), -1, dtype=torch.long, device=keep.device)
        slot[(images * k + keep)[kept]] = (images * n + torch.arange(n, device=keep.device))[kept]
        slots = slot[self._masks]
        some = slots >= 0
        soft = lazy_zeros((b, n, grid.height, grid.width), self._soft.dtype, keep.device)
        rows = grid.block_rows(self._blocks[some], slots[some])
        runs(soft, BLOCK)[rows.flatten()] = self._soft[some].view(-1, BLOCK)
        return soft[..., : self._size[0], : self._size[1]]


def candidate_masks(
    mask_features: torch.Tensor,
    kernels: torch.Tensor,
    extents: Sequence[Tuple[int, int]],
    mask_thresh: float,
    support_thresh: float,
    valid: Optional[torch.Tensor] = None,
) -> CandidateMasks:
    """The candidates' binary masks, what SOLOv2 rescoring needs of their soft masks
    sigmoid(dynamic_mask_logits(mask_features, kernels)), and the soft values that pasting of
    the kept ones reads.

    Args:
        mask_features: [B, E, H, W], either memory layout.
        kernels: [B, K, E * k * k] dynamic kernels.
        extents: per image, the (rows, cols) of mask pixels that cover the image; pixels
            outside (batch padding) are never foreground. Pasting reads one more row and column.
        mask_thresh: binarisation threshold, in [0, 1).
        support_thresh: pasting reads the soft masks around their pixels above this threshold,
            at most `mask_thresh`.
        valid: optional bool [B, K]; the statistics of invalid candidates are left at 0.
    Returns:
        :class:`CandidateMasks`; the sums are those of the dense computation up to the order
        of float additions.
    """
    if not 0 <= support_thresh <= mask_thresh < 1:
        raise ValueError(
            "The mask threshold must be in [0, 1) and the support threshold at most the mask "
            f"threshold, got {mask_thresh} and {support_thresh}."
        )
    b, e, h, w = mask_features.shape
    k = kernels.shape[1]
    if kernels.shape[2] != e:
        return _dense_candidate_masks(mask_features, kernels, extents, mask_thresh, valid)

    grid = _BlockGrid(mask_features, extents)
    active = grid.candidate_blocks(kernels, support_thresh)
    # Pasting reads up to 2 pixels around a pixel above the support threshold: the blocks
    # around those that may hold one are computed too.
    near = _dilate(active.view(b * k, grid.blocks_y, grid.blocks_x))
    pairs = near.view(b, k, -1) & grid.readable[:, None]
    if valid is not None:
        pairs &= valid[..., None]
    binary = lazy_zeros((b, k, grid.height, grid.width), torch.bool, kernels.device)
    areas = kernels.new_zeros(b * k)
    soft_sums = kernels.new_zeros(b * k)
    boxes = torch.tensor([grid.height, grid.width, -1, -1], device=kernels.device)
    boxes = boxes.repeat(b * k, 1)
    # Each list starts with an empty tensor: there may be no pair at all.
    no_pairs = torch.zeros(0, dtype=torch.long, device=kernels.device)
    all_masks, all_blocks = [no_pairs], [no_pairs]
    all_soft = [kernels.new_zeros((0, BLOCK * BLOCK))]
    for blocks, masks, soft in grid.logits(kernels, pairs):
        soft.sigmoid_()
        all_masks.append(masks)
        all_blocks.append(blocks)
        all_soft.append(soft.clone())
        soft.mul_(grid.inside_pixels[blocks])  # 0 is never above a threshold >= 0
        # soft where > mask_thresh, else 0: soft * binary in one in-place step.
        F.threshold_(soft, mask_thresh, 0.0)
        soft_sums.index_add_(0, masks, soft.sum(dim=1))
        soft.sign_()  # 1 for foreground, 0 elsewhere: float sums are exact pixel counts
        block_areas = soft.sum(dim=1)
        areas.index_add_(0, masks, block_areas)
        some = block_areas > 0
        blocks, masks = blocks[some], masks[some]
        rows = grid.block_rows(blocks, masks)
        runs(binary, BLOCK)[rows.flatten()] = soft[some].view(-1, BLOCK).bool()
        corners = grid.block_boxes(blocks)
        for side, reduce in enumerate(["amin", "amin", "amax", "amax"]):
            boxes[:, side].scatter_reduce_(0, masks, corners[:, side], reduce)
    return CandidateMasks(
        binary,
        areas.view(b, k).long(),
        soft_sums.view(b, k),
        torch.cat(all_soft),
        (h, w),
        boxes.view(b, k, 4),
        grid,
        torch.cat(all_masks),
        torch.cat(all_blocks),
    )


class _BlockGrid:
    """The mask features of a batch cut into BLOCK x BLOCK blocks (padded at the bottom and
    right by repeating the last row and column), numbered per image row by row."""

    def __init__(self, mask_features: torch.Tensor, extents: Sequence[Tuple[int, int]]):
        b, e, h, w = mask_features.shape
        pad_y, pad_x = -h % BLOCK, -w % BLOCK
        if pad_y or pad_x:
            mask_features = F.pad(mask_features, (0, pad_x, 0, pad_y), mode="replicate")
        # [B, H', W', E]: a pixel's features are contiguous, as a block row's are.
        self.features = mask_features.permute(0, 2, 3, 1).contiguous()
        self.height, self.width = h + pad_y, w + pad_x
        self.blocks_y, self.blocks_x = self.height // BLOCK, self.width // BLOCK
        self.num_blocks = self.blocks_y * self.blocks_x
        device = mask_features.device
        limits = torch.tensor(extents, device=device).view(-1, 2)
        self.inside_pixels = self._block_pixels(limits)
        # Pasting reads one more row and column of mask pixels than the image covers.
        first_y = torch.arange(self.blocks_y, device=device) * BLOCK
        first_x = torch.arange(self.blocks_x, device=device) * BLOCK
        readable_y = first_y <= limits[:, :1]
        readable_x = first_x <= limits[:, 1:]
        self.readable = (readable_y[:, :, None] & readable_x[:, None, :]).view(b, -1)

    def _block_pixels(self, limits: torch.Tensor) -> torch.Tensor:
        """float [B * blocks, BLOCK * BLOCK]: 1 at the pixels within (rows, cols) `limits`
        (int64 [B, 2]) of their image, 0 elsewhere."""
        pixels = _inside(limits, self.height, self.width)
        shape = (-1, self.blocks_y, BLOCK, self.blocks_x, BLOCK)
        return pixels.view(shape).transpose(2, 3).reshape(-1, BLOCK * BLOCK).float()

    def candidate_blocks(self, kernels: torch.Tensor, thresh: float) -> torch.Tensor:
        """bool [B, K, blocks]: the blocks where sigmoid(kernel . feature) may exceed `thresh`
        at some pixel (kernels [B, K, E])."""
        if thresh <= 0:
            return kernels.new_ones((*kernels.shape[:2], self.num_blocks), dtype=torch.bool)
        b, _, _, e = self.features.shape
        # Per channel and block, in two steps (within block rows, then over them): reducing
        # contiguous runs is several times faster than one reduction over both strided dims.
        rows = self.features.view(b, self.height, self.blocks_x, BLOCK, e)
        shape = (b, self.blocks_y, BLOCK, self.num_blocks // self.blocks_y, e)
        high = rows.amax(dim=3).view(shape).amax(dim=2).view(b, -1, e).transpose(1, 2)
        low = rows.amin(dim=3).view(shape).amin(dim=2).view(b, -1, e).transpose(1, 2)
        bound = kernels.clamp(min=0) @ high + kernels.clamp(max=0) @ low
        magnitude = kernels.abs() @ torch.maximum(high.abs(), low.abs())
        margin = magnitude * _RELATIVE_MARGIN + _ABSOLUTE_MARGIN
        return bound + margin > math.log(thresh / (1 - thresh))

    def logits(
        self, kernels: torch.Tensor, pairs: torch.Tensor
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (blocks, masks, logits) covering every True (image, candidate, block) of `pairs`
        (bool [B, K, blocks]) once: flat block indices (image * blocks + block, int64 [P]),
        flat candidate indices (image * K + candidate, int64 [P]) and the pairs' logits
        (float [P, BLOCK * BLOCK], pixels of a block row by row), one group of blocks at a time.
        The logits may be overwritten."""
        b, k, num_blocks = pairs.shape
        e = self.features.shape[3]
        per_block = pairs.transpose(1, 2).reshape(b * num_blocks, k)
        counts = per_block.sum(dim=1)
        # Per block, its candidates first: table[block, i] is its i-th (pairs are listed block
        # by block, candidates ascending).
        pair_blocks, pair_masks = per_block.nonzero(as_tuple=True)
        first = counts.cumsum(0) - counts
        table = torch.zeros_like(per_block, dtype=torch.long)
        position = torch.arange(len(pair_blocks), device=pairs.device) - first[pair_blocks]
        table[pair_blocks, position] = pair_masks
        # Groups of blocks by candidate count, two per octave (a group's blocks compute up to
        # its largest count, so at most 1.5 times their pairs); a host read of their sizes.
        octave = ceil_log2(counts.clamp(min=1))
        bins = octave * 2 + (counts * 4 > 3 << octave).long()
        flat_kernels = kernels.reshape(b * k, e)
        block_rows = runs(self.features, BLOCK * e)
        for blocks, (width,) in groups(bins, counts > 0, 2 * k.bit_length() + 2, counts):
            num = len(blocks)
            masks = table[blocks, :width] + (blocks // num_blocks * k)[:, None]  # [num, width]
            real = torch.arange(width, device=blocks.device) < counts[blocks][:, None]
            pixels = self._pixel_rows(blocks)  # [num, BLOCK]
            features = block_rows[pixels.flatten() * e].view(num, BLOCK * BLOCK, e)
            logits = torch.bmm(flat_kernels[masks], features.transpose(1, 2))
            yield blocks[:, None].expand_as(masks)[real], masks[real], logits[real]

    def _pixel_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """int64 [P, BLOCK]: flat pixel index (image * H' * W' + y * W' + x) of the first pixel
        of each row of the flat blocks `blocks` (int64 [P])."""
        image, block = blocks // self.num_blocks, blocks % self.num_blocks
        y = (block // self.blocks_x * BLOCK)[:, None] + torch.arange(BLOCK, device=blocks.device)
        x = block % self.blocks_x * BLOCK
        return (image[:, None] * self.height + y) * self.width + x[:, None]

    def block_boxes(self, blocks: torch.Tensor) -> torch.Tensor:
        """int64 [P, 4]: inclusive boxes (y0, x0, y1, x1), in pixels of the map, of the flat
        blocks `blocks` (int64 [P])."""
        block = blocks % self.num_blocks
        y = block // self.blocks_x * BLOCK
        x = block % self.blocks_x * BLOCK
        return torch.stack([y, x, y + BLOCK - 1, x + BLOCK - 1], dim=1)

    def block_rows(self, blocks: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """int64 [P, BLOCK]: for pairs of flat blocks and flat masks (int64 [P] each; a mask is
        image * K + index), the flat index of each block row's first pixel in a
        [B, K, H', W'] tensor."""
        pixels = self._pixel_rows(blocks) - (blocks // self.num_blocks)[:, None] * (
            self.height * self.width
        )
        return masks[:, None] * (self.height * self.width) + pixels


def _dense_candidate_masks(mask_features, kernels, extents, mask_thresh, valid):
    """candidate_masks for k x k kernels: all masks at once."""
    soft = dynamic_mask_logits(mask_features, kernels).sigmoid_()
    b, k, h, w = soft.shape
    limits = torch.tensor(extents, device=soft.device).view(-1, 2)
    binary = (soft > mask_thresh) & _inside(limits, h, w)[:, None]
    if valid is not None:
        binary &= valid[..., None, None]
    areas, sums = binary.sum(dim=(2, 3)), (soft * binary).sum(dim=(2, 3))
    return CandidateMasks(binary, areas, sums, soft, (h, w))


def _inside(limits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """bool [B, height, width]: True at the pixels within (rows, cols) `limits` (int64 [B, 2])."""
    rows = torch.arange(height, device=limits.device) < limits[:, :1]
    cols = torch.arange(width, device=limits.device) < limits[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def _dilate(x: torch.Tensor) -> torch.Tensor:
    """bool [N, H, W]: True where x (bool [N, H, W]) is True in the 3 x 3 neighbourhood."""
    x = F.pad(x, (1, 1, 1, 1))
    x = x[:, :-2] | x[:, 1:-1] | x[:, 2:]
    return x[..., :-2] | x[..., 1:-1] | x[..., 2:]


def lazy_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor. On the CPU it lives in fresh anonymous memory, which the OS zeroes
    lazily, 4 KiB page by page, when a page is first touched: filling small parts of a large
    tensor then does not pay for clearing all of it (100 masks of 800 x 1333 are 107 MB).
    (Not numpy's calloc: numpy asks for transparent huge pages, whose first touch can stall the
    process for memory compaction; pasting was 2-10x slower with it here.)"""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or size == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def runs(x: torch.Tensor, length: int) -> torch.Tensor:
    """[x.numel() - length + 1, length], a view of contiguous x whose row p is x's flattened
    elements p .. p + length - 1. Its rows overlap: read any of them, or write rows that do not
    overlap one another. Indexing it moves runs of `length` contiguous elements, many times
    faster than indexing them one by one (advanced indexing of 3 dims)."""
    return x.view(-1).as_strided((x.numel() - length + 1, length), (1, 1))
