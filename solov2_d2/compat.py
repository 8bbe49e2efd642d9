"""Run detectron2 without its compiled ops, and with current Pillow.

Detectron2 is not on PyPI. Where it cannot be built (no compiler, no internet), `tools/bootstrap.sh`
installs its Python sources alone, without the extension module `detectron2._C`. Several detectron2
modules import `_C` at import time although SOLOv2 never calls into it, so `import
detectron2.modeling` would fail. :func:`install` (run by `import solov2_d2`) bridges that:

* only when `import detectron2._C` fails, it registers a stand-in module. Importing it works;
  using any of its ops raises :class:`MissingCompiledOpError`, which names the op, the feature
  that needs it and how to get the full build. The op that detectron2 calls through
  `torch.ops.detectron2` (`nms_rotated`) is registered to raise the same error. With a real `_C`
  nothing is touched.
* in that case COCO evaluation uses pycocotools' `COCOeval` in place of detectron2's C++
  `COCOeval_opt` (the same metrics, computed in Python).
* NumPy 1.24 removed the aliases `np.float`, `np.int`, `np.bool` and `np.object`, which
  `lvis` 0.5.3 (the latest release; LVIS evaluation) and detectron2 0.6's polygon rasterisation
  (empty polygon lists) still use. Those two modules, and only they, get a view of numpy that
  has the aliases (the builtins, as NumPy defined them); numpy itself is not changed.
* Pillow 10 removed `Image.LINEAR`, which detectron2 0.6 uses as a default argument at import
  time. Where it is missing it is defined as `Image.BILINEAR`, the filter it always named
  (Pillow < 10 defined LINEAR = BILINEAR). This keeps Pillow unpinned, so current Pillow releases
  (security fixes, wheels for new Pythons) work.

Import `solov2_d2` before other detectron2 modules when detectron2 may lack its compiled ops.
"""
import importlib
import importlib.machinery
import logging
import sys
import types

__all__ = ["MissingCompiledOpError", "install", "compiled_ops_available"]

logger = logging.getLogger(__name__)

_FULL_BUILD_HINT = (
    "This detectron2 was installed without its compiled ops (detectron2._C). Get the full build "
    "with a compiler (and CUDA for GPU ops) and internet access: "
    "DETECTRON2_PIP='git+https://github.com/facebookresearch/detectron2.git' "
    "bash tools/bootstrap.sh (see README, 'Using upstream detectron2')."
)

# The ops of detectron2 0.6's `_C` and the features that call them.
_OP_FEATURES = {
    "deform_conv_forward": "detectron2.layers.DeformConv (solov2_d2 uses its own DCN instead)",
    "deform_conv_backward_input": "detectron2.layers.DeformConv",
    "deform_conv_backward_filter": "detectron2.layers.DeformConv",
    "modulated_deform_conv_forward": "detectron2.layers.ModulatedDeformConv",
    "modulated_deform_conv_backward": "detectron2.layers.ModulatedDeformConv",
    "roi_align_rotated_forward": "detectron2.layers.ROIAlignRotated",
    "roi_align_rotated_backward": "detectron2.layers.ROIAlignRotated",
    "box_iou_rotated": "detectron2.layers.pairwise_iou_rotated (rotated boxes)",
    "nms_rotated": "detectron2.layers.nms_rotated (rotated boxes)",
    "InstanceAnnotation": "detectron2.evaluation.fast_eval_api.COCOeval_opt",
    "COCOevalEvaluateImages": "detectron2.evaluation.fast_eval_api.COCOeval_opt",
    "COCOevalAccumulate": "detectron2.evaluation.fast_eval_api.COCOeval_opt",
}


class MissingCompiledOpError(RuntimeError):
    """A detectron2 feature needs an op of `detectron2._C`, which this installation lacks."""


