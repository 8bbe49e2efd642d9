"""Detectron2's DatasetMapper reading images with :func:`~solov2_d2.data.images.read_image`, with
errors that name the image they come from."""
import copy

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

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
      truncated", for one, does not, and a dataset may hold thousands of images.
    """

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
