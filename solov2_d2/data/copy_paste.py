"""
Instance copy-paste (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for
Instance Segmentation", CVPR 2021), for :class:`~solov2_d2.data.SOLOv2DatasetMapper`.

With probability ``INPUT.COPY_PASTE.PROB`` a random subset of the instances of another training
image (the *source*, augmented on its own like any training image) is pasted onto this one (the
*target*): the source's pixels under the pasted masks replace the target's, the pasted pixels
are removed from the target's masks, and a target instance left with less than
``INPUT.COPY_PASTE.MIN_VISIBLE_FRACTION`` of its area (or no pixel) is dropped. Boxes are the
tight boxes of the resulting masks. The source is laid on the target's top-left corner; what
falls outside the target is cut off. Either image may have no instances.

The source is chosen by the training loader (:class:`~solov2_d2.data.ResumableTrainLoader`) from
the sample's seed, and attached to the dataset dict under :data:`COPY_PASTE_SOURCE`; every random
draw of the paste comes from the sample's seeded random state, so that a resumed run pastes
what the uninterrupted run would have.
"""
from typing import Tuple

import numpy as np
import torch

__all__ = ["COPY_PASTE_SOURCE", "paste_instances", "random_subset"]

# Key of the source image's dataset dict in the target's dataset dict.
COPY_PASTE_SOURCE = "copy_paste_source"


def random_subset(num_instances: int) -> torch.Tensor:
    """A random non-empty subset of ``range(num_instances)`` (bool [num_instances]), drawn
    from NumPy's global random state: its size is uniform in 1..num_instances, its members
    uniform among those of that size. All False for 0 instances."""
    chosen = torch.zeros(num_instances, dtype=torch.bool)
    if num_instances:
        size = np.random.randint(1, num_instances + 1)
        chosen[torch.from_numpy(np.random.permutation(num_instances)[:size])] = True
    return chosen


def _fit(array: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`array` [..., H', W'] cut or zero-padded at its bottom and right to [..., height,
    width]."""
    out = array.new_zeros((*array.shape[:-2], height, width))
    h, w = min(height, array.shape[-2]), min(width, array.shape[-1])
    out[..., :h, :w] = array[..., :h, :w]
    return out


def paste_instances(
    image: np.ndarray,
    masks: torch.Tensor,
    classes: torch.Tensor,
    source_image: np.ndarray,
    source_masks: torch.Tensor,
    source_classes: torch.Tensor,
    min_visible_fraction: float,
) -> Tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Paste the instances `source_masks` of `source_image` onto `image`.

    Args:
        image: the target, [H, W, C] (any dtype).
        masks: the target's instances, bool [N, H, W].
        classes: int64 [N].
        source_image: [H', W', C], same dtype and channels as `image`; laid on its top-left
            corner, cut or padded to H x W.
        source_masks: the instances to paste, bool [M, H', W'].
        source_classes: int64 [M].
        min_visible_fraction: a target instance keeping less than this fraction of its pixels
            uncovered, or none, is dropped.
    Returns:
        (image [H, W, C], masks bool [K, H, W], classes int64 [K]): the target's instances
        that stay, with the pasted pixels removed, then the pasted instances (in their order:
        on top of the others) that are not empty after the cut.
    """
    h, w = image.shape[:2]
    pasted = _fit(source_masks, h, w)
    nonempty = pasted.flatten(1).any(dim=1)
    pasted, pasted_classes = pasted[nonempty], source_classes[nonempty]
    covered = pasted.any(dim=0)  # [H, W]
    if not bool(covered.any()):
        return image, masks, classes
    source = _fit(torch.from_numpy(np.array(source_image)).permute(2, 0, 1), h, w)
    out = torch.from_numpy(image.copy())
    out[covered] = source.permute(1, 2, 0)[covered]
    visible = masks & ~covered
    before = masks.flatten(1).sum(dim=1)
    after = visible.flatten(1).sum(dim=1)
    keep = (after > 0) & (after >= min_visible_fraction * before)
    return (
        out.numpy(),
        torch.cat([visible[keep], pasted]),
        torch.cat([classes[keep], pasted_classes]),
    )
