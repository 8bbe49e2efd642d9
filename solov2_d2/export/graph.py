"""The exported graph: a whole SOLOv2 model as one module of tensors in, tensors out, and its ONNX
export.

The graph takes a padded batch of raw images and returns padded per-image detections. It is the
eager model's own code (`SOLOv2.network` and `SOLOv2PostProcessor.detect`) run on one padded
batch, with the candidates given a static count (`SOLOv2PostProcessor.fixed_candidates`).
"""
import copy
import json
import os
from typing import Dict, NamedTuple, Tuple

import torch
from torch import nn

from detectron2.data import MetadataCatalog

from ..inference.pipeline import masks_to_boxes, point_nms
from ..layers.deform_conv import ModulatedDeformConv2d
from ..layers.dynamic_conv import flatten_levels
from ..modeling.meta_arch import SOLOv2, mask_extent
from .translations import DEFORM_CONV_OPSET, custom_translation_table

__all__ = [
    "DEFAULT_MAX_CANDIDATES",
    "DEFORM_CONV_OPSET",
    "INPUT_NAMES",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "ExportOutputs",
    "SOLOv2ExportModule",
    "check_opset",
    "config_metadata",
    "export_onnx",
    "has_deformable_convs",
    "require_export_packages",
]

# Candidates ((cell, class) pairs above the score threshold) the graph scores per image: twice
# the default PRE_NMS_TOPK_TEST; more are cut by category score.
DEFAULT_MAX_CANDIDATES = 1000
# A current opset (ONNX 1.15, run by ONNX Runtime 1.17 and later).
OPSET = 20
# The lowest opset the export honours: torch's exporter writes opset 18 and converts the graph to
# a lower one with ONNX's version converter, which fails on this graph (torch then catches the
# error and keeps opset 18). Models with deformable convolutions need DEFORM_CONV_OPSET (19), the
# first with ONNX's DeformConv.
MIN_OPSET = 18
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("scores", "classes", "masks", "boxes", "count", "num_candidates")


class ExportOutputs(NamedTuple):
    """The graph's outputs for a batch of B images, N detections each: N = the smallest of
    MODEL.SOLOV2.MAX_PER_IMAGE_TEST, PRE_NMS_TOPK_TEST and the candidate bound (100 by default).

    scores: float32 [B, N], descending; 0 for padding.
    classes: int64 [B, N]; -1 for padding.
    masks: float32 [B, N, H / s, W / s] mask probabilities at the mask features' stride s of the
        padded input; 0 outside the image's part (its size padded to the size divisibility)
        and for padding.
    boxes: float32 [B, N, 4] XYXY in input pixels: tight boxes of the masks binarised at the
        mask threshold at the mask features' resolution, times s, clipped to the image (a
        stride-s approximation of the pasted masks' tight boxes); 0 for padding.
    count: int64 [B], detections per image: the first `count` entries of each row are valid.
    num_candidates: int64 [B], candidates above the score threshold per image; more than the
        graph's bound means that the lowest-scored candidates were dropped.
    """

    scores: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    count: torch.Tensor
    num_candidates: torch.Tensor


