"""SOLOv2 losses: focal loss on the category grid, Dice loss on the masks of positive cells.

Both compute in at least float32 whatever the inputs' dtype (autocast's float16 or bfloat16): a
mask's sums exceed float16's range (65504) from 256 x 256 pixels on.
"""
from typing import Optional

import torch
from fvcore.nn import sigmoid_focal_loss
from torch.utils.checkpoint import checkpoint

from ..layers.dynamic_conv import dynamic_mask_logits

__all__ = ["dice_loss", "category_focal_loss", "positive_cells_dice_loss"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype when that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Dice loss of each mask, 1 - 2 * sum(p * t) / ((sum(p^2) + eps) + (sum(t^2) + eps)).

    Args:
        mask_logits: float [..., H, W] of any floating dtype, before sigmoid.
        targets: [..., H, W] of the same shape, values in [0, 1] (float or bool).
        eps: added to each sum of squares; keeps empty masks finite.
    Returns:
        [...], one loss per mask, in float32 (float64 for float64 logits).
    """
    p = _at_least_float32(mask_logits).sigmoid().flatten(-2)
    t = targets.flatten(-2).to(p.dtype)
    overlap = (p * t).sum(-1)
    total = (p * p).sum(-1) + eps + (t * t).sum(-1) + eps
    return 1 - 2 * overlap / total


def _dice_loss_sum(features, kernels, target_masks, instances, eps):
    """Sum of the Dice losses of the dynamic masks of `kernels` [n, D] on one image's
    `features` [E, H, W] against `target_masks[instances]`."""
    logits = dynamic_mask_logits(features[None], kernels[None])[0]
    return dice_loss(logits, target_masks[instances], eps).sum()


def positive_cells_dice_loss(
    mask_features: torch.Tensor,
    kernels: torch.Tensor,
    target_masks: torch.Tensor,
    matched: torch.Tensor,
    cells: Optional[torch.Tensor] = None,
    eps: float = 1e-3,
    chunk_elements: int = 1 << 23,
) -> torch.Tensor:
    """Mean Dice loss of the dynamic masks of a batch's positive (cell, instance) pairs, in
    bounded memory.

    Pair j of image b pairs cell `cells[b, j]` with instance `matched[b, j]` (skipped where -1):
    its mask has the logits of kernel `kernels[b, cells[b, j]]` applied to `mask_features[b]`
    (:func:`dynamic_mask_logits`) and the target `target_masks[matched[b, j]]`. A cell may
    appear in several pairs (claimed by several instances, as
    :meth:`SOLOv2Targets.mask_pairs` "all" gives them); the loss is the mean over all pairs.
    With `cells` None, pair k is cell k: one instance per cell, `matched` [B, T].

    Pairs are taken in chunks of at most `chunk_elements` mask pixels, and each chunk is
    recomputed in the backward pass (activation checkpointing): neither the logits of all
    pairs nor float copies of their targets are ever held, whatever their number.

    One host synchronisation: the number of pairs of each image, which sizes the chunks.

    Args:
        mask_features: float [B, E, H, W].
        kernels: float [B, T, E * k * k], every cell's dynamic kernel.
        target_masks: bool (or float in [0, 1]) [M, H, W], the mask of each instance of the batch.
        matched: int64 [B, N], each pair's index into `target_masks`; -1 for no pair.
        cells: int64 [B, N], each pair's index into the T cells of `kernels` (any value where
            `matched` is -1); None: N = T and pair k is cell k.
        eps: of :func:`dice_loss`.
        chunk_elements: the most mask pixels (pairs x H x W) computed at a time.
    Returns:
        scalar in at least float32 (sums in float32 whatever the inputs' dtype). Without any
        pair, a zero that still reaches `mask_features` and `kernels`, so every parameter gets a
        (zero) gradient and distributed training stays in step.
    """
    positive = matched >= 0
    counts = positive.sum(dim=1).tolist()  # the host synchronisation
    num_positive = sum(counts)
    if num_positive == 0:
        return _at_least_float32(kernels.sum() + mask_features.sum()) * 0.0
    chunk = max(1, chunk_elements // mask_features[0, 0].numel())
    # Each image's pairs first, in their order (the sort is stable).
    order = torch.argsort((~positive).to(torch.uint8), dim=1, stable=True)
    instances = matched.gather(1, order)
    cells = order if cells is None else cells.gather(1, order)
    total = 0.0
    # Per-image views, so that each chunk's gradient adds into its image's part only.
    for features, image_kernels, image_cells, image_instances, count in zip(
        mask_features.unbind(0), kernels.unbind(0), cells, instances, counts
    ):
        selected, image_instances = image_kernels[image_cells[:count]], image_instances[:count]
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            total = total + checkpoint(
                _dice_loss_sum,
                features,
                selected[part],
                target_masks,
                image_instances[part],
                eps,
                use_reentrant=False,
                preserve_rng_state=False,
            )
    return total / num_positive


def category_focal_loss(
    cate_logits: torch.Tensor,
    labels: torch.Tensor,
    num_positives: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss summed over all cells and classes, divided by (positives + 1).

    Args:
        cate_logits: float [N, C] of any floating dtype, before sigmoid.
        labels: int64 [N]; C marks background (all-zero target row).
        num_positives: scalar tensor, the number of positive cells (kept on device: no sync).
    Returns:
        scalar tensor in float32 (float64 for float64 logits).
    """
    cate_logits = _at_least_float32(cate_logits)
    num_classes = cate_logits.shape[1]
    # One extra column for background, dropped: background rows become all-zero targets.
    targets = torch.zeros(
        (labels.shape[0], num_classes + 1), dtype=cate_logits.dtype, device=cate_logits.device
    )
    targets.scatter_(1, labels[:, None], 1.0)
    loss = sigmoid_focal_loss(
        cate_logits, targets[:, :num_classes], alpha=alpha, gamma=gamma, reduction="sum"
    )
    return loss / (num_positives + 1)
