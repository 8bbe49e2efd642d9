"""SOLOv2 instance segmentation as a Detectron2 project."""
from . import compat

compat.install()

__version__ = "0.1.0"