class SOLOv2ExportModule(nn.Module):
    """A :class:`SOLOv2` in inference as a function of tensors, for tracing and export.

    Inputs: `images`, float32 [B, 3, H, W] pixel values in the model's INPUT.FORMAT, H and W
    multiples of the backbone's size divisibility (the padding's values are ignored), and
    `image_sizes`, int64 [B, 2], each image's (h, w) before padding. Outputs: see
    :class:`ExportOutputs`.

    The network runs on the whole padded batch (`NetworkPolicy(per_image=False)`, the default on
    CUDA): an image's grids cover the batch's padded size, so a smaller image's results depend
    on its batch, as with eager batches on CUDA.
    """

    def __init__(self, model: SOLOv2, max_candidates: int = DEFAULT_MAX_CANDIDATES):
        """
        Args:
            model: the model to export, in eval mode.
            max_candidates: the static bound on candidates per image (see `num_candidates`);
                results equal the eager model's whenever an image has at most this many.
        """
        super().__init__()
        if max_candidates < 1:
            raise ValueError(f"max_candidates = {max_candidates}; expected a positive bound.")
        self.model = model
        self.postprocessor = copy.copy(model.postprocessor)
        self.postprocessor.fixed_candidates = max_candidates
        # The graph is the plain path (its masks are probabilities everywhere), also when this
        # module runs eagerly on the CPU.
        self.postprocessor.inference_path = "plain"
        self.size_divisibility = max(model.backbone.size_divisibility, 1)

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> ExportOutputs:
        model, post = self.model, self.postprocessor
        height, width = images.shape[-2:]
        # Normalised, then zero padding: the batch that ImageList.from_tensors makes in eager.
        rows = torch.arange(height, device=images.device)[:, None] < image_sizes[:, :1, None]
        cols = torch.arange(width, device=images.device) < image_sizes[:, 1:, None]
        inside = rows & cols  # [B, H, W]
        x = (images - model.pixel_mean) / model.pixel_std * inside[:, None]
        cate_logits, kernels, mask_features = model.network(x)

        # Within the mask features: the padded batch covers every image's padded size.
        extents = mask_extent(image_sizes, self.size_divisibility, model.mask_stride)
        found = post.detect(cate_logits, kernels, mask_features, extents)
        masks = found.soft_masks * found.valid[:, :, None, None]  # padding entries: empty
        # uint8: masks_to_boxes reads bool masks through a dtype view, which ONNX does not have.
        binary = (masks > post.mask_thresh).to(torch.uint8)
        boxes = masks_to_boxes(binary.flatten(0, 1)).view(*binary.shape[:2], 4)
        limits = image_sizes.flip(1).repeat(1, 2)[:, None].float()  # [B, 1, 4]: w, h, w, h
        boxes = torch.minimum(boxes * model.mask_stride, limits)

        # Step 1 of detect again, for the count of candidates before the bound.
        probs = flatten_levels([point_nms(x.float().sigmoid()) for x in cate_logits]).flatten(1)
        return ExportOutputs(
            scores=found.scores,
            classes=found.labels,
            masks=masks,
            boxes=boxes,
            count=found.valid.sum(dim=1),
            num_candidates=(probs > post.score_thresh).sum(dim=1),
        )

    def sample_inputs(self, batch: int = 2, size: Tuple[int, int] = (256, 320)):
        """Inputs to trace with: `batch` gray images of `size` rounded up to the divisibility.
        Sizes of 1 would be specialised by the exporter, hence 2 images of unequal sides."""
        h, w = (mask_extent(s, self.size_divisibility, 1) for s in size)
        images = torch.full((batch, 3, h, w), 128.0, device=self.model.device)
        sizes = torch.tensor([[h, w]] * batch, device=self.model.device)
        return images, sizes


def require_export_packages(*names: str, extra: str = "export"):
    """Raise ImportError naming the install command (of the project's `extra`) when a package
    of `names` is missing."""
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export and inference need {', '.join(missing)}, which are not installed: "
            f"pip install -e .[{extra}]"
        )


def has_deformable_convs(model: nn.Module) -> bool:
    """Whether `model` has deformable convolutions (:class:`ModulatedDeformConv2d`, the DCN
    configs), which the graph holds as ONNX DeformConv (opset 19 and later)."""
    return any(isinstance(m, ModulatedDeformConv2d) for m in model.modules())


def check_opset(opset: int, deformable: bool = False):
    """Raise ValueError naming the lowest supported opset when `opset` is below it: MIN_OPSET,
    or DEFORM_CONV_OPSET for a model with deformable convolutions (`deformable`)."""
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is below {MIN_OPSET}, the lowest opset the export supports: "
            f"torch's exporter cannot convert the graph to it. Use --opset {MIN_OPSET} or higher "
            f"(default {OPSET})."
        )
    if deformable and opset < DEFORM_CONV_OPSET:
        raise ValueError(
            f"opset {opset} is below {DEFORM_CONV_OPSET}: the model has deformable convolutions "
            f"(DCN), which ONNX has as DeformConv from opset {DEFORM_CONV_OPSET}. Use --opset "
            f"{DEFORM_CONV_OPSET} or higher (default {OPSET})."
        )


