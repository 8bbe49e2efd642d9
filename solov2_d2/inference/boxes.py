"""Tight boxes of binary masks."""
from typing import Tuple

import torch

__all__ = ["first_last", "masks_to_boxes"]


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


def first_last(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [N] indices of the first and last True of each row of bool [N, L] (0 and L - 1
    for a row without any)."""
    index = torch.arange(flags.shape[1], device=flags.device)
    first = torch.where(flags, index, flags.shape[1]).amin(dim=1)
    last = torch.where(flags, index, -1).amax(dim=1)
    return first.clamp(max=flags.shape[1] - 1), last.clamp(min=0)
