"""Test-time augmentation for SOLOv2 (``TEST.AUG``), in the style of detectron2's
``GeneralizedRCNNWithTTA``.

What is merged: the *candidates* of all views, before any suppression. Each view (a resize of
the image, ``TEST.AUG.MIN_SIZES`` and ``TEST.AUG.MAX_SIZE``, and its horizontal flip with
``TEST.AUG.FLIP``; detectron2's ``DatasetMapperTTA`` makes them) goes through the network and
the pipeline's steps 1-5 (:class:`~solov2_d2.inference.pipeline.SOLOv2PostProcessor`: category
scores, point NMS, candidate masks, the area filter, maskness), which give its top
``PRE_NMS_TOPK_TEST`` candidates: a rescored score, a label and a mask of probabilities at the
view's mask-feature resolution. Their masks are brought into one frame (below), the candidates
of all views are pooled (the top ``PRE_NMS_TOPK_TEST`` of them all by score: as many as one
view gives the plain pipeline), binarised at ``MASK_THRESH_TEST`` and go through label-aware
Matrix NMS once (step 6, with the model's kernel, sigma, ``UPDATE_THRESH_TEST`` and
``MAX_PER_IMAGE_TEST``); the kept masks are pasted at the output size as usual (step 7). So a
detection is the one candidate that survives among its duplicates in all views (the best
scored, with its own mask); masks are not averaged.

The frame: the mask-feature grid of the largest view that is not flipped (the finest grid, so
that no view's mask is sampled more coarsely than it was predicted). The masks of the other
views are resampled into it bilinearly (``grid_sample``), un-flipped, with each view's image
scaled onto the frame's image (pixel centres mapped through the fractions of the image height
and width, as pasting maps them). The frame view's own masks are taken as they are: with only
the identity view (``TEST.AUG.MIN_SIZES (INPUT.MIN_SIZE_TEST,)``, ``TEST.AUG.MAX_SIZE
INPUT.MAX_SIZE_TEST``, ``TEST.AUG.FLIP False``) the results are exactly the plain model's.

Memory: the pool holds at most ``PRE_NMS_TOPK_TEST`` masks in the frame, and views are run
``batch_size`` at a time, each view's candidates merged into the pool right after it ran
(only the masks that enter the pool are brought into the frame).
"""
import copy
import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import (
    HFlipTransform,
    NoOpTransform,
    ResizeTransform,
    TransformList,
)
from detectron2.modeling import DatasetMapperTTA
from detectron2.structures import Instances

from ..inference.masks import CandidateMasks
from ..inference.matrix_nms import batched_matrix_nms, sort_descending
from ..inference.pipeline import detections_to_instances
from .meta_arch import NetworkPolicy, SOLOv2

__all__ = ["SOLOv2WithTTA", "check_tta_config"]

# The transforms whose effect on masks is undone (those of detectron2's DatasetMapperTTA).
_KNOWN_TRANSFORMS = (ResizeTransform, HFlipTransform, NoOpTransform)


def check_tta_config(cfg) -> None:
    """Raise ValueError naming the key and its value for ``TEST.AUG`` settings that cannot run:
    no MIN_SIZES, a size below 1, MAX_SIZE below 1."""
    sizes = cfg.TEST.AUG.MIN_SIZES
    if isinstance(sizes, int):
        sizes = (sizes,)
    if len(sizes) == 0 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"TEST.AUG.MIN_SIZES = {cfg.TEST.AUG.MIN_SIZES!r}; expected one or more short-side "
            "sizes >= 1 in pixels, e.g. (640, 800, 960)."
        )
    if not cfg.TEST.AUG.MAX_SIZE >= 1:
        raise ValueError(
            f"TEST.AUG.MAX_SIZE = {cfg.TEST.AUG.MAX_SIZE!r}; expected the longest side of a "
            "view in pixels (>= 1)."
        )


