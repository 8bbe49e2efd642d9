"""SOLOv2 losses: focal loss on the category grid, Dice loss on the masks of positive cells."""
import torch
from fvcore.nn import sigmoid_focal_loss

__all__ = ["dice_loss", "category_focal_loss"]


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Dice loss of each mask, 1 - 2 * sum(p * t) / ((sum(p^2) + eps) + (sum(t^2) + eps)).

    Args:
        mask_logits: float [..., H, W], before sigmoid.
        targets: float [..., H, W] of the same shape, values in [0, 1].
        eps: added to each sum of squares; keeps empty masks finite.
    Returns:
        float [...], one loss per mask.
    """
    p = mask_logits.sigmoid().flatten(-2)
    t = targets.flatten(-2).to(p.dtype)
    overlap = (p * t).sum(-1)
    total = (p * p).sum(-1) + eps + (t * t).sum(-1) + eps
    return 1 - 2 * overlap / total


def category_focal_loss(
    cate_logits: torch.Tensor,
    labels: torch.Tensor,
    num_positives: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss summed over all cells and classes, divided by (positives + 1).

    Args:
        cate_logits: float [N, C], before sigmoid.
        labels: int64 [N]; C marks background (all-zero target row).
        num_positives: scalar tensor, the number of positive cells (kept on device: no sync).
    Returns:
        scalar tensor.
    """
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
