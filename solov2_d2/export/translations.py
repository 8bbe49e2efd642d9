"""ONNX translations of the operators that torch's exporter (``torch.onnx.export(...,
dynamo=True)``) cannot translate by itself, for its ``custom_translation_table``.

- ``torchvision::deform_conv2d``, which :class:`~solov2_d2.layers.ModulatedDeformConv2d` calls
  (the DCN configs), becomes ONNX's standard ``DeformConv`` (opset 19 and later), which ONNX
  Runtime runs on the CPU: no custom operator library is needed.
- ``aten::sort.stable`` becomes ``TopK`` (see :func:`sort_stable`).

The offsets agree without reordering: torchvision reads its offset input
``[N, 2 * offset_groups * kh * kw, H_out, W_out]`` as, per offset group, per kernel tap in
row-major order, a ``(dy, dx)`` pair; ONNX's ``DeformConv`` documents the same layout
(``offset_group * kH * kW * 2`` channels, the offsets along the height then the width axis),
and its mask input ``[N, offset_groups * kh * kw, H_out, W_out]`` is torchvision's mask.
"""
from typing import Dict

import torch

__all__ = ["DEFORM_CONV_OPSET", "custom_translation_table"]

# The first opset with DeformConv.
DEFORM_CONV_OPSET = 19


def custom_translation_table() -> Dict[object, object]:
    """The translations for ``torch.onnx.export(..., custom_translation_table=...)``: aten or
    torchvision overloads -> onnxscript functions. Needs onnxscript (and torchvision's ops
    registered, which importing torchvision does)."""
    from onnxscript import opset19 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort

    def sort_stable(self, stable=None, dim=-1, descending=False):
        # ONNX TopK, which aten_sort emits, breaks ties by the lower index: a stable sort.
        return aten_sort(self, dim, descending)

    def deform_conv2d(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
        groups: int,
        offset_groups: int,
        use_mask: bool,
    ):
        """torchvision.ops.deform_conv2d's operator (``torchvision::deform_conv2d``):
        input float [N, C, H, W], weight [O, C / groups, kh, kw], offset
        [N, 2 * offset_groups * kh * kw, H_out, W_out], mask [N, offset_groups * kh * kw, H_out,
        W_out] (ignored unless use_mask: torchvision passes zeros then), bias [O] (zeros when the
        layer has none) -> [N, O, H_out, W_out]."""
        inputs = (input, weight, offset, bias, mask) if use_mask else (input, weight, offset, bias)
        return op.DeformConv(
            *inputs,
            dilations=[dilation_h, dilation_w],
            group=groups,
            offset_group=offset_groups,
            pads=[pad_h, pad_w, pad_h, pad_w],
            strides=[stride_h, stride_w],
        )

    table = {torch.ops.aten.sort.stable: sort_stable}
    # Registered by importing torchvision (solov2_d2.layers does).
    import torchvision  # noqa: F401

    table[torch.ops.torchvision.deform_conv2d.default] = deform_conv2d
    return table
