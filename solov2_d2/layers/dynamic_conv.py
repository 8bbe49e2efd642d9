"""Dynamic convolution: SOLOv2's per-candidate mask kernels applied to the shared mask feature,
and the flattening of per-level grid outputs that both training and inference index by cell."""
from typing import List

import torch
import torch.nn.functional as F

__all__ = ["dynamic_mask_logits", "flat_mask_features", "flatten_levels"]


def dynamic_mask_logits(mask_features: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Apply per-candidate dynamic kernels to their image's mask feature, for a whole batch.

    Args:
        mask_features: [B, E, H, W].
        kernels: [B, N, E * k * k], N candidates per image; weights laid out as [E, k, k].
    Returns:
        [B, N, H, W] mask logits.
    """
    b, e, h, w = mask_features.shape
    n = kernels.shape[1]
    k = int(round((kernels.shape[2] // e) ** 0.5))
    if k * k * e != kernels.shape[2]:
        raise ValueError(
            f"Dynamic kernels of {kernels.shape[2]} weights do not fit a mask feature of {e} "
            "channels (expected E * k * k)."
        )
    if k == 1:
        # A 1 x 1 dynamic conv is one batched matrix product.
        return torch.bmm(kernels, flat_mask_features(mask_features)).view(b, n, h, w)
    # Images as groups of one grouped convolution.
    out = F.conv2d(
        mask_features.reshape(1, b * e, h, w),
        kernels.reshape(b * n, e, k, k),
        padding=k // 2,
        groups=b,
    )
    return out.view(b, n, h, w)


def flat_mask_features(mask_features: torch.Tensor) -> torch.Tensor:
    """[B, E, H, W] -> [B, E, H * W] without a copy for both contiguous layouts (NCHW and
    channels-last, which `flatten(2)` would copy); matrix products take either."""
    return mask_features.movedim(1, 3).flatten(1, 2).transpose(1, 2)


def flatten_levels(per_level: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-level grid outputs over all cells.

    Args:
        per_level: [B, K, S_l, S_l] per level.
    Returns:
        [B, T, K] with T = sum(S_l^2): levels in order, each level's cells in row-major order
        (the layout of :class:`SOLOv2Targets`).
    """
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)
