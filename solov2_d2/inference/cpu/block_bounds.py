"""Interval bounds of 1 x 1 dynamic-kernel logits over blocks of pixels, checked on super-blocks
first.

A kernel k's logit at a pixel of a block is at most sum_c max(k_c high_c, k_c low_c), with high
and low each channel's largest and smallest value in the block. Over a super-block of
`SUPER` x `SUPER` blocks the same bound with the super-block's ranges is at least each block's:
a (candidate, block) pair can pass only where its (candidate, super-block) pair does, so only
those pairs' blocks are bounded. Compact masks pass in a few percent of the super-blocks; where
most pairs pass, every block is bounded at once (`every_block`, the plain version).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .block_groups import groups_by_key
from .buffers import Scratch

__all__ = ["SUPER", "BlockBounds"]

# Blocks per side of a super-block.
SUPER = 4
# Above this fraction of (candidate, super-block) pairs that may pass, bounding every block at
# once is cheaper.
_EVERY_BLOCK_FRACTION = 0.25


def _may_reach(bound: torch.Tensor, scale: torch.Tensor, logit: float) -> torch.Tensor:
    """Whether bounds may reach `logit`, with a margin for the rounding of the bounds and of the
    logits: both sum E products, whose rounding stays far below 1e-4 |k| |f| for E up to 1000
    (`scale`: |k| times the norm of the channels' largest magnitudes)."""
    return bound + (1e-3 + 1e-4 * scale) > logit


class BlockBounds:
    """Per-block channel ranges of a batch's mask features, and of their super-blocks.

    Attributes:
        ranges: float32 [B, 2E, nb], each block's largest then smallest channel values.
        largest: float32 [B, nb], the norm of each block's largest channel magnitudes.
        super_ranges, super_largest: the same for the super-blocks, [B, 2E, ns] and [B, ns].
        super_blocks: int64 [ns, SUPER^2], the blocks of each super-block (nb past the grid).
        inner_ranges, inner_largest: float32 [B * ns, SUPER^2, 2E] and [B * ns, SUPER^2], the
            ranges of each super-block's blocks (0 past the grid).
    """

    def __init__(
        self,
        high: torch.Tensor,
        low: torch.Tensor,
        grid: Tuple[int, int],
        scratch: Optional[Scratch] = None,
    ):
        """
        Args:
            high, low: float32 [B, nb, E], each channel's largest and smallest value in each
                block of a grid of (blocks per column, blocks per row) = `grid`.
            scratch: holds the products' operands (a new one if None).
        """
        self.scratch = scratch or Scratch()
        b, nb, e = high.shape
        hb, wb = grid
        sh, sw = math.ceil(hb / SUPER), math.ceil(wb / SUPER)
        ranges = torch.cat([high, low], dim=2)  # [B, nb, 2E]
        self.ranges = ranges.transpose(1, 2)
        self.largest = torch.maximum(high.abs(), low.abs()).norm(dim=2)
        # Partial super-blocks at the grid's edges hold the blocks that are there.
        on_grid = lambda x: x.transpose(1, 2).unflatten(2, grid)  # noqa: E731
        pool = lambda x: F.max_pool2d(x, SUPER, ceil_mode=True).flatten(2)  # noqa: E731
        super_high, super_low = pool(on_grid(high)), -pool(-on_grid(low))  # [B, E, ns]
        self.super_ranges = torch.cat([super_high, super_low], dim=1)
        self.super_largest = torch.maximum(super_high.abs(), super_low.abs()).norm(dim=1)
        rows = torch.arange(sh * SUPER, device=high.device).view(sh, SUPER)
        cols = torch.arange(sw * SUPER, device=high.device).view(sw, SUPER)
        blocks = rows[:, None, :, None] * wb + cols[None, :, None, :]  # [sh, sw, SUPER, SUPER]
        past = (rows >= hb)[:, None, :, None] | (cols >= wb)[None, :, None, :]
        self.super_blocks = blocks.masked_fill(past, nb).view(sh * sw, SUPER * SUPER)
        # The grid padded to whole super-blocks, each super-block's blocks together.
        pad = (0, sw * SUPER - wb, 0, sh * SUPER - hb)
        ranges = F.pad(ranges.unflatten(1, grid), (0, 0) + pad)  # [B, sh * S, sw * S, 2E]
        ranges = ranges.unflatten(2, (sw, SUPER)).unflatten(1, (sh, SUPER))
        self.inner_ranges = ranges.transpose(2, 3).reshape(-1, SUPER * SUPER, 2 * e)
        largest = F.pad(self.largest.unflatten(1, grid), pad)  # [B, sh * S, sw * S]
        largest = largest.unflatten(2, (sw, SUPER)).unflatten(1, (sh, SUPER))
        self.inner_largest = largest.transpose(2, 3).reshape(-1, SUPER * SUPER)

    def every_block(self, kernels: torch.Tensor, logit: float) -> torch.Tensor:
        """bool [B, n, nb]: whether each block's bound for kernels float32 [B, n, E] may reach
        `logit`, for every block."""
        signed = torch.cat([kernels.clamp(min=0), kernels.clamp(max=0)], dim=2)
        scale = kernels.norm(dim=2)[:, :, None] * self.largest[:, None, :]
        return _may_reach(signed @ self.ranges, scale, logit)

    def may_reach(self, kernels: torch.Tensor, logit: float) -> torch.Tensor:
        """bool [B, n, nb], as `every_block`, bounding only the blocks of the super-blocks whose
        bound may reach `logit`."""
        b, n, _ = kernels.shape
        nb, ns = self.largest.shape[1], self.super_largest.shape[1]
        signed = torch.cat([kernels.clamp(min=0), kernels.clamp(max=0)], dim=2)  # [B, n, 2E]
        norms = kernels.norm(dim=2)  # [B, n]
        scale = norms[:, :, None] * self.super_largest[:, None, :]
        pairs = _may_reach(signed @ self.super_ranges, scale, logit).nonzero()
        if pairs.shape[0] > _EVERY_BLOCK_FRACTION * b * n * ns:
            return self.every_block(kernels, logit)
        # A slot past the blocks takes the super-blocks' places past the grid.
        out = torch.zeros((b * n, nb + 1), dtype=torch.bool, device=kernels.device)
        signed, norms = signed.flatten(0, 1), norms.flatten()
        candidate = pairs[:, 0] * n + pairs[:, 1]
        # One product per super-block: its candidates' kernels by its blocks' ranges.
        take, device = self.scratch.take, kernels.device
        for keys, table, filled in groups_by_key(pairs[:, 0] * ns + pairs[:, 2], b * ns):
            rows = candidate[table]  # [g, W]
            chunk = take("signed", (rows.numel(), signed.shape[1]), device)
            torch.index_select(signed, 0, rows.flatten(), out=chunk)
            ranges = self.inner_ranges.index_select(0, keys).mT  # [g, 2E, S^2]
            bound = take("bound", (*rows.shape, ranges.shape[2]), device)
            torch.bmm(chunk.view(*rows.shape, -1), ranges, out=bound)  # [g, W, S^2]
            scale = norms[rows][:, :, None] * self.inner_largest[keys][:, None, :]
            blocks = self.super_blocks[keys % ns]  # [g, SUPER^2]
            reach = _may_reach(bound, scale, logit) & filled[:, :, None] & (blocks < nb)[:, None]
            index = rows[:, :, None] * (nb + 1) + blocks[:, None, :]
            out.view(-1)[index[reach]] = True
        return out[:, :nb].view(b, n, nb)
