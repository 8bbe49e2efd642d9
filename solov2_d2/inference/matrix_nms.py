"""Matrix NMS (SOLOv2), label-aware, for one image or a padded batch of images.

Semantics, those of the SOLOv2 code bases (mmdetection's ``mask_matrix_nms``): per image the
candidates are sorted by descending score (stable: ties keep their input order). With binary
masks m_i of areas a_i (pixel counts), for i < j (i scores higher):

* iou_ij = |m_i & m_j| / (a_i + a_j - |m_i & m_j|) if labels i and j are equal, else 0;
* comp_i = max over k < i of iou_ki (0 if there is none): how much i was itself suppressed;
* gaussian kernel: ratio_ij = exp(-sigma * iou_ij^2) / exp(-sigma * comp_i^2);
  linear kernel: ratio_ij = (1 - iou_ij) / max(1 - comp_i, eps);
* decay_j = min(1, min over i < j of ratio_ij), new score s_j * decay_j.

An empty mask has IoU 0 with every mask (the references divide 0 by 0 there). Then candidates
with decayed score >= ``score_thresh`` are kept, sorted by decayed score (stable), and cut to
``max_per_image``; ``pre_nms_topk`` keeps the top candidates by input score before all of this.

Intersections are one matrix product of the 0/1 masks per image
(:func:`.masks.mask_intersections`), exact integer counts whatever the dtype the masks came
from, unless the caller gives them.
The inference pipeline calls :func:`batched_matrix_nms` with the intersections its masks'
computation gave.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .masks import mask_intersections

__all__ = ["MatrixNMSResult", "batched_matrix_nms", "matrix_nms", "matrix_nms_decay"]

# A linear-kernel denominator 1 - comp_i is 0 exactly when mask i duplicates a higher-scored mask
# of its class; clamped, the ratio takes the formula's limit instead of 0 / 0 = NaN.
_LINEAR_EPS = 1e-6


class MatrixNMSResult(NamedTuple):
    """Padded per-image results of :func:`batched_matrix_nms`, each [B, K].

    scores: float32 decayed scores, descending within an image.
    labels: int64 labels.
    keep: int64 indices of the kept candidates into the input's N.
    valid: bool, True for kept candidates. They come first in each row; the other entries are
        padding with score 0, label -1 and an in-range (meaningless) keep index, so that gathers
        with ``keep`` always work.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    keep: torch.Tensor
    valid: torch.Tensor


def matrix_nms_decay(
    masks: Optional[torch.Tensor],
    labels: torch.Tensor,
    valid: torch.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    intersections: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decay factors of candidates already sorted by descending score, per image.

    Args:
        masks: [B, N, P] binary masks (bool or 0/1 of any dtype), pixels flattened; not read
            (and may be None) when `intersections` is given.
        labels: int64 [B, N].
        valid: bool [B, N]; invalid candidates neither decay nor are decayed.
        kernel: "gaussian" or "linear".
        sigma: gaussian kernel parameter (the code bases' 2.0 is the paper's 0.5).
        intersections: float32 [B, N, N] pixel counts of the masks, where already known.
    Returns:
        float32 [B, N] decay factors in [0, 1] (1 for invalid candidates).
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"Unknown Matrix NMS kernel {kernel!r}, expected 'gaussian' or 'linear'.")
    num = labels.shape[1]
    if num == 0:
        return torch.ones(labels.shape, device=labels.device)
    inter = mask_intersections(masks) if intersections is None else intersections  # [B, N, N]
    areas = inter.diagonal(dim1=1, dim2=2)
    union = areas[:, :, None] + areas[:, None, :] - inter
    iou = inter / union.clamp(min=1)
    # Pairs (i, j) with i < j of the same label, both valid.
    upper = torch.ones(num, num, dtype=torch.bool, device=labels.device).triu(diagonal=1)
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    iou = iou * (upper & same)
    comp = iou.amax(dim=1, keepdim=True).transpose(1, 2)  # [B, N, 1]: comp_i for row i
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * iou**2) / torch.exp(-sigma * comp**2)
    else:
        ratio = (1 - iou) / (1 - comp).clamp(min=_LINEAR_EPS)
    # Rows i >= j and pairs of other labels have iou 0, so a ratio >= 1: they never decay j.
    return ratio.amin(dim=1).clamp(max=1)


