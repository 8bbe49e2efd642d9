"""An exported SOLOv2 graph run by Intel's OpenVINO (CPU plugin), the second runtime behind
:class:`~solov2_d2.export.OnnxPredictor` (``runtime="openvino"``): OpenVINO reads the ONNX file
itself, with no conversion step. Needs the `openvino` extra (``pip install -e .[openvino]``).
"""
from typing import Dict, List, Optional

import numpy as np

from .graph import OUTPUT_NAMES, require_export_packages

__all__ = ["OpenVinoGraph"]


class OpenVinoGraph:
    """The graph of an exported file compiled for OpenVINO's CPU plugin.

    Called with the graph's inputs (``{"images": float32 [B, 3, H, W], "image_sizes": int64
    [B, 2]}``, as :meth:`OnnxPredictor.graph_inputs` returns them), it returns the outputs as
    numpy arrays in OUTPUT_NAMES order, with :class:`ExportOutputs`' shapes and dtypes. One
    inference runs at a time (one infer request). :attr:`metadata` holds the file's metadata
    (``solov2.*`` keys to strings), which OpenVINO's ONNX reader keeps in the model's
    ``rt_info["framework"]``; :attr:`compiled` is the ``openvino.CompiledModel`` (its
    properties: threads, precision).

    Float layers compute in float32 (``INFERENCE_PRECISION_HINT`` f32): the CPU plugin's default
    on CPUs with AMX or AVX-512 BF16 is bfloat16, which changes the detections beyond the
    export's tolerances. An int8 file's quantized convolutions still run in int8.
    """

    def __init__(self, onnx_path: str, num_threads: Optional[int] = None):
        """
        Args:
            onnx_path: the exported file (float or int8).
            num_threads: OpenVINO's inference threads (``INFERENCE_NUM_THREADS``); None:
                OpenVINO's default (its CPU plugin's latency setting: the physical cores).
        """
        require_export_packages("openvino", extra="openvino")
        import openvino

        core = openvino.Core()
        model = core.read_model(onnx_path)
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        self.metadata: Dict[str, str] = {k: v.astype(str) for k, v in framework.items()}
        settings = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads is not None:
            settings["INFERENCE_NUM_THREADS"] = num_threads
        self.compiled = core.compile_model(model, "CPU", settings)
        by_name = {output.get_any_name(): output for output in self.compiled.outputs}
        self._outputs = [by_name[name] for name in OUTPUT_NAMES]
        self._request = self.compiled.create_infer_request()

    def __call__(self, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
        # infer copies the outputs (share_outputs=False): the next call cannot overwrite them.
        results = self._request.infer(inputs)
        return [results[output] for output in self._outputs]
