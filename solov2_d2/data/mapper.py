"""Detectron2's DatasetMapper reading images with :func:`~solov2_d2.data.images.read_image`, with
errors that name the image they come from, and the training augmentations of
:mod:`solov2_d2.data.augmentation` (large-scale jitter, colour jitter, copy-paste)."""
import copy
from typing import List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Boxes, Instances

from .augmentation import (
    build_solov2_augmentation,
    masks_to_tight_boxes,
    rasterises_masks,
    transform_masks,
)
from .copy_paste import COPY_PASTE_SOURCE, paste_instances, random_subset
from .images import check_resizable, read_image

__all__ = ["SOLOv2DatasetMapper"]


class SOLOv2DatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`DatasetMapper` (same config keys, arguments and outputs), except that

    * images are read by :func:`~solov2_d2.data.images.read_image`: 16-bit PNG and TIFF images
      are scaled to 8 bits (detectron2 reads a 16-bit grayscale one as all white); 8-bit images
      give the same arrays as detectron2's;
    * an image that the resize (``ResizeShortestEdge``) would shrink to 0 pixels on a side, one
      more than 2 x ``INPUT.MAX_SIZE_TRAIN`` (``_TEST``) times longer than wide or the reverse,
      is refused with a ValueError giving its shape and the limit
      (:func:`~solov2_d2.data.images.check_resizable`) instead of failing inside PIL;
    * an error while reading or transforming an image names its file: PIL's "image file is
      truncated", for one, does not, and a dataset may hold thousands of images;
    * in training, ``INPUT.LSJ`` replaces the resize by large-scale jitter, ``INPUT.COLOR_JITTER``
      adds photometric jitter and ``INPUT.COPY_PASTE`` pastes instances of another image (see
      :mod:`solov2_d2.data.augmentation`). With LSJ or copy-paste the masks are rasterised at the
      image's size before any transform and given as ``BitMasks``, with the masks' tight boxes
      (``gt_boxes``), whatever ``INPUT.MASK_FORMAT`` says; keypoints are not kept.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        rasterise_masks: bool = False,
        copy_paste_prob: Optional[float] = None,
        min_visible_fraction: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            is_train, kwargs: as for :class:`DatasetMapper`.
            rasterise_masks: in training, rasterise the masks before the transforms (as
                described above); implied by copy-paste.
            copy_paste_prob: None: no copy-paste; else the probability of pasting instances of
                the dataset dict's ``COPY_PASTE_SOURCE`` image (see
                :mod:`solov2_d2.data.copy_paste`).
            min_visible_fraction: a target instance keeping less than this fraction of its
                pixels after the paste is dropped.
        """
        super().__init__(is_train, **kwargs)
        self.rasterise_masks = is_train and (rasterise_masks or copy_paste_prob is not None)
        self.copy_paste_prob = copy_paste_prob if is_train else None
        self.min_visible_fraction = min_visible_fraction

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        augs = build_solov2_augmentation(cfg, is_train)
        if cfg.INPUT.CROP.ENABLED and is_train:
            augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        ret["augmentations"] = augs
        ret["rasterise_masks"] = rasterises_masks(cfg, is_train)
        if is_train and cfg.INPUT.COPY_PASTE.ENABLED:
            ret["copy_paste_prob"] = cfg.INPUT.COPY_PASTE.PROB
            ret["min_visible_fraction"] = cfg.INPUT.COPY_PASTE.MIN_VISIBLE_FRACTION
        return ret

    @property
    def copy_paste(self) -> bool:
        """Whether the dataset dicts need a ``COPY_PASTE_SOURCE`` (the training loader adds
        it)."""
        return self.copy_paste_prob is not None

    def __call__(self, dataset_dict: dict) -> dict:
        """See :meth:`DatasetMapper.__call__`. Raises RuntimeError naming ``file_name``, with the
        original error as its cause."""
        try:
            return self._map(dataset_dict)
        except Exception as e:
            raise RuntimeError(
                f"Cannot load {dataset_dict.get('file_name')}: {type(e).__name__}: {e}"
            ) from e

    def _map(self, dataset_dict: dict) -> dict:
        """Detectron2's :meth:`DatasetMapper.__call__` with this project's image reading and the
        resize check."""
        if self.rasterise_masks:
            return self._map_rasterised(dataset_dict)
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self._augment(aug_input, dataset_dict["file_name"])
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg

        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def _augment(self, aug_input: T.AugInput, file_name: str) -> T.TransformList:
        """``self.augmentations(aug_input)`` (one after the other, as :class:`AugmentationList`
        applies them), checking the image before each ``ResizeShortestEdge``."""
        key = "INPUT.MAX_SIZE_TRAIN" if self.is_train else "INPUT.MAX_SIZE_TEST"
        transforms = []
        for augmentation in self.augmentations.augs:
            if isinstance(augmentation, T.ResizeShortestEdge):
                check_resizable(
                    aug_input.image.shape,
                    min(augmentation.short_edge_length),
                    augmentation.max_size,
                    name=f"The image {file_name}",
                    max_size_key=key,
                )
            transforms.append(augmentation(aug_input))
        return T.TransformList(transforms)

    def _load_rasterised(
        self, dataset_dict: dict
    ) -> Tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The augmented image [H, W, C] of `dataset_dict`, its instances' masks (bool [N, H, W],
        rasterised before the transforms) and classes (int64 [N]); crowd annotations and
        instances left empty (cropped out) are dropped."""
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        annos = [a for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
        masks = annotation_masks(annos, *image.shape[:2])
        classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
        aug_input = T.AugInput(image)
        transforms = self._augment(aug_input, dataset_dict["file_name"])
        masks = transform_masks(transforms, masks)
        nonempty = masks.flatten(1).any(dim=1)
        return aug_input.image, masks[nonempty], classes[nonempty]

    def _map_rasterised(self, dataset_dict: dict) -> dict:
        """The training path with rasterised masks, and copy-paste if asked for."""
        source = dataset_dict.get(COPY_PASTE_SOURCE)
        dataset_dict = {k: v for k, v in dataset_dict.items() if k != COPY_PASTE_SOURCE}
        image, masks, classes = self._load_rasterised(dataset_dict)
        if self.copy_paste:
            if source is None:
                raise ValueError(
                    f"INPUT.COPY_PASTE.ENABLED needs a source image in the dataset dict's "
                    f"{COPY_PASTE_SOURCE!r}: build the training loader with "
                    "solov2_d2.data.build_resumable_train_loader, which adds it."
                )
            if np.random.uniform() < self.copy_paste_prob:
                try:
                    src_image, src_masks, src_classes = self._load_rasterised(source)
                except Exception as e:
                    raise RuntimeError(
                        f"Cannot load the copy-paste source {source.get('file_name')}: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                chosen = random_subset(len(src_masks))
                image, masks, classes = paste_instances(
                    image,
                    masks,
                    classes,
                    src_image,
                    src_masks[chosen],
                    src_classes[chosen],
                    self.min_visible_fraction,
                )
        for key in ("annotations", "sem_seg_file_name"):
            dataset_dict.pop(key, None)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        instances = Instances(image.shape[:2])
        instances.gt_boxes = Boxes(masks_to_tight_boxes(masks))
        instances.gt_classes = classes
        instances.gt_masks = BitMasks(masks)
        dataset_dict["instances"] = instances
        return dataset_dict


def annotation_masks(annos: List[dict], height: int, width: int) -> torch.Tensor:
    """The masks of detectron2 annotations ("segmentation": polygons, COCO RLE or a 2-D array)
    as bool [N, height, width]. All the polygons of an image are rasterised by one pycocotools
    call."""
    masks = torch.zeros((len(annos), height, width), dtype=torch.bool)
    polygons, owners = [], []
    for i, anno in enumerate(annos):
        segm = anno["segmentation"]
        if isinstance(segm, list):
            polygons += [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in segm]
            owners += [i] * len(segm)
        elif isinstance(segm, dict):
            if isinstance(segm["counts"], list):
                segm = mask_util.frPyObjects(segm, *segm["size"])
            masks[i] = torch.from_numpy(mask_util.decode(segm).astype(bool))
        elif isinstance(segm, np.ndarray) and segm.shape == (height, width):
            masks[i] = torch.from_numpy(segm.astype(bool))
        else:
            raise ValueError(
                f"Cannot rasterise a segmentation of type {type(segm).__name__} for an image of "
                f"{height}x{width}: expected polygons, COCO RLE or a {height}x{width} array."
            )
    if polygons:
        decoded = mask_util.decode(mask_util.frPyObjects(polygons, height, width))  # H, W, P
        per_polygon = torch.from_numpy(decoded.astype(bool)).permute(2, 0, 1)
        owners = torch.tensor(owners)
        # Union of each instance's polygons: round k ORs the k-th polygon of every instance
        # (as many rounds as the most polygons an instance has).
        first = torch.searchsorted(owners, owners)  # owners are sorted
        rank = torch.arange(len(owners)) - first
        for k in range(int(rank.max()) + 1):
            masks[owners[rank == k]] |= per_polygon[rank == k]
    return masks
