"""The CPU's faster computation of the candidate masks, with the plain results: only the blocks
of pixels where a mask can pass the threshold are computed.

Steps 3-6 of post-processing need, per candidate, its binary mask (probability > threshold), its
area, the sum of its probabilities inside it and its intersections with other masks; pixels
below the threshold count in none of them. `MaskBlocks` cuts an image's mask features into blocks
of 8 x 8 pixels and bounds every candidate's logit over each block (`BlockBounds`). Only the
(candidate, block) pairs whose bound reaches the threshold are computed, by matrix products
grouped by block, and the binary masks stay in that form (`BlockBits`, with the blocks'
probabilities) through Matrix NMS. The kept masks' probabilities for pasting then need products
only where a pixel within `REACH` of one near the threshold lies outside those blocks. Where
many pairs may pass (large masks), the methods return None and the plain computation runs.

The results are the plain path's: the logits are the same float32 dot products (each product has
at least 16 candidates, laid out as the plain path's), areas and intersections are integer
counts and probability sums are exact in float64 whatever their order.

`CPUCandidateMasks` puts these, int8 mask intersections and cropped pasting
(:mod:`.cropped_paste`) behind the interface of :class:`~..masks.CandidateMasks`.

Bounds: a 1 x 1 kernel k's logit at a pixel of a block is at most sum_c max(k_c high_c,
k_c low_c), with high and low each channel's largest and smallest value in the block. Over a
super-block of `SUPER` x `SUPER` blocks the same bound with the super-block's ranges is at least
each block's: a (candidate, block) pair can pass only where its (candidate, super-block) pair
does, so only those pairs' blocks are bounded (`BlockBounds.may_reach`). Compact masks pass in a
few percent of the super-blocks; where most pairs pass, every block is bounded at once
(`BlockBounds.every_block`, the plain version).
"""
import functools
import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..masks import MIN_PRODUCT_ROWS, CandidateMasks, KeptMasks, ScoredMasks
from .cropped_paste import NEAR_MARGIN, REACH, paste_cropped

__all__ = [
    "BLOCK",
    "SUPER",
    "BlockBits",
    "BlockBounds",
    "Buffer",
    "CPUCandidateMasks",
    "MaskBlocks",
    "dense_intersections",
    "groups_by_key",
]

# Pixels per side of a block, and blocks per side of a super-block.
BLOCK = 8
SUPER = 4

# Where the fast paths give up (README, docs/speed.md): above these fractions of the work that
# may pass the threshold, computing everything is cheaper.
# (candidate, block) pairs, for scoring and the kept masks' probabilities;
DENSE_FRACTION = 0.25
# (candidate, super-block) pairs, for the block bounds (for pasting: `CROP_FRACTION`).
EVERY_BLOCK_FRACTION = 0.25
# Below these amounts of work their fixed costs outweigh what they save ("auto"): candidates x
# mask pixels for scoring, masks x output pixels for pasting.
BLOCKS_LEAST_WORK = 1 << 22
CROP_LEAST_WORK = 1 << 24
# Rows (candidate slots) of the products computed at once: with E = 256 their kernels take 4 MB
# and their blocks' features at most 16 MB, so that memory stays bounded whatever the load.
_GROUP_ROWS = 4096

# Scoring keeps its blocks' probabilities while they take at most this much memory per chunk.
_VALUES_MAX_BYTES = 1 << 26
# Cropped pasting pads a chunk's crops to their largest size: smaller chunks pad less.
_CROP_CHUNK_BYTES = 1 << 22
# Candidates whose bounds decide at once whether scoring may take the blocks.
_SAMPLE = 64


