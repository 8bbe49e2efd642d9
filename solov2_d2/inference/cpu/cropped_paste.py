"""The fast path of pasting (step 7) where the output has the network input's size: each mask
is upsampled only around the pixels that can pass the threshold.

An upsampled pixel is a convex combination of its (at most 4) neighbours in the mask, so it can
pass the threshold only next to a mask pixel within a small margin of it; everywhere else it is
False. Each mask is upsampled over a crop of the mask map with `REACH` pixels around those:
inside the crop, bilinear upsampling by an integer factor computes the same coordinates and
weights as over the whole map (the crop starts at a multiple of the factor, a power of two), so
the pasted masks equal the plain path's.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..masks import first_last, masks_to_boxes

__all__ = ["CROP_FRACTION", "NEAR_MARGIN", "REACH", "paste_cropped"]

# Bilinear interpolation reads mask pixels at most this far from an output pixel's position:
# upsampling, then resizing to the output, both bilinear. Each crop keeps this margin so that its
# interpolation equals the whole map's, and the kept masks' probabilities must be exact this far
# around their pixels near the threshold (`block_masks.MaskBlocks.probs`).
REACH = 2
# Mask pixels this far below the threshold cannot give an upsampled value above it.
NEAR_MARGIN = 1e-3
# Above this fraction of the mask map covered by the crops, upsampling everything is cheaper.
CROP_FRACTION = 0.125

# Outputs of at most this many pixels are written through int32 positions.
_INT32_POSITIONS = torch.iinfo(torch.int32).max


def paste_cropped(
    soft: torch.Tensor,
    thresh: float,
    stride: int,
    image_size: Tuple[int, int],
    max_bytes: int,
    near_lines: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Threshold the bilinear upsampling (align_corners False) by `stride` of mask probabilities
    float32 [N, h_m, w_m], cropped to `image_size` (h, w): bool [N, h, w] masks and their float32
    [N, 4] XYXY boxes; None where the crops would cover most of the map, or where `stride` is
    not a power of two.

    Masks are processed in chunks of similar crop sizes, each within `max_bytes` of float, index
    and bool intermediates. `near_lines`, bool [N, h_m] and [N, w_m], the rows and columns with
    a probability above `thresh - NEAR_MARGIN` where the caller knows them, saves reading every
    probability to find them.
    """
    num, h_m, w_m = soft.shape
    if stride & (stride - 1):
        return None  # 1 / stride must be exact in float for the crop's weights to be the same
    if near_lines is None:
        # amax of the bytes: faster than any() of bools on the CPU.
        near = (soft > thresh - NEAR_MARGIN).view(torch.uint8)
        near_lines = near.amax(dim=2) > 0, near.amax(dim=1) > 0
    rows, cols = near_lines  # [N, h_m], [N, w_m]
    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    # An empty mask gets a crop of one pixel.
    empty = ~rows.any(dim=1)
    top = (y0 - REACH).clamp(min=0)
    bottom = (y1 + REACH + 1).clamp(max=h_m).masked_fill(empty, 1)
    left = (x0 - REACH).clamp(min=0)
    right = (x1 + REACH + 1).clamp(max=w_m).masked_fill(empty, 1)
    top, left = top.masked_fill(empty, 0), left.masked_fill(empty, 0)
    heights, widths = bottom - top, right - left
    if int((heights * widths).sum()) > CROP_FRACTION * num * h_m * w_m:
        return None
    height, width = image_size
    masks = torch.zeros((num, height, width), dtype=torch.bool, device=soft.device)
    boxes = soft.new_zeros((num, 4))
    order = (heights * widths).argsort()
    arange = lambda n: torch.arange(n, device=soft.device)  # noqa: E731
    flat_masks = masks.view(torch.uint8).view(-1)
    # int32 positions where they fit: half the memory traffic of int64 ones.
    index_dtype = torch.int32 if flat_masks.numel() <= _INT32_POSITIONS else torch.long
    per_pixel = 13 * stride * stride  # float, position and bool intermediates per upsampled pixel
    for index, (hc, wc) in _chunks(heights[order], widths[order], per_pixel, max_bytes):
        index = order[index]
        # Crops of the common size, moved back where they would pass the map's edge.
        y, x = top[index].clamp(max=h_m - hc), left[index].clamp(max=w_m - wc)  # [k]
        rows, cols = y[:, None] + arange(hc), x[:, None] + arange(wc)  # [k, hc], [k, wc]
        # Gathered as whole windows of a (read-only) view of every window: a copy per crop
        # row, where indexing by rows and columns computes every pixel's position.
        crops = soft.unfold(1, hc, 1).unfold(2, wc, 1)[index, y, x]  # [k, hc, wc]
        size = (hc * stride, wc * stride)
        up = F.interpolate(crops[:, None], size=size, mode="bilinear", align_corners=False)
        up = up[:, 0] > thresh
        out_rows = rows[:, :1] * stride + arange(size[0])  # [k, stride * hc]
        out_cols = cols[:, :1] * stride + arange(size[1])
        # Host reads: most chunks lie inside the image, and one dimension at a time is cheaper.
        if int(out_rows[:, -1].max()) >= height:
            up &= (out_rows < height)[:, :, None]
        if int(out_cols[:, -1].max()) >= width:
            up &= (out_cols < width)[:, None, :]
        found = masks_to_boxes(up)
        offset = torch.stack([out_cols[:, 0], out_rows[:, 0]] * 2, dim=1)
        boxes[index] = (found + offset) * found.any(dim=1, keepdim=True)
        # Added, not written: positions outside the mask's own crop in the image (the chunk's
        # padding, past the image's edge) hold False and are clamped onto it, so that they add 0
        # to pages that the crop writes anyway.
        low, high = top[index, None] * stride, (bottom[index, None] * stride).clamp(max=height)
        rows_px = out_rows.clamp(min=low, max=high - 1)
        rows_px = (index * height * width)[:, None] + rows_px * width
        low, high = left[index, None] * stride, (right[index, None] * stride).clamp(max=width)
        cols_px = out_cols.clamp(min=low, max=high - 1)
        target = rows_px.to(index_dtype)[:, :, None] + cols_px.to(index_dtype)[:, None, :]
        flat_masks.index_add_(0, target.flatten(), up.flatten().view(torch.uint8))
    return masks, boxes


def _chunks(heights: torch.Tensor, widths: torch.Tensor, per_pixel: int, max_bytes: int):
    """Chunks of the crops of int64 heights and widths [N] in this order, each padded to its
    largest height and width and within `max_bytes` at `per_pixel` bytes per crop pixel (a crop
    alone may pass it). Yields the slice of the crops and the common (height, width)."""
    start = 0
    while start < heights.shape[0]:
        # The padded size of every prefix of the remaining crops.
        h, w = heights[start:].cummax(0).values, widths[start:].cummax(0).values
        count = torch.arange(1, h.shape[0] + 1, device=h.device)
        # The sizes only grow: the crops that fit are a prefix.
        stop = max(1, int((count * h * w * per_pixel <= max_bytes).sum()))
        yield slice(start, start + stop), (int(h[stop - 1]), int(w[stop - 1]))
        start += stop
