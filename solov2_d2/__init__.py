"""SOLOv2 instance segmentation as a Detectron2 project.

Importing the package bridges a detectron2 installed without compiled ops (see `compat`),
registers the meta-architecture `SOLOv2` and the backbone `build_solov2_resnet_fpn_backbone`,
and registers the built-in datasets (`fruit_*`, `coco_mini_*`; see `solov2_d2.data.datasets`).

Folders by concern (imports run down this list, never up):

* ``layers/``: operators shared by training and inference (deformable and dynamic convolution);
* ``modeling/``: the network, target assignment and losses (the meta-architecture);
* ``inference/``: from the heads' outputs to ``Instances`` (the paper's steps in ``pipeline``,
  Matrix NMS; the CPU's faster ways to compute the same results in ``inference/cpu/``);
* ``engine/``: predictor, checkpointer, solver, multi-process launch;
* ``data/``, ``convert/``, ``export/``: datasets, checkpoint conversion, ONNX export.
"""
from . import compat

compat.install()

from .config import add_solov2_config  # noqa: E402
from .convert import convert_checkpoint  # noqa: E402
from .data import register_builtin_datasets  # noqa: E402
from .engine.predictor import SOLOv2Predictor  # noqa: E402
from .export import OnnxPredictor  # noqa: E402
from .modeling.backbone import build_solov2_resnet_fpn_backbone  # noqa: E402
from .modeling.meta_arch import SOLOv2  # noqa: E402

register_builtin_datasets()

__version__ = "0.2.0"
__all__ = [
    "OnnxPredictor",
    "SOLOv2",
    "SOLOv2Predictor",
    "add_solov2_config",
    "build_solov2_resnet_fpn_backbone",
    "convert_checkpoint",
]
