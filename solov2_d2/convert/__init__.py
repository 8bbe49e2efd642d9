"""Converters from the published SOLOv2 model zoos (and ImageNet ResNets) to this project.

``python -m solov2_d2.convert SRC DST --from {solo,mmdet,adelaidet,torchvision}`` reads a
checkpoint of the authors' SOLO (mmdetection v1), mmdetection 2.x/3.x or AdelaiDet, or a
torchvision ImageNet ResNet/ResNeXt, and writes a Detectron2 checkpoint that
:class:`solov2_d2.SOLOv2` loads with no missing and no unexpected keys, plus the config
(``DST`` with suffix ``.yaml``) the weights need. See ``python -m solov2_d2.convert --help``.

Modules:

* :mod:`.sources`: the checkpoint families, their naming tables and input conventions;
  :mod:`.rules`: the name rules.
* :mod:`.mapping`: renaming (every tensor mapped or dropped on purpose) and fitting to the target
  model (every name and shape checked).
* :mod:`.architecture`: the config keys the tensors fix, read off the tensors.
* :mod:`.variants`: the published variants, read from the repository's ``configs/``, and
  matching a checkpoint to them.
* :mod:`.overrides`: the config keys the weights need, the target model, the yaml written.
* :mod:`.checkpoint_io`: reading foreign files (no downloads, no code from the file) and writing
  Detectron2 checkpoints.
"""
from .converter import ConversionResult, convert_checkpoint, convert_state_dict, summary
from .mapping import ConversionError
from .sources import SOURCES
from .variants import CONFIGS_DIR, published_variants

__all__ = [
    "CONFIGS_DIR",
    "SOURCES",
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "convert_state_dict",
    "summary",
    "published_variants",
]
