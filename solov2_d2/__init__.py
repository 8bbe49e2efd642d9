"""SOLOv2 instance segmentation as a Detectron2 project.

Importing the package bridges a detectron2 installed without compiled ops (see `compat`),
registers the meta-architecture `SOLOv2` and the backbone `build_solov2_resnet_fpn_backbone`,
and registers the built-in datasets (`fruit_*`, `coco_mini_*`; see `solov2_d2.data.datasets`).
"""
from . import compat

compat.install()

from .backbone import build_solov2_resnet_fpn_backbone  # noqa: E402
from .config import add_solov2_config  # noqa: E402
from .data import register_builtin_datasets  # noqa: E402
from .meta_arch import SOLOv2  # noqa: E402

register_builtin_datasets()

__version__ = "0.1.0"
__all__ = ["SOLOv2", "add_solov2_config", "build_solov2_resnet_fpn_backbone"]
