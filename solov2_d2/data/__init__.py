"""Datasets: a labelme reader and the registration of this project's datasets."""
from .datasets import register_builtin_datasets
from .labelme import get_labelme_class_names, load_labelme_instances, register_labelme_instances

__all__ = [
    "get_labelme_class_names",
    "load_labelme_instances",
    "register_builtin_datasets",
    "register_labelme_instances",
]