def config_metadata(cfg) -> Dict[str, str]:
    """What using the graph depends on beyond its tensors, from the config it was exported
    with: the channel order of its input images (``INPUT.FORMAT``), the test sizes its runtime
    resizes images to (``INPUT.MIN_SIZE_TEST``, ``MAX_SIZE_TEST``), how its runtime draws the
    boxes of the pasted masks (``MODEL.SOLOV2.BOX_FROM``, ``BOX_MIN_PART_FRACTION``), and the
    names of its
    ``MODEL.SOLOV2.NUM_CLASSES`` classes, when a dataset of ``DATASETS.TEST`` or ``TRAIN`` (in
    that order) has as many ``thing_classes``.

    Returns:
        keys without the ``solov2.`` prefix -> values as text (the class names as JSON).
    """
    metadata = {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "box_from": cfg.MODEL.SOLOV2.BOX_FROM,
        "box_min_part_fraction": str(float(cfg.MODEL.SOLOV2.BOX_MIN_PART_FRACTION)),
    }
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) == cfg.MODEL.SOLOV2.NUM_CLASSES:
            metadata["thing_classes"] = json.dumps(list(classes))
            break
    return metadata


def _written_opset(proto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    model: SOLOv2,
    path: str,
    *,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    opset: int = OPSET,
    cfg=None,
) -> str:
    """Export `model` (pre-processing, network and post-processing) to the ONNX file `path`,
    with torch's `torch.export`-based exporter (`dynamo=True`).

    The graph's inputs and outputs are those of :class:`SOLOv2ExportModule`; the batch size and
    the padded image size (multiples of the size divisibility) are dynamic. The file's metadata
    (`metadata_props`) holds what a runtime needs to pad the inputs and paste the masks:
    `solov2.size_divisibility`, `solov2.mask_stride`, `solov2.mask_thresh`, the bound
    `solov2.max_candidates` and `solov2.num_classes`; with `cfg`, also what
    :func:`config_metadata` gives: `solov2.input_format`, `solov2.min_size_test`,
    `solov2.max_size_test`, `solov2.box_from`, `solov2.box_min_part_fraction` and
    `solov2.thing_classes` (a JSON list).

    Args:
        model: the model to export; put in eval mode.
        path: the output file (weights included).
        max_candidates: the graph's static bound on candidates per image.
        opset: the ONNX opset, at least :data:`MIN_OPSET`.
        cfg: the config the model was built from, or None.
    Returns:
        `path`.
    Models with deformable convolutions (the DCN configs) are exported with ONNX's DeformConv
    (see :mod:`.translations`), which needs opset 19.

    Raises:
        ValueError: for an opset below :data:`MIN_OPSET`, or below :data:`DEFORM_CONV_OPSET`
            for a model with deformable convolutions (before exporting anything), or when
            torch's exporter wrote another opset than `opset` (the file is then removed).
    """
    check_opset(opset, has_deformable_convs(model))
    require_export_packages("onnx", "onnxscript")
    import onnx

    module = SOLOv2ExportModule(model.eval(), max_candidates)
    inputs = module.sample_inputs()
    batch = torch.export.Dim("batch", min=1)
    divisibility = module.size_divisibility
    dynamic_shapes = {
        "images": {
            0: batch,
            2: divisibility * torch.export.Dim("height_blocks", min=1),
            3: divisibility * torch.export.Dim("width_blocks", min=1),
        },
        "image_sizes": {0: batch},
    }
    with torch.no_grad():
        torch.onnx.export(
            module,
            inputs,
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            custom_translation_table=custom_translation_table(),
        )
    proto = onnx.load(path)
    written = _written_opset(proto)
    if written != opset:
        os.remove(path)
        raise ValueError(
            f"opset {opset} was asked for, but torch's exporter wrote opset {written}; nothing "
            f"was written. Use an opset from {MIN_OPSET} (default {OPSET})."
        )
    metadata: Dict[str, object] = {
        "size_divisibility": divisibility,
        "mask_stride": model.mask_stride,
        "mask_thresh": module.postprocessor.mask_thresh,
        "max_candidates": max_candidates,
        "num_classes": model.num_classes,
    }
    if cfg is not None:
        metadata.update(config_metadata(cfg))
    onnx.helper.set_model_props(proto, {f"solov2.{k}": str(v) for k, v in metadata.items()})
    onnx.save(proto, path)
    return path
