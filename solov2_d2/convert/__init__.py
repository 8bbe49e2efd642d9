"""Converters from the published SOLOv2 model zoos (and ImageNet ResNets) to this project.

``python -m solov2_d2.convert SRC DST --from {solo,mmdet,adelaidet,torchvision}`` reads a
checkpoint of the authors' SOLO (mmdetection v1), mmdetection 2.x/3.x or AdelaiDet, or a
torchvision ImageNet ResNet/ResNeXt, and writes a Detectron2 checkpoint that
:class:`solov2_d2.SOLOv2` loads with no missing and no unexpected keys, plus the config
(``DST`` with suffix ``.yaml``) the weights need. See ``python -m solov2_d2.convert --help``.

Modules:

* :mod:`.sources`: the checkpoint families, their naming tables and input conventions;
  :mod:`.backbone`, :mod:`.mmdet_heads`, :mod:`.adelaidet_heads`: the name rules.
* :mod:`.mapping`: renaming (every tensor mapped or dropped on purpose) and fitting to the target
  model (every name and shape checked).
* :mod:`.variants`, :mod:`.detect`: the published variants and reading the architecture off the
  tensors.
* :mod:`.overrides`: the config keys the weights need, the target model, the yaml written.
* :mod:`.checkpoint_io`: reading foreign files (no downloads, no code from the file) and writing
  Detectron2 checkpoints.
"""
from .converter import (
    DEFAULT_CONFIGS_DIR,
    ConversionResult,
    convert_checkpoint,
    convert_state_dict,
    summary,
)
from .mapping import ConversionError
from .sources import SOURCES
from .variants import VARIANTS

__all__ = [
    "DEFAULT_CONFIGS_DIR",
    "SOURCES",
    "VARIANTS",
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "convert_state_dict",
    "summary",
]
