"""Checks made before anything is built, loaded or run, so that a bad setting or input fails at
once with a message naming it instead of late or deep inside torch.

* Weights are never downloaded: detectron2 would fetch a URL, ``detectron2://`` or
  ``catalog://`` path in ``MODEL.WEIGHTS`` at load time, which hangs or fails late without
  internet access. :func:`check_weights_are_local` rejects them at once and says what to fetch.
* Mixed precision (``SOLVER.AMP.ENABLED``) is detectron2's AMPTrainer: float16 autocast with
  gradient scaling, CUDA only. :func:`check_amp_device` rejects it for other devices instead of
  letting the first training step fail. CPU bfloat16 autocast is not offered: torchvision's
  ``deform_conv2d`` has neither a CPU autocast rule nor a bfloat16 CPU kernel, so the DCN
  variants would fail under it.
* ``MODEL.SOLOV2.NUM_CLASSES`` must be the number of classes of the datasets trained or
  evaluated on: :func:`check_dataset_classes`. Fewer would train the others as background (or
  fail with an index error); more would give predictions the evaluator cannot map.
* Ground truth of the model: :func:`instances_with_masks` gives images without annotations the
  empty masks detectron2's ``DatasetMapper`` leaves out. (The model's own input check, of NaN
  and infinite pixels, is ``solov2_d2.modeling.meta_arch.check_finite_image``.)
"""
import os

import torch

from detectron2.checkpoint.catalog import ModelCatalog
from detectron2.data import MetadataCatalog
from detectron2.structures import BitMasks, Instances
from detectron2.utils.file_io import Detectron2Handler

__all__ = [
    "check_amp_device",
    "check_dataset_classes",
    "check_weights_are_local",
    "instances_with_masks",
    "weights_download_url",
]

_TORCHVISION_HOST = "download.pytorch.org"


def weights_download_url(weights: str) -> str:
    """The https URL behind a ``detectron2://`` or ``catalog://`` path (pure string mapping, no
    network); other strings are returned unchanged."""
    if weights.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + weights[len(Detectron2Handler.PREFIX):]
    if weights.startswith("catalog://"):
        try:
            return ModelCatalog.get(weights[len("catalog://"):])
        except (RuntimeError, KeyError):
            return weights
    return weights


def check_weights_are_local(weights: str) -> None:
    """Raise ValueError, saying what to download, when ``weights`` (a ``MODEL.WEIGHTS`` value) is
    remote (``scheme://...``). Empty (random initialisation) and local paths pass; a local path
    that does not exist is left to detectron2's checkpointer to report."""
    if "://" not in weights:
        return
    url = weights_download_url(weights)
    if _TORCHVISION_HOST in url:
        then = (
            "These are torchvision weights: convert them with `python -m solov2_d2.convert "
            "SRC DST --from torchvision --config NAME`, which writes DST and a config for it "
            "(DST with suffix .yaml) to train with."
        )
    else:
        then = (
            f"Then pass its local path: MODEL.WEIGHTS /path/to/{os.path.basename(url)}. "
            "(Torchvision ImageNet weights must first be converted with "
            "`python -m solov2_d2.convert SRC DST --from torchvision`.)"
        )
    raise ValueError(
        f"MODEL.WEIGHTS = {weights!r} is not a local file, and solov2_d2 never downloads "
        f"weights. Download {url} on a machine with internet access and copy it here. {then} "
        'To train from random initialisation instead, pass MODEL.WEIGHTS "" with trainable '
        "norms (e.g. MODEL.RESNETS.NORM GN MODEL.BACKBONE.FREEZE_AT 0; see configs/fruit/)."
    )


def check_amp_device(cfg) -> None:
    """Raise ValueError when ``SOLVER.AMP.ENABLED`` is set for a device other than CUDA."""
    device = torch.device(cfg.MODEL.DEVICE).type
    if cfg.SOLVER.AMP.ENABLED and device != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED = True needs MODEL.DEVICE cuda: mixed precision is detectron2's "
            f"AMPTrainer (float16 autocast with gradient scaling), which runs on CUDA only; "
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}. Set SOLVER.AMP.ENABLED False to train on "
            f"{device}."
        )


def check_dataset_classes(num_classes: int, dataset_names) -> None:
    """Raise ValueError when a registered dataset's ``thing_classes`` (its metadata) are not
    `num_classes` (``MODEL.SOLOV2.NUM_CLASSES``); datasets without that metadata pass."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise ValueError(
                f"MODEL.SOLOV2.NUM_CLASSES is {num_classes}, but dataset {name!r} has "
                f"{len(classes)} classes ({shown}): set MODEL.SOLOV2.NUM_CLASSES "
                f"{len(classes)} (with weights trained for {len(classes)} classes to evaluate)."
            )


def instances_with_masks(instances: Instances) -> Instances:
    """``instances`` (ground truth of one training image) with ``gt_masks``.

    Detectron2's ``DatasetMapper`` gives an image without annotations (kept with
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS False``) no ``gt_masks``: it gets an empty
    ``BitMasks`` [0, H, W], so that it trains as an image of background. Raise ValueError when
    there are instances but no masks.
    """
    if instances.has("gt_masks"):
        return instances
    if len(instances) > 0:
        raise ValueError(
            f"SOLOv2 training needs instance masks, but an image of size {instances.image_size} "
            f"has {len(instances)} instances and no masks. Either MODEL.MASK_ON is False: set "
            "MODEL.MASK_ON True so that DatasetMapper keeps the 'segmentation' of each "
            "annotation. Or the dataset gives annotations without 'segmentation' (DatasetMapper "
            "makes masks only when the image's first annotation has one): give each annotation "
            "a polygon or RLE segmentation. COCO json files registered with "
            "solov2_d2.data.register_coco_instances, or used by train_net.py, are checked when "
            "loaded and name such an annotation."
        )
    empty = torch.zeros((0, *instances.image_size), dtype=torch.bool)
    instances.gt_masks = BitMasks(empty.to(instances.gt_classes.device))
    return instances
