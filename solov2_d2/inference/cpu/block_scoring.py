"""The CPU's fast path for candidate masks: only the blocks of pixels where a mask can pass the
threshold are computed.

Steps 3-6 of post-processing need, per candidate, its binary mask (probability > threshold), its
area, the sum of its probabilities inside it and its intersections with other masks; pixels
below the threshold count in none of them. `MaskBlocks` cuts an image's mask features into blocks
of 8 x 8 pixels and bounds every candidate's logit over each block by the interval bound: each
channel at its most favourable value in the block (`BlockBounds`, which rules out most pairs on
super-blocks first). Only the (candidate, block) pairs whose bound reaches the threshold are
computed, by matrix products grouped by block, and the binary masks stay in that form
(`BlockBits`, with the blocks' probabilities) through Matrix NMS. The kept masks' probabilities
for pasting then need products only where a pixel within `REACH` of one near the threshold lies
outside those blocks. Where many pairs may pass (large masks), the methods return None and the
caller computes every pixel.

The results are the plain path's: the logits are the same float32 dot products (each product has
at least 16 candidates, laid out as the plain path's), areas and intersections are integer
counts and probability sums are exact in float64 whatever their order.
"""
import math
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .block_bounds import BlockBounds
from .block_groups import groups_by_key
from .buffers import Scratch
from .fresh_zeros import fresh_zeros

__all__ = ["BLOCK", "REACH", "BlockBits", "KeptProbs", "MaskBlocks"]

BLOCK = 8
# Above this fraction of (candidate, block) pairs that may pass, computing every pixel is cheaper.
DENSE_FRACTION = 0.25
# The kept masks' probabilities are exact this far around their pixels near the threshold: an
# output pixel of upsampling then resizing (both bilinear) reads its mask pixels within 2.
REACH = 2
# Scoring keeps its blocks' probabilities while they take at most this much memory per chunk.
_VALUES_MAX_BYTES = 1 << 26


