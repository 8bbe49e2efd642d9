"""Datasets (a labelme reader, this project's datasets) and the training data path."""
from .datasets import register_builtin_datasets
from .labelme import get_labelme_class_names, load_labelme_instances, register_labelme_instances
from .mapper import SOLOv2DatasetMapper
from .train_loader import ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "ResumableTrainLoader",
    "SOLOv2DatasetMapper",
    "build_resumable_train_loader",
    "get_labelme_class_names",
    "load_labelme_instances",
    "register_builtin_datasets",
    "register_labelme_instances",
]
