"""ONNX export of whole SOLOv2 models (pre-processing, network and post-processing in one graph),
and a predictor that runs exported models in ONNX Runtime or OpenVINO; see the README's "Deploy"
section.

Command line: ``python -m solov2_d2.export --config-file ... --output DIR [KEY VALUE ...]``.
"""
from .graph import (
    DEFAULT_MAX_CANDIDATES,
    MIN_OPSET,
    ExportOutputs,
    SOLOv2ExportModule,
    config_metadata,
    export_onnx,
    require_export_packages,
)
from .predictor import RUNTIMES, OnnxInferenceModel, OnnxPredictor, add_runtime_argument

__all__ = [
    "DEFAULT_MAX_CANDIDATES",
    "MIN_OPSET",
    "RUNTIMES",
    "add_runtime_argument",
    "ExportOutputs",
    "OnnxInferenceModel",
    "OnnxPredictor",
    "SOLOv2ExportModule",
    "config_metadata",
    "export_onnx",
    "require_export_packages",
]
