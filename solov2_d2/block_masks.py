"""The CPU's fast path for scoring candidate masks: only the blocks of pixels where a mask can
pass the threshold are computed.

Steps 3-5 of post-processing need, per candidate, its binary mask (probability > threshold), its
area and the sum of its probabilities inside it; pixels below the threshold count in none of them.
`MaskBlocks` cuts an image's mask features into blocks of 8 x 8 pixels and bounds every
candidate's logit over each block by the interval bound: each channel at its most favourable
value in the block. Only the (candidate, block) pairs whose bound reaches the threshold are
computed, by matrix products grouped by block. Where many pairs may pass (large masks),
`score` returns None and the caller computes every pixel.

The results are the plain path's: the logits are the same float32 dot products (each product has
at least 16 candidates, laid out as the plain path's), areas are integer counts and probability
sums are exact in float64 whatever their order.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "MaskBlocks"]

BLOCK = 8
# Products of fewer candidates take other BLAS kernels, which round differently from the plain
# path's products.
_MIN_PRODUCT_ROWS = 16
# Above this fraction of (candidate, block) pairs that may pass, computing every pixel is cheaper.
DENSE_FRACTION = 0.25


class MaskBlocks:
    """Mask features of a batch with per-block channel ranges, to score 1 x 1 dynamic kernels.

    Attributes:
        features: float32 [B, H', W', E], the mask features channels-last, padded with zeros to
            H' and W', multiples of 8 (a view without copy when they already are).
        inside: float32 [B, H', W'], 1 for the pixels of each image's extent, else 0.
        high, low: float32 [B, nb, E], each channel's largest and smallest value in each block
            (nb = H' W' / 64; over all of a block's pixels: a bound over more pixels is still a
            bound).
    """

    def __init__(self, mask_features: torch.Tensor, inside: Optional[torch.Tensor] = None):
        """
        Args:
            mask_features: float32 [B, E, H, W].
            inside: float32 [B, 1, H * W], 1 inside each image's extent; None: all inside.
        """
        b, e, h, w = mask_features.shape
        self.size = (h, w)
        pad = (0, -w % BLOCK, 0, -h % BLOCK)
        if inside is None:
            inside = mask_features.new_ones((b, 1, h * w))
        if any(pad):
            mask_features = F.pad(mask_features, pad)
        self.features = mask_features.permute(0, 2, 3, 1)  # [B, H', W', E]
        self.inside = F.pad(inside.view(b, h, w), pad)
        self.blocks = (self.features.shape[1] // BLOCK, self.features.shape[2] // BLOCK)
        by_block = self.features.unflatten(2, (-1, BLOCK)).unflatten(1, (-1, BLOCK))
        # Two single-dimension reductions: much faster than one over both on this layout.
        self.high = by_block.amax(dim=2).amax(dim=3).flatten(1, 2)  # [B, nb, E]
        self.low = by_block.amin(dim=2).amin(dim=3).flatten(1, 2)
        in_block = self.inside.unflatten(2, (-1, BLOCK)).unflatten(1, (-1, BLOCK))
        self.has_inside = in_block.amax(dim=2).amax(dim=3).flatten(1) > 0  # [B, nb]
        # Scale of the products, for the rounding margin.
        self.largest = torch.maximum(self.high.abs(), self.low.abs()).norm(dim=2)  # [B, nb]

    def may_pass(self, kernels: torch.Tensor, thresh: float) -> torch.Tensor:
        """bool [B, n, nb]: whether a pixel of each block may have a probability above `thresh`
        for the kernels float32 [B, n, E]; never False where one does (the interval bound, with
        a margin for the rounding of the bound and of the logits)."""
        if thresh <= 0:
            return self.has_inside[:, None, :].expand(-1, kernels.shape[1], -1)
        logit = math.log(thresh / (1 - thresh))
        high, low = self.high.transpose(1, 2), self.low.transpose(1, 2)
        bound = kernels.clamp(min=0) @ high + kernels.clamp(max=0) @ low  # [B, n, nb]
        # Both sum E products: rounding stays far below 1e-4 |k| |f| for E up to 1000.
        margin = 1e-3 + 1e-4 * kernels.norm(dim=2, keepdim=True) * self.largest[:, None, :]
        return (bound + margin > logit) & self.has_inside[:, None, :]

    def score(
        self, kernels: torch.Tensor, valid: torch.Tensor, thresh: float
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Areas, probability sums and binary masks of candidates, or None where more than
        `DENSE_FRACTION` of the (candidate, block) pairs may pass.

        Args:
            kernels: float32 [B, n, E], 1 x 1 dynamic kernels.
            valid: bool [B, n]; invalid candidates are not computed (their results are 0).
            thresh: binarisation threshold of the probabilities.
        Returns:
            int32 [B, n] areas, float64 [B, n] sums of the probabilities above `thresh` and bool
            [B, n, H * W] binary masks, as the plain path's.
        """
        pairs = (self.may_pass(kernels, thresh) & valid[:, :, None]).nonzero()  # [P, 3]
        b, n = valid.shape
        num_blocks = self.high.shape[1]
        if pairs.shape[0] > DENSE_FRACTION * b * n * num_blocks:
            return None
        areas = torch.zeros(b * n, dtype=torch.int32, device=kernels.device)
        sums = torch.zeros(b * n, dtype=torch.float64, device=kernels.device)
        binary = kernels.new_zeros((b, n, *self.features.shape[1:3]), dtype=torch.bool)
        pixels = torch.arange(BLOCK, device=kernels.device)
        for image, cand, block, filled in _groups_by_block(pairs, b * num_blocks, num_blocks):
            rows = (block // self.blocks[1] * BLOCK)[:, None, None] + pixels[:, None]  # [g, 8, 1]
            cols = (block % self.blocks[1] * BLOCK)[:, None, None] + pixels  # [g, 1, 8]
            image_px = image[:, None, None]
            features = self.features[image_px, rows, cols].flatten(1, 2)  # [g, 64, E]
            # One product per block: its candidates [g, width, E] by its pixels [g, E, 64].
            logits = torch.bmm(kernels[image[:, None], cand], features.mT)
            probs = logits.sigmoid_().mul_(self.inside[image_px, rows, cols].flatten(1)[:, None])
            above = probs > thresh
            flat = (image[:, None] * n + cand)[filled]
            areas.index_add_(0, flat, above.sum(dim=2, dtype=torch.int32)[filled])
            probs = F.threshold_(probs, thresh, 0.0).sum(dim=2, dtype=torch.float64)
            sums.index_add_(0, flat, probs[filled])
            slot = filled.nonzero(as_tuple=True)[0]
            binary[image_px[slot], cand[filled][:, None, None], rows[slot], cols[slot]] = above[
                filled
            ].view(-1, BLOCK, BLOCK)
        h, w = self.size
        return areas.view(b, n), sums.view(b, n), binary[:, :, :h, :w].reshape(b, n, h * w)


def _groups_by_block(pairs: torch.Tensor, num_keys: int, num_blocks: int):
    """Group (image, candidate, block) pairs [P, 3] by (image, block) for batched products.

    Blocks are bucketed by their number of candidates, padded to the next power of two (at least
    `_MIN_PRODUCT_ROWS`), so that padding at most doubles the work. Yields per bucket: image [g],
    candidate [g, width] (0 for padding), block [g] (int64) and filled [g, width] (bool, False
    for padding); candidates in increasing order within a block.
    """
    key = pairs[:, 0] * num_blocks + pairs[:, 2]
    key, order = key.sort(stable=True)
    cand = pairs[order, 1]
    counts = torch.bincount(key, minlength=num_keys)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(key.shape[0], device=key.device) - starts[key]
    widths = counts.clamp(min=_MIN_PRODUCT_ROWS).float().log2().ceil().exp2().long()
    widths = widths.masked_fill_(counts == 0, 0)
    for width in widths.unique().tolist():
        if width == 0:
            continue
        keys = (widths == width).nonzero()[:, 0]  # [g]
        row = torch.full((num_keys,), -1, dtype=torch.long, device=key.device)
        row[keys] = torch.arange(keys.shape[0], device=key.device)
        members = row[key] >= 0
        table = torch.zeros((keys.shape[0], width), dtype=torch.long, device=key.device)
        filled = torch.zeros((keys.shape[0], width), dtype=torch.bool, device=key.device)
        table[row[key[members]], rank[members]] = cand[members]
        filled[row[key[members]], rank[members]] = True
        yield keys // num_blocks, table, keys % num_blocks, filled
