"""Datasets (a labelme reader, a checked COCO loader, this project's datasets) and the training
data path."""
from .coco import (
    check_coco_datasets,
    load_coco_instances,
    refresh_coco_json,
    register_coco_instances,
)
from .datasets import register_builtin_datasets
from .images import check_resizable, read_image
from .labelme import get_labelme_class_names, load_labelme_instances, register_labelme_instances
from .mapper import SOLOv2DatasetMapper
from .train_loader import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "ResumableTrainLoader",
    "SOLOv2DatasetMapper",
    "build_resumable_train_loader",
    "check_coco_datasets",
    "check_resizable",
    "get_labelme_class_names",
    "load_coco_instances",
    "load_labelme_instances",
    "read_image",
    "refresh_coco_json",
    "register_builtin_datasets",
    "register_coco_instances",
    "register_labelme_instances",
]
