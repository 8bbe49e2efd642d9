"""The detectron2 compatibility bridge, with detectron2's compiled ops missing (as installed here)
and, in a subprocess, present."""
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from solov2_d2 import compat


def _without_compiled_ops(body: str) -> str:
    """Run `body` in a fresh process in which `detectron2._C` cannot be imported (whether or not
    this detectron2 has it) and `solov2_d2` is imported first; return its stdout."""
    script = "import sys\nsys.modules['detectron2._C'] = None\nimport solov2_d2\n"
    script += "from solov2_d2 import compat\n" + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compiled_ops_are_bridged_when_missing():
    out = _without_compiled_ops(
        """
        import importlib
        import detectron2
        assert detectron2._C is sys.modules["detectron2._C"]
        assert not compat.compiled_ops_available()
        # Every module that imports _C at import time imports.
        for name in (
            "detectron2.evaluation.fast_eval_api",
            "detectron2.layers.deform_conv",
            "detectron2.layers.rotated_boxes",
            "detectron2.layers.roi_align_rotated",
            "detectron2.modeling",
        ):
            importlib.import_module(name)
        print("bridged")
        """
    )
    assert out.strip() == "bridged"


def test_using_a_missing_op_says_which_and_how_to_get_it():
    out = _without_compiled_ops(
        """
        import torch
        from detectron2.layers import nms_rotated
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated
        calls = [
            lambda: nms_rotated(torch.zeros(1, 5), torch.zeros(1), 0.5),
            lambda: pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5)),
            lambda: sys.modules["detectron2._C"].deform_conv_forward,
        ]
        for call in calls:
            try:
                call()
            except compat.MissingCompiledOpError as e:
                print(str(e).replace("\\n", " "))
        """
    )
    messages = out.strip().splitlines()
    assert len(messages) == 3
    assert "nms_rotated" in messages[0] and "DETECTRON2_PIP" in messages[0]
    assert "box_iou_rotated" in messages[1] and "full build" in messages[1]
    assert "deform_conv_forward" in messages[2]


def test_coco_evaluation_falls_back_to_pycocotools():
    out = _without_compiled_ops(
        """
        from pycocotools.cocoeval import COCOeval
        from detectron2.evaluation import coco_evaluation
        print(coco_evaluation.COCOeval_opt is COCOeval)
        """
    )
    assert out.strip() == "True"


def test_collect_env_reports_the_missing_build():
    out = _without_compiled_ops(
        """
        from detectron2.utils.collect_env import collect_env_info
        print(collect_env_info())
        """
    )
    assert "not built (detectron2 installed without compiled ops)" in out


def test_pillow_linear_and_old_numpy_aliases():
    assert Image.LINEAR == Image.BILINEAR
    import lvis.eval

    from detectron2.structures import masks

    for module in (lvis.eval, masks):
        assert module.np.float is float and module.np.zeros is np.zeros
    assert not hasattr(np, "float")  # numpy itself untouched
    assert masks.polygons_to_bitmask([], 3, 4).shape == (3, 4)  # used np.bool


def test_install_is_idempotent():
    before = sys.modules["detectron2._C"]
    compat.install()
    assert sys.modules["detectron2._C"] is before


def test_a_real_compiled_extension_is_left_untouched():
    """With an importable detectron2._C (here a module put in its place before solov2_d2 is
    imported), the bridge changes nothing: no stand-in, detectron2's fast COCO evaluator."""
    script = textwrap.dedent(
        """
        import sys, types
        real = types.ModuleType("detectron2._C")
        sys.modules["detectron2._C"] = real
        import solov2_d2
        from solov2_d2 import compat
        from detectron2.evaluation import coco_evaluation, fast_eval_api
        import detectron2.modeling
        assert sys.modules["detectron2._C"] is real
        assert compat.compiled_ops_available()
        assert coco_evaluation.COCOeval_opt is fast_eval_api.COCOeval_opt
        print("untouched")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout


def test_import_leaves_detectron2_modeling_importable_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-c", "import solov2_d2, detectron2.modeling; print('ok')"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
