"""Matrix NMS (SOLOv2), label-aware, for one image or a padded batch of images.

Semantics, the same as in the SOLOv2 code bases (mmdetection's ``mask_matrix_nms``): per image,
the candidates are sorted by descending score (stable: ties keep their input order). With binary
masks m_i of areas a_i (pixel counts), for i < j (i scores higher):

* iou_ij = |m_i & m_j| / (a_i + a_j - |m_i & m_j|) if labels i and j are equal, else 0;
* comp_i = max over k < i of iou_ki (0 if there is none): how much i was itself suppressed;
* gaussian kernel: ratio_ij = exp(-sigma * iou_ij^2) / exp(-sigma * comp_i^2);
  linear kernel: ratio_ij = (1 - iou_ij) / max(1 - comp_i, eps);
* decay_j = min(1, min over i < j with the label of j of ratio_ij), new score s_j * decay_j.

An empty mask has IoU 0 with every mask (the dense formula divides 0 by 0 for two empty masks).

Then the candidates with decayed score >= ``score_thresh`` are kept, sorted by decayed score
(stable), and cut to ``max_per_image``. An optional ``pre_nms_topk`` keeps the top candidates by
input score before all of this.

Speed. The reference implementations compute all N x N intersections with one float matrix
product over whole masks, although only pairs of the same label matter, and only where their masks
can overlap. Here, candidates are grouped into the connected components of the graph "same image,
same label, overlapping bounding boxes"; pairs in different components have IoU 0, so their
ratio_ij >= 1 cannot change any decay. Intersections are computed inside components only, on the
masks cropped to the component's union box, by batched float matrix products over components of
similar sizes (binned by powers of two of member count and box area), in chunks of bounded
memory. Masks are read 8 pixels at a time as int64 words to find their boxes (the one pass over
all pixels) and to crop them. Sums of 0/1 products in float32 are exact below 2^24, so the IoUs
are bit-identical to those of the dense formulation.

Device transfers: the shapes of this work depend on the data, so the work plan (component
counts and sizes per size class) is read to the host once per call, and the component labelling
checks its convergence on the host (one read per propagation round, usually two). Everything else
runs on the input device without host reads; :func:`batched_matrix_nms` returns padded tensors of
a data-independent shape.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .grouping import ceil_log2, groups

__all__ = ["MatrixNMSResult", "matrix_nms", "batched_matrix_nms", "mask_boxes"]

# A linear-kernel denominator 1 - comp_i is 0 exactly when mask i duplicates a higher-scored mask
# of its class. Clamped, it gives ratio_ij = 0 when mask j is that same mask again (iou_ij = 1)
# and, for masks under 10^6 pixels, >= 1 otherwise: the limit of the formula, not 0 / 0 = NaN.
_LINEAR_EPS = 1e-6
# The most words (members x box words) cropped at once. A chunk holds them as int64 and as 8
# float32 each: about 40 * _CHUNK_WORDS bytes (20 MiB).
_CHUNK_WORDS = 1 << 19
# A byte lane of an int64 word can sum this many 0/1 bytes without carrying into the next lane.
_MAX_BYTE_SUM_ROWS = 255


class MatrixNMSResult(NamedTuple):
    """Padded per-image results of :func:`batched_matrix_nms`, each [B, K].

    scores: decayed scores (dtype of the input scores), descending within an image.
    labels: int64 labels.
    keep: int64 indices of the kept candidates into the input's N.
    valid: bool, True for kept candidates. They come first in each row; the other entries are
        padding, with score 0, label -1 and an in-range (meaningless) keep index, so that
        gathers with ``keep`` always work.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    keep: torch.Tensor
    valid: torch.Tensor


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_thresh: float = 0.0,
    pre_nms_topk: int = -1,
    max_per_image: int = -1,
    mask_areas: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrix NMS of one image (see the module docstring for the exact semantics).

    Args:
        masks: bool [N, H, W] binary masks.
        labels: int64 [N] class labels.
        scores: float [N] scores, in any order.
        kernel: "gaussian" or "linear".
        sigma: gaussian kernel parameter (the code bases' 2.0 is the paper's 0.5).
        score_thresh: keep candidates whose decayed score is >= this.
        pre_nms_topk: if > 0, only the top `pre_nms_topk` candidates by score enter the NMS.
        max_per_image: if > 0, keep at most this many candidates.
        mask_areas: optional [N] pixel counts of the masks (computed if None).
    Returns:
        scores (float [K], decayed, descending), labels (int64 [K]) and keep (int64 [K], indices
        into the inputs) of the kept candidates. K depends on the data, so this reads one count
        to the host; :func:`batched_matrix_nms` returns padded results without that.
    """
    result = batched_matrix_nms(
        masks[None],
        labels[None],
        scores[None],
        torch.ones_like(labels, dtype=torch.bool)[None],
        kernel=kernel,
        sigma=sigma,
        score_thresh=score_thresh,
        pre_nms_topk=pre_nms_topk,
        max_per_image=max_per_image,
        mask_areas=None if mask_areas is None else mask_areas[None],
    )
    valid = result.valid[0]
    return result.scores[0][valid], result.labels[0][valid], result.keep[0][valid]


def batched_matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_thresh: float = 0.0,
    pre_nms_topk: int = -1,
    max_per_image: int = -1,
    mask_areas: Optional[torch.Tensor] = None,
    mask_boxes: Optional[torch.Tensor] = None,
) -> MatrixNMSResult:
    """Matrix NMS of B images in one call, each image independent of the others.

    Args:
        masks: bool [B, N, H, W] binary masks, candidates padded to N per image.
        labels: int64 [B, N].
        scores: float [B, N], in any order.
        valid: bool [B, N], False for padding entries. They never decay another candidate and
            are never kept; `pre_nms_topk` and `max_per_image` count valid candidates only.
        mask_areas: optional [B, N] pixel counts of the masks (computed if None).
        mask_boxes: optional int64 [B, N, 4] inclusive pixel boxes (y0, x0, y1, x1) that
            contain the masks, y1 = -1 for an empty mask (the tight ones of :func:`mask_boxes`
            if None). Larger boxes give the same result, with more work.
        The other arguments are those of :func:`matrix_nms`, per image.
    Returns:
        :class:`MatrixNMSResult` of [B, K] tensors, K = N' or min(N', max_per_image) when
        max_per_image > 0, where N' = min(N, pre_nms_topk) when pre_nms_topk > 0 else N.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"Unknown Matrix NMS kernel {kernel!r}, expected 'gaussian' or 'linear'.")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}.")
    num_images, num_inputs = scores.shape
    order = _sort_descending(scores.masked_fill(~valid, float("-inf")))
    if 0 < pre_nms_topk < num_inputs:
        order = order[:, :pre_nms_topk]
    # [B, N'] indices into the flattened B * N inputs
    inputs = order + num_inputs * torch.arange(num_images, device=scores.device)[:, None]
    cand_scores = scores.flatten()[inputs]
    cand_labels = labels.flatten()[inputs]
    cand_valid = valid.flatten()[inputs]
    areas = None if mask_areas is None else mask_areas.flatten()[inputs]
    boxes = None if mask_boxes is None else mask_boxes.flatten(0, 1)[inputs]

    decay = _decay_factors(masks.flatten(0, 1), inputs, cand_labels, cand_valid, areas, boxes,
                           kernel, sigma)
    decayed = cand_scores * decay.to(cand_scores.dtype)

    kept = cand_valid & (decayed >= score_thresh)
    rank = _sort_descending(decayed.masked_fill(~kept, float("-inf")))
    if 0 < max_per_image < rank.shape[1]:
        rank = rank[:, :max_per_image]
    kept = kept.gather(1, rank)
    return MatrixNMSResult(
        scores=decayed.gather(1, rank).masked_fill(~kept, 0),
        labels=cand_labels.gather(1, rank).masked_fill(~kept, -1),
        keep=order.gather(1, rank),
        valid=kept,
    )