def batched_matrix_nms(
    masks: Optional[torch.Tensor],
    labels: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_thresh: float = 0.0,
    pre_nms_topk: int = -1,
    max_per_image: int = -1,
    intersections: Optional[torch.Tensor] = None,
) -> MatrixNMSResult:
    """Matrix NMS of B images in one call, each image independent of the others.

    Args:
        masks: [B, N, H, W] or [B, N, P] binary masks (bool or 0/1), candidates padded to N;
            None when `intersections` is given.
        labels: int64 [B, N].
        scores: float [B, N], in any order.
        valid: bool [B, N], False for padding entries. They never decay another candidate and
            are never kept; `pre_nms_topk` and `max_per_image` count valid candidates only.
        kernel, sigma: see :func:`matrix_nms_decay`.
        score_thresh: keep candidates whose decayed score is >= this.
        pre_nms_topk: if > 0, only the top `pre_nms_topk` candidates by score enter the NMS.
        max_per_image: if > 0, keep at most this many candidates per image.
        intersections: float32 [B, N, N] pixel counts of the masks, where already known.
    Returns:
        :class:`MatrixNMSResult` of [B, K] tensors, K = N' or min(N', max_per_image) when
        max_per_image > 0, where N' = min(N, pre_nms_topk) when pre_nms_topk > 0 else N.
    """
    scores = scores.float()
    order = sort_descending(scores, valid)
    if 0 < pre_nms_topk < order.shape[1]:
        order = order[:, :pre_nms_topk]
    if intersections is None:
        masks = masks.flatten(2)
        cand_masks = masks.gather(1, order[:, :, None].expand(-1, -1, masks.shape[2]))
        intersections = mask_intersections(cand_masks)
    else:
        rows = intersections.gather(1, order[:, :, None].expand(-1, -1, labels.shape[1]))
        intersections = rows.gather(2, order[:, None, :].expand(-1, order.shape[1], -1))
    cand_labels = labels.gather(1, order)
    cand_valid = valid.gather(1, order)
    decay = matrix_nms_decay(
        None, cand_labels, cand_valid, kernel=kernel, sigma=sigma, intersections=intersections
    )
    decayed = scores.gather(1, order) * decay

    kept = cand_valid & (decayed >= score_thresh)
    rank = sort_descending(decayed, kept)
    if 0 < max_per_image < rank.shape[1]:
        rank = rank[:, :max_per_image]
    kept = kept.gather(1, rank)
    return MatrixNMSResult(
        scores=decayed.gather(1, rank).masked_fill(~kept, 0),
        labels=cand_labels.gather(1, rank).masked_fill(~kept, -1),
        keep=order.gather(1, rank),
        valid=kept,
    )


def matrix_nms(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, **options
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrix NMS of one image: :func:`batched_matrix_nms` of a batch of one.

    Args:
        masks: [N, H, W] binary masks; labels: int64 [N]; scores: float [N], in any order.
        options: the keyword arguments of :func:`batched_matrix_nms`.
    Returns:
        scores (float32 [K], decayed, descending), labels (int64 [K]) and keep (int64 [K],
        indices into the inputs) of the kept candidates.
    """
    valid = torch.ones_like(labels, dtype=torch.bool)
    result = batched_matrix_nms(masks[None], labels[None], scores[None], valid[None], **options)
    kept = result.valid[0]
    return result.scores[0][kept], result.labels[0][kept], result.keep[0][kept]


def sort_descending(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: per row, the indices of the valid entries by descending score (stable: ties
    keep their order), then the invalid ones."""
    key = scores.float().masked_fill(~valid, float("-inf"))
    return torch.sort(key, dim=1, descending=True, stable=True).indices