class CPUCandidateMasks(CandidateMasks):
    """Candidate masks computed block by block on the CPU (`MaskBlocks`), intersected in int8
    where torch offers it and pasted around their pixels near the threshold, with the plain
    computation's results.

    Each step falls back to the plain computation where most of its work may pass the
    threshold (large masks) and, unless `force`, where the work is too small for it to pay;
    `paths` records what each step took.

    Args:
        args: those of `CandidateMasks` (mask_features, inside, mask_thresh, mask_stride,
            chunk_size).
        kernels: float32 [B, K, D], the kernels of all the batch's candidates (a sample of them
            decides whether scoring takes the blocks); valid: bool [B, K].
        force: take every fast path whatever the work.
    """

    def __init__(
        self, *args, kernels: torch.Tensor, valid: torch.Tensor, force: bool = False
    ):
        super().__init__(*args)
        self.force = force
        self.blocks = self._mask_blocks(kernels, valid)
        if self.blocks is not None:
            # Blocks hold at most bool masks where the plain computation holds float32
            # probabilities: four times the candidates at once.
            self.scoring_chunk_size = 4 * self.chunk_size

    @classmethod
    def choose(
        cls, *args, kernels: torch.Tensor, valid: torch.Tensor, force: bool = False
    ) -> CandidateMasks:
        """This computation, or the plain one where `force` is False and the masks are not on
        the CPU or are being exported (a graph holds the plain computation); arguments as the
        class's."""
        mask_features = args[0]
        on_cpu = mask_features.device.type == "cpu" and not torch.compiler.is_exporting()
        if not (force or on_cpu):
            return CandidateMasks(*args)
        return cls(*args, kernels=kernels, valid=valid, force=force)

    def _mask_blocks(self, kernels: torch.Tensor, valid: torch.Tensor) -> Optional["MaskBlocks"]:
        """`MaskBlocks` of the batch, or None where scoring should take the plain computation:
        kernels larger than 1 x 1, too little work, or most blocks of a sample of the candidates
        may pass (large masks: the chunks would take the plain computation after bounding)."""
        features = self.mask_features
        work = kernels.shape[1] * features.shape[2] * features.shape[3]
        if kernels.shape[2] != features.shape[1] or not (self.force or work >= BLOCKS_LEAST_WORK):
            return None
        blocks = MaskBlocks(features, self.inside)
        step = max(1, kernels.shape[1] // _SAMPLE)
        sample, in_sample = kernels[:, ::step], valid[:, ::step]
        if blocks.pass_fraction(sample, in_sample, self.mask_thresh) > DENSE_FRACTION:
            return None
        return blocks

    def score(self, kernels: torch.Tensor, valid: torch.Tensor) -> ScoredMasks:
        if self.blocks is None:
            return super().score(kernels, valid)
        found = self.blocks.score(kernels, valid, self.mask_thresh)
        if found is not None:
            self._took("scoring", "blocks")
            areas, sums, bits = found
            return ScoredMasks(areas.float(), sums.float(), bits)
        # Most pixels of this chunk may pass: the plain computation, `chunk_size` at a time.
        size = self.chunk_size
        parts = [
            super(CPUCandidateMasks, self).score(kernels[:, i : i + size], valid[:, i : i + size])
            for i in range(0, kernels.shape[1], size)
        ]
        return ScoredMasks(*(torch.cat(x, dim=1) for x in zip(*parts)))

    def cat(self, parts: List):
        if all(isinstance(p, BlockBits) for p in parts):
            return BlockBits.cat(parts)
        return super().cat([p.dense() if isinstance(p, BlockBits) else p for p in parts])

    def select(self, binary, order: torch.Tensor):
        if isinstance(binary, BlockBits):
            return binary.select(order)
        return super().select(binary, order)

    def intersections(self, binary) -> torch.Tensor:
        if isinstance(binary, BlockBits):
            self._took("intersections", "blocks")
            return self.blocks.intersections(binary)
        counts = dense_intersections(binary)
        if counts is None:
            return super().intersections(binary)
        self._took("intersections", "int8")
        return counts

    def kept(self, kernels: torch.Tensor, binary) -> KeptMasks:
        if self.blocks is not None:
            known = binary if isinstance(binary, BlockBits) else None
            found = self.blocks.probs(kernels, self.mask_thresh - NEAR_MARGIN, known)
            if found is not None:
                self._took("kept masks", "blocks")
                return found
        return super().kept(kernels, binary)

    def paste(self, probs, image_size, output_size, near_lines=None):
        work = probs.shape[0] * output_size[0] * output_size[1]
        if tuple(output_size) == tuple(image_size) and (self.force or work >= CROP_LEAST_WORK):
            found = paste_cropped(
                probs, self.mask_thresh, self.mask_stride, image_size, _CROP_CHUNK_BYTES,
                near_lines,
            )
            if found is not None:
                self._took("pasting", "cropped")
                return found
        return super().paste(probs, image_size, output_size, near_lines)


@functools.lru_cache(maxsize=None)
def _int8_products_work() -> bool:
    """Whether this torch has `torch._int_mm` (a private API, so checked) and it gives exact
    counts of 0/1 int8 matrices on the CPU."""
    if not hasattr(torch, "_int_mm"):
        return False
    x = (torch.arange(32 * 40).view(32, 40) % 3 == 0).to(torch.int8)
    try:
        counts = torch._int_mm(x, x.t())
    except (RuntimeError, TypeError):
        return False
    return torch.equal(counts.float(), x.float() @ x.float().t())


def dense_intersections(masks: torch.Tensor) -> Optional[torch.Tensor]:
    """float32 [B, N, N] pixel counts |m_i & m_j| of bool masks [B, N, P] on the CPU, read as
    int8 (no copy) through int8 matrix products accumulated in int32: exact counts up to 2^31
    pixels, with a quarter of the memory traffic of float32. None where torch has no working
    int8 product for them (the caller takes the float32 one)."""
    if masks.dtype != torch.bool or masks.device.type != "cpu" or masks.shape[2] < 8:
        return None
    if not _int8_products_work():
        return None
    as_int8 = masks.contiguous().view(torch.int8)
    try:
        # 2-D products only: a loop over the images of the batch.
        counts = [torch._int_mm(x, x.t()) for x in as_int8]
    except RuntimeError:
        return None
    if not counts:
        return masks.new_zeros((0, masks.shape[1], masks.shape[1]), dtype=torch.float32)
    return torch.stack(counts).float()


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

    def intersections(self, buffers: Optional[Tuple["Buffer", "Buffer"]] = None) -> torch.Tensor:
        """float32 [B, n, n] pixel counts |m_i & m_j|, summed over the blocks both keep (exact
        integers, as `mask_intersections` of the dense masks); `buffers` hold the products'
        operands and results (new ones if None)."""
        b, n, _ = self.shape
        num_blocks = self.grid[0] * self.grid[1]
        # Padding takes a block without bits, of a mask n outside the result: no masking.
        bits = torch.cat([self.bits, self.bits.new_zeros((1, BLOCK * BLOCK))])
        row = torch.cat([self.row, self.row.new_full((1,), n)])
        counts = torch.zeros(b * (n + 1) * (n + 1), device=bits.device)
        key = self.image * num_blocks + self.block
        operands, products = buffers or (Buffer(), Buffer())
        for keys, table, filled in groups_by_key(key, b * num_blocks):
            g, w = table.shape
            table = table.masked_fill_(~filled, self.bits.shape[0])
            # The products' operands in float32, converted in the scratch.
            x = operands.take((g, w, BLOCK * BLOCK), bits.device)
            x.copy_(bits.index_select(0, table.flatten()).view(g, w, -1))  # [g, W, 64]
            masks = row[table]  # [g, W]
            rows = masks + (keys // num_blocks * (n + 1))[:, None]  # rows of the batch's counts
            index = rows[:, :, None] * (n + 1) + masks[:, None, :]  # [g, W, W]
            both = products.take((g, w, w), bits.device)
            torch.bmm(x, x.mT, out=both)
            counts.index_add_(0, index.flatten(), both.flatten())
        return counts.view(b, n + 1, n + 1)[:, :n, :n]


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
    ):
        """
        Args:
            mask_features: float32 [B, E, H, W].
            inside: float32 [B, 1, H * W], 1 inside each image's extent; None: all inside.
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
        self.bounds = BlockBounds(self.high, self.low, self.grid)
        # The loops' temporaries, reused from one group of products to the next.
        self._features, self._kernels, self._probs = Buffer(), Buffer(), Buffer()
        self._wide, self._bits, self._counts = Buffer(), Buffer(), Buffer()

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
            wide = self._wide.take(probs.shape, probs.device, torch.float64)
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

    def intersections(self, bits: BlockBits) -> torch.Tensor:
        """`bits.intersections()`, in this object's buffers."""
        return bits.intersections((self._bits, self._counts))

    def probs(
        self, kernels: torch.Tensor, near: float, known: Optional[BlockBits] = None
    ) -> Optional[KeptMasks]:
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
        out = torch.zeros((b, n, hb * BLOCK, wb * BLOCK), device=kernels.device)
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
        rows = (row_hits > 0).view(b, n, hb * BLOCK)[:, :, :h]
        cols = (col_hits > 0).view(b, n, wb * BLOCK)[:, :, :w]
        return KeptMasks(out[:, :, :h, :w].reshape(b, n, h * w), (rows, cols))

    def _pairs(self, active: torch.Tensor) -> Optional[torch.Tensor]:
        """int64 [P, 3] (image, candidate, block) of bool [B, n, nb], or None where more than
        `DENSE_FRACTION` are True."""
        pairs = active.nonzero()
        return None if pairs.shape[0] > DENSE_FRACTION * active.numel() else pairs

    def _products(self, kernels: torch.Tensor, pairs: torch.Tensor) -> Iterator[tuple]:
        """Probabilities of the (image, candidate, block) `pairs` [P, 3], a bucket of blocks at a
        time. Yields table [g, W] (pair indices), filled [g, W] (bool, False for padding), the
        candidates [g, W] (image * n + candidate), the blocks [g] and float32 [g, W, 64]
        probabilities (0 outside the extent), in this object's buffers: valid until the next
        group."""
        b, n, e = kernels.shape
        hb, wb = self.grid
        num_blocks = hb * wb
        # Rows of 8 pixels and their channels, so that gathers copy runs of memory.
        feature_rows = self.features.view(-1, BLOCK * e)  # [B * H' * wb, 8 E]
        inside_rows = self.inside.view(-1, BLOCK)  # [B * H' * wb, 8]
        kernels = kernels.reshape(b * n, e)
        cand = pairs[:, 0] * n + pairs[:, 1]
        key = pairs[:, 0] * num_blocks + pairs[:, 2]
        device = kernels.device
        for keys, table, filled in groups_by_key(key, b * num_blocks):
            image, block = keys // num_blocks, keys % num_blocks
            rows = _block_rows(block, wb)
            index = (image * (hb * BLOCK * wb))[:, None] + rows  # rows in the batch's map
            features = self._features.take((index.numel(), BLOCK * e), device)
            torch.index_select(feature_rows, 0, index.flatten(), out=features)
            features = features.view(-1, BLOCK * BLOCK, e)
            flat = cand[table]  # [g, W]
            # One product per block: its candidates [g, W, E] by its pixels [g, E, 64].
            chunk = self._kernels.take((flat.numel(), e), device)
            torch.index_select(kernels, 0, flat.flatten(), out=chunk)
            chunk = chunk.view(*flat.shape, e)
            probs = self._probs.take((*flat.shape, BLOCK * BLOCK), device)
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
