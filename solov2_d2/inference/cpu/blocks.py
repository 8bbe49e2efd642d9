"""The grid of pixel blocks that the CPU's fast paths work on: its sizes and the limits where
the fast paths give up, interval bounds of mask logits over blocks, the grouping of block
products, and the buffers their loops reuse.

Bounds: a 1 x 1 kernel k's logit at a pixel of a block is at most sum_c max(k_c high_c,
k_c low_c), with high and low each channel's largest and smallest value in the block. Over a
super-block of `SUPER` x `SUPER` blocks the same bound with the super-block's ranges is at least
each block's: a (candidate, block) pair can pass only where its (candidate, super-block) pair
does, so only those pairs' blocks are bounded (`BlockBounds.may_reach`). Compact masks pass in a
few percent of the super-blocks; where most pairs pass, every block is bounded at once
(`BlockBounds.every_block`, the plain version).
"""
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..masks import MIN_PRODUCT_ROWS

__all__ = [
    "BLOCK",
    "REACH",
    "SUPER",
    "BlockBounds",
    "Buffer",
    "groups_by_key",
]

# Pixels per side of a block, and blocks per side of a super-block.
BLOCK = 8
SUPER = 4
# Bilinear interpolation reads mask pixels at most this far from an output pixel's position:
# upsampling, then resizing to the output, both bilinear (the kept masks' probabilities must be
# exact this far around their pixels near the threshold), and each crop of cropped pasting
# keeps this margin so that its interpolation equals the whole map's.
REACH = 2
# Mask pixels this far below the threshold cannot give an upsampled value above it.
NEAR_MARGIN = 1e-3

# Where the fast paths give up (README, docs/speed.md): above these fractions of the work that
# may pass the threshold, computing everything is cheaper.
# (candidate, block) pairs, for scoring and the kept masks' probabilities;
DENSE_FRACTION = 0.25
# (candidate, super-block) pairs, for the block bounds;
EVERY_BLOCK_FRACTION = 0.25
# the mask map covered by the crops, for pasting.
CROP_FRACTION = 0.125
# Below these amounts of work their fixed costs outweigh what they save ("auto"): candidates x
# mask pixels for scoring, masks x output pixels for pasting.
BLOCKS_LEAST_WORK = 1 << 22
CROP_LEAST_WORK = 1 << 24
# Rows (candidate slots) of the products computed at once: with E = 256 their kernels take 4 MB
# and their blocks' features at most 16 MB, so that memory stays bounded whatever the load.
_GROUP_ROWS = 4096


class Buffer:
    """Memory that the steps of a loop reuse for one of their temporaries.

    A large tensor allocated afresh may take new pages from the OS, each faulting when first
    written; one reused from step to step faults once. Owned by the object whose loop uses it,
    and freed with it.
    """

    def __init__(self):
        self._memory: Optional[torch.Tensor] = None

    def take(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` on `device`, valid until the next
        `take` (the memory grows where it is too small)."""
        numel = math.prod(shape)
        memory = self._memory
        if (
            memory is None
            or memory.numel() < numel
            or memory.dtype != dtype
            or memory.device != torch.device(device)
        ):
            memory = self._memory = torch.empty(numel, dtype=dtype, device=device)
        return memory[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return 0 if self._memory is None else self._memory.numel() * self._memory.element_size()


def groups_by_key(key: torch.Tensor, num_keys: int) -> Iterator[tuple]:
    """Group the items of int64 keys [P] (in [0, num_keys)) for batched products.

    Keys are bucketed by their number of items, padded to the next power of two (at least
    `MIN_PRODUCT_ROWS`), so that padding at most doubles the work, and split into groups of at
    most `_GROUP_ROWS` rows. Yields per group: its keys [g] (increasing), table [g, W] (item
    indices, in increasing order; 0 for padding) and filled [g, W] (bool, False for padding).
    """
    counts = torch.bincount(key, minlength=num_keys)
    widths = counts.clamp(min=MIN_PRODUCT_ROWS).float().log2().ceil().exp2().long()
    used = counts.nonzero()[:, 0]
    # Keys by (width, key) and items by (width, key, index): a group's keys and items are then
    # contiguous ranges, so each group touches only its own items.
    keys = used[widths[used].argsort(stable=True)]
    order = (widths[key] * num_keys + key).argsort(stable=True)
    sizes = counts[keys]
    item_key = torch.arange(keys.shape[0], device=key.device).repeat_interleave(sizes)  # [P]
    ends = sizes.cumsum(0)
    rank = torch.arange(key.shape[0], device=key.device) - (ends - sizes)[item_key]
    # Host reads: the group boundaries.
    bucket_widths, bucket_sizes = torch.unique_consecutive(widths[keys], return_counts=True)
    ends = [0] + ends.tolist()
    bucket_start = 0
    for width, size in zip(bucket_widths.tolist(), bucket_sizes.tolist()):
        bucket_stop, step = bucket_start + size, max(1, _GROUP_ROWS // width)
        for start in range(bucket_start, bucket_stop, step):
            stop = min(start + step, bucket_stop)
            items = slice(ends[start], ends[stop])
            table = torch.zeros((stop - start, width), dtype=torch.long, device=key.device)
            filled = torch.zeros((stop - start, width), dtype=torch.bool, device=key.device)
            index = (item_key[items] - start, rank[items])
            table[index] = order[items]
            filled[index] = True
            yield keys[start:stop], table, filled
        bucket_start = bucket_stop


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
    ):
        """
        Args:
            high, low: float32 [B, nb, E], each channel's largest and smallest value in each
                block of a grid of (blocks per column, blocks per row) = `grid`.
        """
        self._signed, self._bound = Buffer(), Buffer()
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
        if pairs.shape[0] > EVERY_BLOCK_FRACTION * b * n * ns:
            return self.every_block(kernels, logit)
        # A slot past the blocks takes the super-blocks' places past the grid.
        out = torch.zeros((b * n, nb + 1), dtype=torch.bool, device=kernels.device)
        signed, norms = signed.flatten(0, 1), norms.flatten()
        candidate = pairs[:, 0] * n + pairs[:, 1]
        # One product per super-block: its candidates' kernels by its blocks' ranges.
        device = kernels.device
        for keys, table, filled in groups_by_key(pairs[:, 0] * ns + pairs[:, 2], b * ns):
            rows = candidate[table]  # [g, W]
            chunk = self._signed.take((rows.numel(), signed.shape[1]), device)
            torch.index_select(signed, 0, rows.flatten(), out=chunk)
            ranges = self.inner_ranges.index_select(0, keys).mT  # [g, 2E, S^2]
            bound = self._bound.take((*rows.shape, ranges.shape[2]), device)
            torch.bmm(chunk.view(*rows.shape, -1), ranges, out=bound)  # [g, W, S^2]
            scale = norms[rows][:, :, None] * self.inner_largest[keys][:, None, :]
            blocks = self.super_blocks[keys % ns]  # [g, SUPER^2]
            reach = _may_reach(bound, scale, logit) & filled[:, :, None] & (blocks < nb)[:, None]
            index = rows[:, :, None] * (nb + 1) + blocks[:, None, :]
            out.view(-1)[index[reach]] = True
        return out[:, :nb].view(b, n, nb)