class _Pool(NamedTuple):
    """Candidates pooled from the views, sorted by descending score (ties: in view order).

    scores: float32 [n]; labels: int64 [n]; probs: float32 [n, H_f, W_f] mask probabilities in
    the frame.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor


class SOLOv2WithTTA(nn.Module):
    """A :class:`~solov2_d2.modeling.meta_arch.SOLOv2` with test-time augmentation (see the
    module's docstring for what is merged). Called like the model in inference: a list of
    input dicts ("image" [C, H, W] uint8 in ``INPUT.FORMAT`` order on the CPU, or
    "file_name"; optional "height", "width": the output size) to a list of
    ``{"instances": Instances}`` with ``pred_masks``, ``scores``, ``pred_classes`` and
    ``pred_boxes``. Works with detectron2's ``inference_on_dataset`` and as
    ``SOLOv2Predictor``'s model (``predictor.model = SOLOv2WithTTA(cfg, predictor.model)``).
    """

    @configurable
    def __init__(
        self,
        *,
        model: SOLOv2,
        tta_mapper,
        input_format: str = "BGR",
        batch_size: int = 1,
    ):
        """
        Args:
            model: the SOLOv2 model (a DistributedDataParallel is unwrapped).
            tta_mapper: a dataset dict to the list of its views, each with "transforms" (the
                transforms from the image given to the view: resizes and horizontal flips),
                as detectron2's ``DatasetMapperTTA``.
            input_format: format of images read from "file_name".
            batch_size: views that run through the network together (on a GPU they are padded
                to the largest, which changes each view's grid: 1 gives each view the results
                it has alone).
        """
        super().__init__()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, SOLOv2):
            raise TypeError(f"SOLOv2WithTTA needs a SOLOv2 model; got {type(model).__name__}.")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}; expected at least 1.")
        self.model = model
        self.tta_mapper = tta_mapper
        self.input_format = input_format
        self.batch_size = batch_size
        self.train(model.training)  # the model's mode, which train() / eval() set for both

    @classmethod
    def from_config(cls, cfg, model, tta_mapper=None, batch_size: int = 1):
        check_tta_config(cfg)
        return {
            "model": model,
            "tta_mapper": DatasetMapperTTA(cfg) if tta_mapper is None else tta_mapper,
            "input_format": cfg.INPUT.FORMAT,
            "batch_size": batch_size,
        }

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.model.training:
            raise ValueError("SOLOv2WithTTA is for inference: put it in eval() mode.")
        with torch.no_grad():
            return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]

    def _with_image(self, dataset_dict: Dict) -> Dict:
        """The dict with "image" (read from "file_name" where missing), "height" and "width"."""
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "height" not in ret or "width" not in ret:
            ret["height"], ret["width"] = ret["image"].shape[-2:]
        return ret

    def _views(self, dataset_dict: Dict) -> Tuple[List[Dict], List[bool]]:
        """The views of `dataset_dict` (without their "transforms") and whether each is
        flipped."""
        views = self.tta_mapper(dataset_dict)
        if not views:
            raise ValueError("The TTA mapper gave no view of the image (TEST.AUG.MIN_SIZES).")
        flips = []
        for view in views:
            transforms = view.pop("transforms")
            parts = transforms.transforms if isinstance(transforms, TransformList) else [
                transforms
            ]
            unknown = [type(t).__name__ for t in parts if not isinstance(t, _KNOWN_TRANSFORMS)]
            if unknown:
                raise ValueError(
                    f"SOLOv2WithTTA undoes resizes and horizontal flips only; the TTA mapper "
                    f"gave a view with {unknown}."
                )
            flips.append(sum(isinstance(t, HFlipTransform) for t in parts) % 2 == 1)
        return views, flips

    def _inference_one_image(self, dataset_dict: Dict) -> Dict[str, Instances]:
        """Detections of one image (a dict with "image", "height", "width") from all its
        views."""
        post = self.model.postprocessor
        views, flips = self._views(dataset_dict)
        sizes = [tuple(v["image"].shape[-2:]) for v in views]
        # The frame view: the largest unflipped one (the first of equals), else the largest.
        frame = max(range(len(views)), key=lambda i: (not flips[i], sizes[i][0] * sizes[i][1], -i))
        pool, frame_masks = self._pooled_candidates(views, flips, sizes, frame)
        # Step 6 on the pool, once.
        nms = batched_matrix_nms(
            (pool.probs > post.mask_thresh).flatten(1)[None],
            pool.labels[None],
            pool.scores[None],
            torch.ones_like(pool.labels, dtype=torch.bool)[None],
            kernel=post.nms_kernel,
            sigma=post.nms_sigma,
            score_thresh=post.update_thresh,
            max_per_image=post.max_per_image,
        )
        kept = nms.keep[0][nms.valid[0]]
        output_size = (dataset_dict["height"], dataset_dict["width"])
        # Step 7 with the frame view's computation of the masks (the model's path).
        probs = pool.probs[kept]
        masks, boxes = frame_masks.paste(probs, sizes[frame], output_size)
        boxes = post.detection_boxes(masks, boxes, probs, sizes[frame])
        scores, labels = nms.scores[0][: len(kept)], nms.labels[0][: len(kept)]
        return {"instances": detections_to_instances(masks, scores, labels, boxes)}

    def _pooled_candidates(self, views, flips, sizes, frame) -> Tuple[_Pool, CandidateMasks]:
        """Steps 1-5 on every view (`batch_size` at a time, the frame view first), the views'
        candidates pooled in the frame (:func:`_merge`): the pool, and the `CandidateMasks` of
        the frame view's batch (which pastes the masks)."""
        model = self.model
        post = model.postprocessor
        candidates = _candidates_only(post)
        policy = model.network_policy or NetworkPolicy.for_device(model.device)
        order = [frame] + [i for i in range(len(views)) if i != frame]
        pool, frame_extent, frame_masks = None, None, None
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            images = model.preprocess_image([views[i] for i in batch])
            outputs = policy.run(
                model.network, images, model.backbone.size_divisibility, model.mask_stride
            )
            found = candidates.detect(
                outputs.cate_logits, outputs.kernels, outputs.mask_features, outputs.mask_extents
            )
            counts = found.valid.sum(dim=1).tolist()  # host read: the candidates of each view
            for j, i in enumerate(batch):
                h_m, w_m = outputs.mask_extents[j]
                if i == frame:
                    frame_extent, frame_masks = (h_m, w_m), found.masks
                n = counts[j]
                view = _Pool(
                    found.scores[j, :n], found.labels[j, :n], found.soft_masks[j, :n, :h_m, :w_m]
                )
                if i == frame and not flips[i]:
                    to_frame = None  # taken as they are
                else:
                    to_frame = functools.partial(
                        _to_frame,
                        view_size=sizes[i],
                        flipped=flips[i],
                        frame_size=sizes[frame],
                        frame_extent=frame_extent,
                        mask_stride=post.mask_stride,
                    )
                pool = _merge(pool, view, to_frame, post.pre_nms_topk)
        return pool, frame_masks


def _candidates_only(post):
    """A copy of the post-processor whose step 6 suppresses nothing: Matrix NMS with a Gaussian
    sigma of 0 (every decay factor is exactly 1), no score threshold and no cap. Its `detect`
    gives a view's top `pre_nms_topk` candidates after steps 1-5, by descending score (ties in
    candidate order), with their mask probabilities."""
    candidates = copy.copy(post)
    candidates.nms_kernel, candidates.nms_sigma = "gaussian", 0.0
    candidates.update_thresh, candidates.max_per_image = 0.0, -1
    return candidates


def _merge(
    pool: Optional[_Pool], view: _Pool, to_frame: Optional[Callable], topk: int
) -> _Pool:
    """The top `topk` (all where topk <= 0) of the pool and a view's candidates by descending
    score, the pool's first among equal scores; `to_frame` brings the view's masks that enter
    the pool (float32 [k, h_m, w_m]) into the frame (None: they are in it)."""
    offset = 0 if pool is None else len(pool.scores)
    scores = view.scores if pool is None else torch.cat([pool.scores, view.scores])
    order = sort_descending(scores[None], torch.ones_like(scores, dtype=torch.bool)[None])[0]
    if topk > 0:
        order = order[:topk]
    from_pool = order < offset
    taken = order[~from_pool] - offset
    probs = view.probs[taken]
    if to_frame is not None:
        probs = to_frame(probs)
    if pool is None:
        return _Pool(scores[order], view.labels[taken], probs)
    merged = probs.new_empty((len(order), *probs.shape[1:]))
    merged[from_pool] = pool.probs[order[from_pool]]
    merged[~from_pool] = probs
    labels = torch.cat([pool.labels, view.labels])[order]
    return _Pool(scores[order], labels, merged)


def _to_frame(
    probs: torch.Tensor,
    view_size: Sequence[int],
    flipped: bool,
    frame_size: Sequence[int],
    frame_extent: Sequence[int],
    mask_stride: int,
) -> torch.Tensor:
    """A view's mask probabilities float32 [n, h_m, w_m] (its extent) in the frame's grid
    [n, H_f, W_f], bilinear (0 beyond the view's extent).

    A frame pixel (i, j) has its centre at ((i + 0.5) s, (j + 0.5) s) in the frame view's
    input (s the mask stride), that is at fractions (y / h_f, x / w_f) of its image; the same
    fractions of the view's image (x mirrored where the view is flipped) give the point read
    from the view's grid, whose pixel centres lie at (k + 0.5) s as well.
    """
    (h_v, w_v), (h_f, w_f), (rows, cols) = view_size, frame_size, frame_extent
    device = probs.device
    n, h_m, w_m = probs.shape
    y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * (mask_stride * h_v / h_f)
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * (mask_stride * w_v / w_f)
    if flipped:
        x = w_v - x
    # grid_sample's normalised coordinates (align_corners False): -1 and 1 are the outer
    # edges of the view's grid, h_m * s and w_m * s input pixels.
    gy = 2 * y / (h_m * mask_stride) - 1
    gx = 2 * x / (w_m * mask_stride) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    if n == 0:
        return probs.new_zeros((0, rows, cols))
    out = F.grid_sample(
        probs[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0]
