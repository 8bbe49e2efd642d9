"""Modulated deformable convolution (DCNv2) on torchvision's op.

Detectron2's own ``ModulatedDeformConv`` needs its compiled extension; ``torchvision.ops``
ships the same op with autograd on CPU and CUDA, so SOLOv2's DCN variants run wherever torch does.
"""
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["ModulatedDeformConv2d"]


class ModulatedDeformConv2d(nn.Module):
    """
    Modulated deformable convolution (DCNv2, Zhu et al. 2019) that predicts its own offsets and
    masks. It takes the arguments of :class:`detectron2.layers.Conv2d` (plus ``deform_groups``)
    and can replace it.

    ``conv_offset``, a regular convolution of the input with this layer's kernel size, stride,
    padding and dilation, predicts ``deform_groups * 3 * kh * kw`` channels per output position,
    laid out as in mmcv's ``ModulatedDeformConv2dPack``, which all published SOLOv2 DCN
    checkpoints use: three equal chunks ``(o1, o2, m)``; the offsets are ``cat(o1, o2)``, read per
    deform group as ``(dy, dx)`` pairs in row-major tap order (the convention of mmcv's and
    torchvision's kernels), and the masks are ``sigmoid(m)``. So an mmcv checkpoint's
    ``conv.weight`` and ``conv.conv_offset.*`` load as ``weight`` and ``conv_offset.*`` unchanged.

    ``conv_offset`` starts at zero: an untrained layer is a plain convolution whose taps are all
    scaled by 0.5, as in mmcv and detectron2.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=True,
        norm=None,
        activation=None,
    ):
        """
        Args:
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
                as in :class:`torch.nn.Conv2d` (numeric padding only).
            deform_groups (int): number of channel groups of the input that get their own
                offsets and masks; must divide ``in_channels``.
            norm (nn.Module, optional): a normalization layer, applied after the convolution.
            activation (callable(Tensor) -> Tensor, optional): applied after ``norm``.
        """
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        if in_channels % deform_groups:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups

        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.norm = norm
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self):
        """
        Initialize ``weight`` and ``bias`` as :class:`torch.nn.Conv2d` does (callers may
        re-initialize them, e.g. with ``c2_msra_fill``), and ``conv_offset`` to zero.
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        # Zero offsets and logits: training starts from the regular sampling grid.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, in_channels, H, W).

        Returns:
            Tensor: (N, out_channels, H_out, W_out), the output size of a regular convolution.
        """
        # offset: (N, 2 * deform_groups * kh * kw, H_out, W_out);
        # mask: (N, deform_groups * kh * kw, H_out, W_out).
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        x = deform_conv2d(
            x,
            torch.cat((o1, o2), dim=1),
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask.sigmoid(),
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deform_groups={self.deform_groups}, "
            f"bias={self.bias is not None}"
        )