class _MissingCompiledOps(types.ModuleType):
    """Stand-in for `detectron2._C`: importable, every op raises :class:`MissingCompiledOpError`.

    It answers the build queries of `detectron2.utils.collect_env` (called by `default_setup`).
    """

    def __init__(self, import_error: str):
        super().__init__("detectron2._C", "Stand-in for detectron2's missing compiled ops.")
        self.__spec__ = importlib.machinery.ModuleSpec("detectron2._C", None)
        self.import_error = import_error

    @staticmethod
    def get_compiler_version() -> str:
        return "not built (detectron2 installed without compiled ops)"

    @staticmethod
    def get_cuda_version() -> str:
        return "not built (detectron2 installed without compiled ops)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        # Only reached for names the module does not define.
        if name.startswith("_"):
            raise AttributeError(name)
        feature = _OP_FEATURES.get(name, "a detectron2 feature")
        raise MissingCompiledOpError(
            f"detectron2._C.{name} is not available, so {feature} cannot run. "
            f"{_FULL_BUILD_HINT} (import error was: {self.import_error})"
        )


def compiled_ops_available() -> bool:
    """True when the real `detectron2._C` is imported (not the stand-in)."""
    module = sys.modules.get("detectron2._C")
    if module is None:
        try:
            module = importlib.import_module("detectron2._C")
        except ImportError:
            return False
    return not isinstance(module, _MissingCompiledOps)


def _define_pillow_linear() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _install_compiled_ops_stand_in() -> bool:
    """Register the stand-in when `detectron2._C` cannot be imported; return whether it did."""
    if isinstance(sys.modules.get("detectron2._C"), _MissingCompiledOps):
        return True
    try:
        importlib.import_module("detectron2._C")
        return False
    except ImportError as e:
        import detectron2

        stand_in = _MissingCompiledOps(str(e))
        sys.modules["detectron2._C"] = stand_in
        detectron2._C = stand_in
        logger.info("detectron2._C is missing: %s. Using solov2_d2's stand-in.", e)
        return True


# The schemas of the ops that the compiled extension registers with torch (`torch.ops.detectron2`).
_TORCH_OPS = {
    "nms_rotated": "nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor"
}
_torch_library = None  # kept alive: the registrations live as long as the Library object


def _register_missing_torch_ops() -> None:
    """Make `torch.ops.detectron2.<op>` raise MissingCompiledOpError instead of AttributeError."""
    global _torch_library
    if _torch_library is not None:
        return
    import torch

    _torch_library = torch.library.Library("detectron2", "DEF")
    for name, schema in _TORCH_OPS.items():

        def missing(*args, _name=name):
            return getattr(sys.modules["detectron2._C"], _name)

        _torch_library.define(schema)
        _torch_library.impl(name, missing, "CompositeExplicitAutograd")


def _use_pycocotools_evaluator() -> None:
    """Point COCOEvaluator's fast path at pycocotools, which gives the same metrics."""
    from pycocotools.cocoeval import COCOeval

    from detectron2.evaluation import coco_evaluation

    coco_evaluation.COCOeval_opt = COCOeval


_REMOVED_NUMPY_ALIASES = {"float": float, "int": int, "bool": bool, "object": object}
_MODULES_USING_NUMPY_ALIASES = ("lvis.eval", "detectron2.structures.masks")


class _NumpyWithAliases(types.ModuleType):
    """numpy, plus the aliases NumPy 1.24 removed, for modules written before that."""

    def __init__(self):
        super().__init__("numpy")
        self.__dict__.update(_REMOVED_NUMPY_ALIASES)

    def __getattr__(self, name: str):
        import numpy

        return getattr(numpy, name)


def _give_old_modules_numpy_aliases() -> None:
    import numpy

    if hasattr(numpy, "float"):
        return
    view = _NumpyWithAliases()
    for name in _MODULES_USING_NUMPY_ALIASES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "np", None) is numpy:
            module.np = view


def install() -> None:
    """Apply the bridges this environment needs (idempotent). See the module docstring."""
    _define_pillow_linear()
    if _install_compiled_ops_stand_in():
        _register_missing_torch_ops()
        _use_pycocotools_evaluator()
    _give_old_modules_numpy_aliases()