def _sort_descending(values: torch.Tensor) -> torch.Tensor:
    """Indices (int64, same shape) sorting the last dim of `values` descending, ties in order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _decay_factors(masks, inputs, labels, valid, areas, boxes, kernel, sigma) -> torch.Tensor:
    """Matrix NMS decay of each candidate.

    Args:
        masks: bool [B * N, H, W], all input masks.
        inputs: int64 [B, N'], the candidates of each image as indices into `masks`, in
            descending score order.
        labels: int64 [B, N'] and valid: bool [B, N'], of the candidates.
        areas: None, or [B, N'] pixel counts of the candidates.
        boxes: None, or int64 [B, N', 4] their inclusive boxes (y0, x0, y1, x1).
    Returns:
        float32 [B, N'] decay factors in [0, 1] (1 for invalid candidates).
    """
    num_images, num_cands = inputs.shape
    if num_cands == 0:
        return torch.ones(inputs.shape, device=inputs.device)
    words = _mask_words(masks)
    height, row_words = words.shape[1:]
    if boxes is None:
        boxes = _mask_boxes(words)[inputs]  # [B, N', 4]
    graph = _box_graph(boxes, labels, valid & (boxes[..., 2] >= 0))
    roots = _connected_components(graph) + num_cands * torch.arange(
        num_images, device=inputs.device
    )[:, None]
    components = _Components(roots.flatten(), boxes.flatten(0, 1))

    flat_words = words.view(words.shape[0], height * row_words)
    flat_inputs = inputs.flatten()
    flat_areas = None if areas is None else areas.flatten()
    # Each list starts with an empty tensor, as there may be no chunk at all.
    members, member_ok = [inputs.new_empty(0)], [valid.new_empty(0)]
    decays = [torch.ones(0, device=inputs.device)]
    for chunk in components.chunks(num_cands, height * row_words):
        geometry = components.geometry[chunk.ids]
        index, ok = _members(components.by_component, geometry, chunk.size)
        inter = _intersections(flat_words, flat_inputs[index], geometry, chunk, row_words)
        chunk_areas = None if flat_areas is None else flat_areas[index]
        members.append(index.flatten())
        member_ok.append(ok.flatten())
        decays.append(_component_decay(inter, ok, chunk_areas, kernel, sigma).flatten())
    decay = _scatter_or_one(torch.cat(decays), torch.cat(members), torch.cat(member_ok),
                            num_images * num_cands)
    return decay.view(num_images, num_cands)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive pixel boxes (y0, x0, y1, x1), int64 [M, 4], of bool masks [M, H, W]; an empty
    mask gets (H, W', -1, -1), W' >= W. Reads the masks 8 pixels at a time."""
    return _mask_boxes(_mask_words(masks))


def _mask_words(masks: torch.Tensor) -> torch.Tensor:
    """int64 [M, H, ceil(W / 8)]: bool masks [M, H, W] read 8 pixels at a time (bytes 0 or 1,
    rows padded with False to a multiple of 8 pixels). Reducing and gathering words moves 8 times
    fewer elements than bool pixels."""
    pad = -masks.shape[-1] % 8
    if pad or masks.storage_offset() % 8:
        masks = F.pad(masks, (0, pad))  # a copy with whole, aligned words
    return masks.contiguous().view(torch.uint8).view(torch.int64)


def _mask_boxes(words: torch.Tensor) -> torch.Tensor:
    """Inclusive pixel boxes (y0, x0, y1, x1), int64 [M, 4], of masks given as words (see
    :func:`_mask_words`); an empty mask gets (H, W', -1, -1), W' the padded width.

    This reads every pixel, so it is the part of the NMS whose cost grows with N * H * W.
    """
    num_masks, height, row_words = words.shape
    # Each byte is 0 or 1, so words are >= 0 and a row has a pixel iff its largest word is > 0.
    rows = words.amax(dim=2) > 0
    cols = torch.zeros((num_masks, row_words * 8), dtype=torch.bool, device=words.device)
    for start in range(0, height, _MAX_BYTE_SUM_ROWS):
        # Summing words sums each byte lane separately (no carries below 256): column counts.
        counts = words[:, start : start + _MAX_BYTE_SUM_ROWS].sum(dim=1)
        cols |= counts.view(torch.uint8) > 0
    y0, y1 = first_last(rows)
    x0, x1 = first_last(cols)
    return torch.stack([y0, x0, y1, x1], dim=1)


def first_last(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along the last dim of bool [M, L] (int64 [M]); L and -1 for a
    row with no True."""
    length = flags.shape[1]
    index = torch.arange(length, device=flags.device)
    first = torch.where(flags, index, length).amin(dim=1)
    last = torch.where(flags, index, -1).amax(dim=1)
    return first, last


def _box_graph(boxes: torch.Tensor, labels: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """bool [B, N, N]: candidates i and j are both active, of the same label and their boxes
    share a pixel. `boxes`: int64 [B, N, 4] inclusive (y0, x0, y1, x1)."""
    y0, x0, y1, x1 = boxes.unbind(dim=-1)
    graph = (labels[:, :, None] == labels[:, None, :]) & active[:, :, None] & active[:, None, :]
    graph &= (y0[:, :, None] <= y1[:, None, :]) & (y0[:, None, :] <= y1[:, :, None])
    graph &= (x0[:, :, None] <= x1[:, None, :]) & (x0[:, None, :] <= x1[:, :, None])
    return graph


def _connected_components(graph: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: for each node of the undirected graphs bool [B, N, N], the smallest node
    index of its connected component. Checks convergence on the host once per round."""
    num_nodes = graph.shape[-1]
    roots = torch.arange(num_nodes, device=graph.device).expand(graph.shape[:-1])
    while True:
        # Hook each node to its smallest neighbouring root, then jump to the root's root.
        # Roots only decrease and stay inside the component; at the fixed point they are equal
        # across every edge, hence the component minimum.
        neighbour = torch.where(graph, roots[:, None, :], num_nodes).amin(dim=2)
        new_roots = torch.minimum(roots, neighbour)
        new_roots = new_roots.gather(1, new_roots)
        if torch.equal(new_roots, roots):
            return roots
        roots = new_roots


class _Chunk(NamedTuple):
    """Components cropped and multiplied together: `ids` int64 [G] (component ids), padded to
    `size` members and `area` box words."""

    ids: torch.Tensor
    size: int
    area: int


class _Components:
    """Candidates grouped into components; lays out the cropping work.

    Args:
        roots: int64 [M], component id of each candidate (the flat index of its smallest member).
        boxes: int64 [M, 4], inclusive pixel boxes (y0, x0, y1, x1) of the candidates.
    Attributes:
        by_component: int64 [M], candidates sorted by component, in score order inside each.
        geometry: int64 [M, 6], per component id: member count, start of its members in
            `by_component`, and of its union box, in rows and 8-pixel words: top row, left
            word, width and area in words. Only the rows of component ids (roots) are
            meaningful.
    """

    def __init__(self, roots: torch.Tensor, boxes: torch.Tensor):
        size = torch.zeros_like(roots).index_add_(0, roots, torch.ones_like(roots))
        self.by_component = torch.sort(roots, stable=True).indices
        # Union boxes, at the roots (every root is its own member, so include_self is moot).
        index = roots[:, None].expand(-1, 2)
        y0, x0 = boxes[:, :2].scatter_reduce(0, index, boxes[:, :2], "amin", include_self=False).T
        y1, x1 = boxes[:, 2:].scatter_reduce(0, index, boxes[:, 2:], "amax", include_self=False).T
        x0, x1 = x0 // 8, x1 // 8
        width = x1 - x0 + 1
        area = (y1 - y0 + 1) * width
        self.geometry = torch.stack([size, torch.cumsum(size, 0) - size, y0, x0, width, area], 1)

    def chunks(self, max_size: int, max_area: int):
        """Yield the components of 2+ members as :class:`_Chunk`s of similar sizes (member
        counts up to `max_size`, box areas in words up to `max_area`).

        Components are binned by ceil(log2) of their member count and of their box area, so
        padding a bin to its largest member count and area wastes at most a factor 2 each; large
        bins are split to hold at most `_CHUNK_WORDS` members x words. This reads the bin
        statistics to the host (the one transfer of the plan).
        """
        size, area = self.geometry[:, 0], self.geometry[:, 5]
        size_bins = max(max_size - 1, 1).bit_length() + 1
        area_bins = max(max_area - 1, 1).bit_length() + 1
        bins = ceil_log2(size.clamp(min=1)) * area_bins + ceil_log2(area)
        for ids, (bin_size, bin_area) in groups(bins, size >= 2, size_bins * area_bins, size, area):
            per_chunk = max(1, _CHUNK_WORDS // (bin_size * bin_area))
            for offset in range(0, len(ids), per_chunk):
                yield _Chunk(ids[offset : offset + per_chunk], bin_size, bin_area)


def _members(by_component, geometry, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [G, S] candidates of G components (rows of `_Components.geometry`) in score order,
    padded to S = `size` by repeating the last member; bool [G, S], False for padding."""
    rank = torch.arange(size, device=geometry.device)
    count, start = geometry[:, :1], geometry[:, 1:2]
    return by_component[start + torch.minimum(rank, count - 1)], rank < count


def _intersections(flat_words, mask_index, geometry, chunk: _Chunk, row_words: int):
    """float32 [G, S, S]: pixel counts of the intersections of the members of each component
    in a chunk. They are exact: sums of 0/1 products in float32 are exact below 2^24.

    Args:
        flat_words: int64 [M, H * row_words], the masks as words (see :func:`_mask_words`).
        mask_index: int64 [G, S], the members' rows of `flat_words`.
        geometry: int64 [G, 6], the components' rows of `_Components.geometry`.
    """
    # A chunk is one component when that alone exceeds the memory budget: crop it in slices.
    step = max(1, _CHUNK_WORDS // chunk.size)
    slices = [(start, min(step, chunk.area - start)) for start in range(0, chunk.area, step)]
    return sum(
        _gram(_crop(flat_words, mask_index, geometry, row_words, start, length))
        for start, length in slices
    )


def _gram(crops: torch.Tensor) -> torch.Tensor:
    """float32 [G, S, S] dot products of the rows of float32 crops [G, S, P]."""
    return torch.bmm(crops, crops.transpose(1, 2))


def _crop(flat_words, mask_index, geometry, row_words: int, start: int, length: int):
    """float32 [G, S, 8 * length]: words start .. start + length - 1 of the members' masks inside
    their component's box, as 0/1 pixels.

    The box of a component, h rows x w words, is flattened to h * w words; words past its end
    are 0. Pixels of the box's words that lie outside the box itself are 0 for every member,
    since all of them lie inside the box.
    """
    y0, x0, width, area = geometry[:, 2:, None].unbind(1)  # each [G, 1]
    word = torch.arange(start, start + length, device=geometry.device)
    inside = word < area
    offset = torch.where(inside, (y0 + word // width) * row_words + x0 + word % width, 0)
    crops = flat_words[mask_index[:, :, None], offset[:, None, :]]
    return torch.where(inside[:, None, :], crops, 0).view(torch.uint8).float()


def _component_decay(inter, member_ok, areas, kernel: str, sigma: float) -> torch.Tensor:
    """Matrix NMS decay inside components.

    Args:
        inter: float32 [G, S, S] intersections of the masks of G components, members in
            descending score order.
        member_ok: bool [G, S], False for padding members.
        areas: None (use the diagonal of `inter`) or [G, S] mask areas.
    Returns:
        float32 [G, S] decay factors (meaningless for padding).
    """
    areas = inter.diagonal(dim1=1, dim2=2) if areas is None else areas.float()
    union = areas[:, :, None] + areas[:, None, :] - inter
    rank = torch.arange(member_ok.shape[1], device=inter.device)
    # pairs (i, j), i < j: i scores higher; j must be a real member (then so is i).
    pairs = (rank[:, None] < rank[None, :]) & member_ok[:, None, :]
    iou = torch.where(pairs, inter / union, 0)
    comp = iou.amax(dim=1)[:, :, None]  # [G, S, 1], comp_i along rows
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * iou**2) / torch.exp(-sigma * comp**2)
    else:
        ratio = (1 - iou) / (1 - comp).clamp(min=_LINEAR_EPS)
    # Rows i >= j are not pairs and count as 1, which caps the decay at 1.
    return torch.where(pairs, ratio, 1).amin(dim=1)


def _scatter_or_one(values, index, ok, length: int) -> torch.Tensor:
    """float32 [length]: `values` [P] at `index` [P] where `ok`, 1 elsewhere.

    Padding entries go to distinct slots past `length`, so no index repeats (deterministic).
    """
    spare = length + torch.arange(index.shape[0], device=index.device)
    out = torch.ones(length + index.shape[0], device=values.device)
    return out.scatter_(0, torch.where(ok, index, spare), values)[:length]