class BlockBits(NamedTuple):
    """Binary masks [B, n, H * W] kept only in their blocks that hold a pixel above the
    threshold (the other blocks are all False).

    image, row, block: int64 [P], the image, the mask (0..n-1) and the block (row-major in the
    grid) of each kept block; bits: bool [P, 64], its pixels row by row; shape: (B, n, H * W);
    grid: (blocks per column, blocks per row); size: (H, W); values: float32 [P, 64], the
    probabilities of the kept blocks' pixels, or None where they were not kept.
    """

    image: torch.Tensor
    row: torch.Tensor
    block: torch.Tensor
    bits: torch.Tensor
    shape: Tuple[int, int, int]
    grid: Tuple[int, int]
    size: Tuple[int, int]
    values: Optional[torch.Tensor] = None

    @staticmethod
    def cat(parts: List["BlockBits"]) -> "BlockBits":
        """The masks of `parts` one after the other, as torch.cat along dimension 1."""
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.shape[1])
        first = parts[0]
        with_values = all(p.values is not None for p in parts)
        return first._replace(
            image=torch.cat([p.image for p in parts]),
            row=torch.cat([p.row + o for p, o in zip(parts, offsets)]),
            block=torch.cat([p.block for p in parts]),
            bits=torch.cat([p.bits for p in parts]),
            shape=(first.shape[0], offsets[-1] + parts[-1].shape[1], first.shape[2]),
            values=torch.cat([p.values for p in parts]) if with_values else None,
        )

    def select(self, order: torch.Tensor) -> "BlockBits":
        """The masks int64 [B, k] (distinct within an image) of each image, in that order."""
        b, n, pixels = self.shape
        k = order.shape[1]
        new_row = order.new_full((b, n), -1)
        new_row[torch.arange(b, device=order.device)[:, None], order] = torch.arange(
            k, device=order.device
        )
        row = new_row[self.image, self.row]
        kept = (row >= 0).nonzero()[:, 0]
        # Rows by index_select: much faster than advanced indexing for the blocks' pixels.
        take = lambda x: x.index_select(0, kept)  # noqa: E731
        return self._replace(
            image=take(self.image),
            row=take(row),
            block=take(self.block),
            bits=take(self.bits),
            shape=(b, k, pixels),
            values=None if self.values is None else take(self.values),
        )

    def dense(self) -> torch.Tensor:
        """bool [B, n, H * W]."""
        b, n, _ = self.shape
        (hb, wb), (h, w) = self.grid, self.size
        out = self.bits.new_zeros((b, n, hb * BLOCK, wb * BLOCK))
        rows, cols = _block_pixels(self.block, wb)
        out[self.image[:, None, None], self.row[:, None, None], rows, cols] = self.bits.view(
            -1, BLOCK, BLOCK
        )
        return out[:, :, :h, :w].reshape(b, n, h * w)

    def intersections(self, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """float32 [B, n, n] pixel counts |m_i & m_j|, summed over the blocks both keep (exact
        integers, as `mask_intersections` of the dense masks); `scratch` holds the products'
        operands (a new one if None)."""
        b, n, _ = self.shape
        num_blocks = self.grid[0] * self.grid[1]
        # Padding takes a block without bits, of a mask n outside the result: no masking.
        bits = torch.cat([self.bits, self.bits.new_zeros((1, BLOCK * BLOCK))])
        row = torch.cat([self.row, self.row.new_full((1,), n)])
        counts = torch.zeros(b * (n + 1) * (n + 1), device=bits.device)
        key = self.image * num_blocks + self.block
        scratch = scratch or Scratch()
        for keys, table, filled in groups_by_key(key, b * num_blocks):
            g, w = table.shape
            table = table.masked_fill_(~filled, self.bits.shape[0])
            # The products' operands in float32, converted in the scratch.
            x = scratch.take("bits", (g, w, BLOCK * BLOCK), bits.device)
            x.copy_(bits.index_select(0, table.flatten()).view(g, w, -1))  # [g, W, 64]
            masks = row[table]  # [g, W]
            rows = masks + (keys // num_blocks * (n + 1))[:, None]  # rows of the batch's counts
            index = rows[:, :, None] * (n + 1) + masks[:, None, :]  # [g, W, W]
            both = scratch.take("counts", (g, w, w), bits.device)
            torch.bmm(x, x.mT, out=both)
            counts.index_add_(0, index.flatten(), both.flatten())
        return counts.view(b, n + 1, n + 1)[:, :n, :n]


class KeptProbs(NamedTuple):
    """The kept masks' probabilities from `MaskBlocks.probs`: probs, float32 [B, n, H * W];
    rows, cols: bool [B, n, H] and [B, n, W], the rows and columns of each mask that hold a
    probability above the `near` threshold."""

    probs: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


class MaskBlocks:
    """Mask features of a batch with per-block channel ranges, for 1 x 1 dynamic kernels.

    Attributes:
        features: float32 [B, H', W', E], the mask features channels-last, padded with their
            edge values to H' and W', multiples of 8 (a view without copy when they already are).
        inside: float32 [B, H', W'], 1 for the pixels of each image's extent, else 0.
        high, low: float32 [B, nb, E], each channel's largest and smallest value in each block
            (nb = H' W' / 64; over all of a block's pixels: a bound over more pixels is still a
            bound).
    """

    def __init__(
        self,
        mask_features: torch.Tensor,
        inside: Optional[torch.Tensor] = None,
        scratch: Optional[Scratch] = None,
    ):
        """
        Args:
            mask_features: float32 [B, E, H, W].
            inside: float32 [B, 1, H * W], 1 inside each image's extent; None: all inside.
            scratch: holds the products' operands (a new one if None).
        """
        b, e, h, w = mask_features.shape
        self.size = (h, w)
        pad = (0, -w % BLOCK, 0, -h % BLOCK)
        # Without a pixel outside (extent or padding), the products need no masking.
        self.all_inside = inside is None and not any(pad)
        if inside is None:
            inside = mask_features.new_ones((b, 1, h * w))
        if any(pad):
            # Edge values: the padding then widens no block's channel ranges.
            mask_features = F.pad(mask_features, pad, mode="replicate")
        # Contiguous, so that a row of a block's pixels is one run of memory (no copy for the
        # network's channels-last features).
        self.features = mask_features.permute(0, 2, 3, 1).contiguous()  # [B, H', W', E]
        self.inside = F.pad(inside.view(b, h, w), pad)
        self.grid = (self.features.shape[1] // BLOCK, self.features.shape[2] // BLOCK)
        by_block = self.features.unflatten(2, (-1, BLOCK)).unflatten(1, (-1, BLOCK))
        # Two single-dimension reductions: much faster than one over both on this layout.
        self.high = by_block.amax(dim=2).amax(dim=3).flatten(1, 2)  # [B, nb, E]
        self.low = by_block.amin(dim=2).amin(dim=3).flatten(1, 2)
        in_block = self.inside.unflatten(2, (-1, BLOCK)).unflatten(1, (-1, BLOCK))
        self.has_inside = in_block.amax(dim=2).amax(dim=3).flatten(1) > 0  # [B, nb]
        self.scratch = scratch or Scratch()
        self.bounds = BlockBounds(self.high, self.low, self.grid, self.scratch)

    def may_pass(self, kernels: torch.Tensor, thresh: float) -> torch.Tensor:
        """bool [B, n, nb]: whether a pixel of each block may have a probability above `thresh`
        for the kernels float32 [B, n, E]; never False where one does (the interval bound, with
        a margin for the rounding of the bound and of the logits: `BlockBounds`)."""
        if thresh <= 0:
            return self.has_inside[:, None, :].expand(-1, kernels.shape[1], -1)
        logit = math.log(thresh / (1 - thresh))
        return self.bounds.may_reach(kernels, logit) & self.has_inside[:, None, :]

    def pass_fraction(self, kernels: torch.Tensor, valid: torch.Tensor, thresh: float) -> float:
        """The fraction of the (valid candidate, block inside) pairs that may pass, for kernels
        [B, n, E] and valid bool [B, n]."""
        active = self.may_pass(kernels, thresh) & valid[:, :, None]
        pairs = valid.sum(dim=1) * self.has_inside.sum(dim=1)  # [B]
        return float(active.sum()) / max(1, int(pairs.sum()))

    def score(
        self, kernels: torch.Tensor, valid: torch.Tensor, thresh: float
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, BlockBits]]:
        """Areas, probability sums and binary masks of candidates, or None where more than
        `DENSE_FRACTION` of the (candidate, block) pairs may pass.

        Args:
            kernels: float32 [B, n, E], 1 x 1 dynamic kernels.
            valid: bool [B, n]; invalid candidates are not computed (their results are 0).
            thresh: binarisation threshold of the probabilities.
        Returns:
            int32 [B, n] areas, float64 [B, n] sums of the probabilities above `thresh` and the
            binary masks, with their blocks' probabilities unless they would take more than
            `_VALUES_MAX_BYTES`.
        """
        b, n = valid.shape
        pairs = self._pairs(self.may_pass(kernels, thresh) & valid[:, :, None])
        if pairs is None:
            return None
        keep_values = pairs.shape[0] * BLOCK * BLOCK * 4 <= _VALUES_MAX_BYTES
        # Padding counts in a slot past the results.
        areas = torch.zeros(b * n + 1, dtype=torch.int32, device=kernels.device)
        sums = torch.zeros(b * n + 1, dtype=torch.float64, device=kernels.device)
        kept, bits = [pairs.new_zeros(0)], [valid.new_zeros((0, BLOCK * BLOCK))]
        values = [kernels.new_zeros((0, BLOCK * BLOCK))]
        for table, filled, flat, _, probs in self._products(kernels, pairs):
            above = probs > thresh  # [g, W, 64]
            counts = above.sum(dim=2, dtype=torch.int32)
            # Blocks without a pixel above play no further part.
            some = ((counts > 0) & filled).flatten().nonzero()[:, 0]
            kept.append(table.flatten()[some])
            bits.append(above.flatten(0, 1).index_select(0, some))
            if keep_values:
                values.append(probs.flatten(0, 1).index_select(0, some))
            flat = flat.masked_fill_(~filled, b * n).flatten()
            areas.index_add_(0, flat, counts.flatten())
            # Summed in float64 (exact); converted in the scratch, not in a new tensor.
            wide = self.scratch.take("wide", probs.shape, probs.device, torch.float64)
            probs = wide.copy_(F.threshold_(probs, thresh, 0.0)).sum(dim=2)
            sums.index_add_(0, flat, probs.flatten())
        image, cand, block = pairs[torch.cat(kept)].unbind(1)
        shape = (b, n, self.size[0] * self.size[1])
        masks = BlockBits(
            image, cand, block, torch.cat(bits), shape, self.grid, self.size,
            torch.cat(values) if keep_values else None,
        )
        areas, sums = areas[:-1], sums[:-1]
        return areas.view(b, n), sums.view(b, n), masks

    def probs(
        self, kernels: torch.Tensor, near: float, known: Optional[BlockBits] = None
    ) -> Optional["KeptProbs"]:
        """Mask probabilities of kernels [B, n, E]: exact at every pixel above `near` and within
        `REACH` pixels of one (all that bilinear upsampling, then bilinear resizing, thresholded
        above `near` reads), 0 or exact elsewhere (where the plain values are at most `near`
        too), with the rows and columns of each mask that hold a pixel above `near`; None where
        the blocks to compute are more than `DENSE_FRACTION` of them.

        `known`, the same masks' `BlockBits` with their blocks' probabilities (from `score`),
        saves the products of its blocks: the others are computed where they may hold a pixel
        above `near` (with the blocks around them), or where a known pixel above `near` lies
        within `REACH` of them. Without it, the blocks that may hold one and the blocks around
        them are computed.
        """
        b, n, _ = kernels.shape
        hb, wb = self.grid
        may = self.may_pass(kernels, near)  # [B, n, nb]
        if known is None or known.values is None:
            need, known = _around(may, self.grid), None
        else:
            have = torch.zeros_like(may)
            have[known.image, known.row, known.block] = True
            # Blocks whose pixels are unknown: those that may hold one above `near`, and those
            # around them, computed whole.
            need = _around(may & ~have, self.grid)
            image, row, block = _next_to_pixels_above(known, near, self.grid)
            need[image, row, block] = True
            need &= ~have
        pairs = self._pairs(need & self.has_inside[:, None, :])
        if pairs is None:
            return None
        out = fresh_zeros((b, n, hb * BLOCK, wb * BLOCK), torch.float32, kernels.device)
        out_rows = out.view(-1, BLOCK)  # [B * n * H' * wb, 8]: a row of a block of a mask
        # Per row and column of each mask, its blocks with a pixel above `near` there.
        row_hits = torch.zeros(b * n * hb * BLOCK, dtype=torch.int32, device=kernels.device)
        col_hits = torch.zeros(b * n * wb * BLOCK, dtype=torch.int32, device=kernels.device)

        def write(mask: torch.Tensor, block: torch.Tensor, values: torch.Tensor):
            """Blocks int64 [N] of masks int64 [N] (image * n + mask) hold values [N, 64]."""
            index = mask[:, None] * (hb * BLOCK * wb) + _block_rows(block, wb)
            out_rows.index_copy_(0, index.flatten(), values.view(-1, BLOCK))
            above = (values > near).view(-1, BLOCK, BLOCK)
            rows, cols = _block_pixels(block, wb)
            rows = mask[:, None] * (hb * BLOCK) + rows[:, :, 0]
            cols = mask[:, None] * (wb * BLOCK) + cols[:, 0, :]
            row_hits.index_add_(0, rows.flatten(), above.any(dim=2).flatten().int())
            col_hits.index_add_(0, cols.flatten(), above.any(dim=1).flatten().int())

        if known is not None:
            write(known.image * n + known.row, known.block, known.values)
        for _, filled, flat, block, probs in self._products(kernels, pairs):
            write(flat[filled], block[:, None].expand_as(flat)[filled], probs[filled])
        h, w = self.size
        return KeptProbs(
            probs=out[:, :, :h, :w].reshape(b, n, h * w),
            rows=(row_hits > 0).view(b, n, hb * BLOCK)[:, :, :h],
            cols=(col_hits > 0).view(b, n, wb * BLOCK)[:, :, :w],
        )

    def _pairs(self, active: torch.Tensor) -> Optional[torch.Tensor]:
        """int64 [P, 3] (image, candidate, block) of bool [B, n, nb], or None where more than
        `DENSE_FRACTION` are True."""
        pairs = active.nonzero()
        return None if pairs.shape[0] > DENSE_FRACTION * active.numel() else pairs

    def _products(self, kernels: torch.Tensor, pairs: torch.Tensor) -> Iterator[tuple]:
        """Probabilities of the (image, candidate, block) `pairs` [P, 3], a bucket of blocks at a
        time. Yields table [g, W] (pair indices), filled [g, W] (bool, False for padding), the
        candidates [g, W] (image * n + candidate), the blocks [g] and float32 [g, W, 64]
        probabilities (0 outside the extent), in `scratch`: valid until the next group."""
        b, n, e = kernels.shape
        hb, wb = self.grid
        num_blocks = hb * wb
        # Rows of 8 pixels and their channels, so that gathers copy runs of memory.
        feature_rows = self.features.view(-1, BLOCK * e)  # [B * H' * wb, 8 E]
        inside_rows = self.inside.view(-1, BLOCK)  # [B * H' * wb, 8]
        kernels = kernels.reshape(b * n, e)
        cand = pairs[:, 0] * n + pairs[:, 1]
        key = pairs[:, 0] * num_blocks + pairs[:, 2]
        take, device = self.scratch.take, kernels.device
        for keys, table, filled in groups_by_key(key, b * num_blocks):
            image, block = keys // num_blocks, keys % num_blocks
            rows = _block_rows(block, wb)
            index = (image * (hb * BLOCK * wb))[:, None] + rows  # rows in the batch's map
            features = take("features", (index.numel(), BLOCK * e), device)
            torch.index_select(feature_rows, 0, index.flatten(), out=features)
            features = features.view(-1, BLOCK * BLOCK, e)
            flat = cand[table]  # [g, W]
            # One product per block: its candidates [g, W, E] by its pixels [g, E, 64].
            chunk = take("kernels", (flat.numel(), e), device)
            torch.index_select(kernels, 0, flat.flatten(), out=chunk)
            chunk = chunk.view(*flat.shape, e)
            probs = take("probs", (*flat.shape, BLOCK * BLOCK), device)
            torch.bmm(chunk, features.mT, out=probs).sigmoid_()
            if not self.all_inside:
                probs.mul_(inside_rows.index_select(0, index.flatten()).view(-1, 1, BLOCK * BLOCK))
            yield table, filled, flat, block, probs


def _block_rows(block: torch.Tensor, blocks_per_row: int) -> torch.Tensor:
    """int64 [N, 8]: the rows of 8 pixels of the blocks int64 [N] (indices of rows of 8 pixels
    in an image's H' x W' map, row-major)."""
    pixels = torch.arange(BLOCK, device=block.device)
    rows = (block // blocks_per_row * BLOCK)[:, None] + pixels  # rows of the image
    return rows * blocks_per_row + (block % blocks_per_row)[:, None]


def _around(active: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """bool [B, n, nb]: the blocks of bool [B, n, nb] and their 8 neighbours in the grid."""
    b, n, num_blocks = active.shape
    x = active.view(b * n, 1, *grid).float()
    return (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) > 0).view(b, n, num_blocks)


def _next_to_pixels_above(
    known: BlockBits, thresh: float, grid: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (image, mask, block) int64 [Q] each of the blocks within `REACH` pixels of a pixel
    above `thresh` of the known blocks, in the 8 directions (a block itself included where it
    has one)."""
    hb, wb = grid
    above = (known.values > thresh).view(-1, BLOCK, BLOCK)
    top, bottom = slice(0, REACH), slice(BLOCK - REACH, BLOCK)
    # Per column: a pixel above in the top rows, in any row, in the bottom rows.
    by_column = torch.stack(
        [above[:, top].any(dim=1), above.any(dim=1), above[:, bottom].any(dim=1)], dim=1
    )
    # [P, 3, 3]: a pixel above on the side of the neighbour (dy + 1, dx + 1).
    sides = torch.stack(
        [by_column[..., top].any(dim=2), by_column.any(dim=2), by_column[..., bottom].any(dim=2)],
        dim=2,
    )
    p, dy, dx = sides.nonzero().unbind(1)
    y, x = known.block[p] // wb + dy - 1, known.block[p] % wb + dx - 1
    inside = (y >= 0) & (y < hb) & (x >= 0) & (x < wb)
    return known.image[p][inside], known.row[p][inside], (y * wb + x)[inside]


def _block_pixels(block: torch.Tensor, blocks_per_row: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel rows int64 [N, 8, 1] and columns [N, 1, 8] of the blocks int64 [N]."""
    pixels = torch.arange(BLOCK, device=block.device)
    rows = (block // blocks_per_row * BLOCK)[:, None, None] + pixels[:, None]
    cols = (block % blocks_per_row * BLOCK)[:, None, None] + pixels
    return rows, cols
