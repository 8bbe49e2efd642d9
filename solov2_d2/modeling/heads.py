"""The two SOLOv2 heads: kernel/category prediction per grid cell, and the unified mask feature."""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from ..layers.deform_conv import ModulatedDeformConv2d

__all__ = [
    "SOLOv2InstanceHead",
    "SOLOv2MaskHead",
    "coordinate_channels",
]


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """Normalised pixel coordinates for CoordConv.

    Args:
        x: [N, C, H, W]; only its shape, dtype and device are used.
    Returns:
        [N, 2, H, W] of x's dtype: channel 0 is x, channel 1 is y, both spanning [-1, 1]. This
        order is the one published checkpoints were trained with.
    """
    n, _, h, w = x.shape
    xs = _linspace_minus_one_to_one(w, x.dtype, x.device)
    ys = _linspace_minus_one_to_one(h, x.dtype, x.device)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return grid.unsqueeze(0).expand(n, 2, h, w)


def _linspace_minus_one_to_one(steps: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.linspace(-1, 1, steps)` from `arange`, which exports with a dynamic `steps` (the
    exporter makes linspace a constant of the traced size).

    It is linspace's own arithmetic (the first half from -1, the second from 1, fused
    multiply-adds): equal to it on the CPU in float32 and float64, within one rounding step in
    float16.
    """
    index = torch.arange(steps, dtype=dtype, device=device)
    last = index[-1:].clamp(min=1)  # steps - 1; 1 for a single step, which gives [-1]
    step = 2 / last
    from_start = torch.addcmul(torch.full_like(index, -1), step, index)
    from_end = torch.addcmul(torch.ones_like(index), step, index - last)
    return torch.where(index < last / 2, from_start, from_end)


def _conv_norm_relu(in_channels, out_channels, kernel_size, norm, deformable):
    """A conv + norm + ReLU block, deformable (DCNv2) on request; no bias when normalised."""
    conv_type = ModulatedDeformConv2d if deformable else Conv2d
    return conv_type(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )


def _common_channels(input_shape: List[ShapeSpec], key: str, solov2_cfg) -> int:
    """The channel count shared by all input features of a head (its convs are shared)."""
    channels = {s.channels for s in input_shape}
    if len(channels) != 1:
        raise ValueError(
            f"MODEL.SOLOV2.{key} {list(solov2_cfg[key])} have different channel counts "
            f"{sorted(channels)}; the head needs one."
        )
    return channels.pop()


def _init_normal(module: nn.Module, std: float = 0.01) -> None:
    """Normal(0, std) weights and zero biases for the convolutions (not the DCN offset convs,
    which stay zero so that training starts from a regular sampling grid)."""
    for name, m in module.named_modules():
        if name.endswith("conv_offset"):
            continue
        if isinstance(m, (nn.Conv2d, ModulatedDeformConv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SOLOv2InstanceHead(nn.Module):
    """Category scores and dynamic mask kernels for every cell of every level's S x S grid.

    The towers are shared across levels. The kernel tower sees two extra coordinate channels
    (CoordConv); the category tower sees the plain feature resized to the same grid.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_grids: List[int],
        channels: int = 512,
        num_convs: int = 4,
        kernel_dim: int = 256,
        norm: str = "GN",
        use_coord_conv: bool = True,
        prior_prob: float = 0.01,
        dcn_in_tower: str = "none",
    ):
        """
        Args:
            in_channels: channels of the input features (FPN output).
            num_classes: number of categories (no background class).
            num_grids: S for each level.
            channels, num_convs, norm: width, depth and norm of each tower.
            kernel_dim: weights per dynamic kernel, E * k * k.
            use_coord_conv: append normalised coordinates to the kernel tower's input.
            prior_prob: initial foreground probability of the category output.
            dcn_in_tower: "none", "last" or "all": which tower convs are deformable.
        """
        super().__init__()
        self.num_grids = list(num_grids)
        self.use_coord_conv = use_coord_conv
        cate_convs, kernel_convs = [], []
        for i in range(num_convs):
            deformable = dcn_in_tower == "all" or (dcn_in_tower == "last" and i == num_convs - 1)
            cate_in = in_channels if i == 0 else channels
            kernel_in = cate_in + (2 if use_coord_conv and i == 0 else 0)
            cate_convs.append(_conv_norm_relu(cate_in, channels, 3, norm, deformable))
            kernel_convs.append(_conv_norm_relu(kernel_in, channels, 3, norm, deformable))
        self.cate_tower = nn.Sequential(*cate_convs)
        self.kernel_tower = nn.Sequential(*kernel_convs)
        self.cate_pred = Conv2d(channels, num_classes, kernel_size=3, padding=1)
        self.kernel_pred = Conv2d(channels, kernel_dim, kernel_size=3, padding=1)

        _init_normal(self)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        c = cfg.MODEL.SOLOV2
        return {
            "in_channels": _common_channels(input_shape, "INSTANCE_IN_FEATURES", c),
            "num_classes": c.NUM_CLASSES,
            "num_grids": c.NUM_GRIDS,
            "channels": c.INSTANCE_CHANNELS,
            "num_convs": c.NUM_INSTANCE_CONVS,
            "kernel_dim": c.MASK_DIM * c.DYNAMIC_KERNEL_SIZE**2,
            "norm": c.NORM,
            "use_coord_conv": c.USE_COORD_CONV,
            "prior_prob": c.PRIOR_PROB,
            "dcn_in_tower": c.DCN_IN_TOWER,
        }

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: one [N, C, H_l, W_l] map per level, already at the level's stride.
        Returns:
            cate_logits: per level [N, num_classes, S_l, S_l], before sigmoid.
            kernels: per level [N, kernel_dim, S_l, S_l].
        """
        cate_logits, kernels = [], []
        for feature, grid in zip(features, self.num_grids):
            kernel_feat = feature
            if self.use_coord_conv:
                kernel_feat = torch.cat([feature, coordinate_channels(feature)], dim=1)
            # Resizing after the concatenation keeps the coordinates exactly on the grid's cells.
            kernel_feat = F.interpolate(
                kernel_feat, size=(grid, grid), mode="bilinear", align_corners=False
            )
            cate_feat = kernel_feat[:, : feature.shape[1]]
            kernels.append(self.kernel_pred(self.kernel_tower(kernel_feat)))
            cate_logits.append(self.cate_pred(self.cate_tower(cate_feat)))
        return cate_logits, kernels


class SOLOv2MaskHead(nn.Module):
    """The unified mask feature F: FPN levels brought to the finest stride and summed.

    Level l (0 = finest) goes through l stages of conv + norm + ReLU + 2x bilinear upsampling
    (level 0: one conv, no upsampling); the deepest level gets coordinate channels first. The sum
    is projected to `mask_dim` (E) channels by a 1x1 conv + norm + ReLU.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        channels: int = 128,
        mask_dim: int = 256,
        norm: str = "GN",
        use_coord_conv: bool = True,
        deformable: bool = False,
    ):
        """
        Args:
            in_channels: channels of the input features.
            num_levels: number of input levels, finest first.
            channels: width of the per-level convs.
            mask_dim: E, channels of the output mask feature.
            norm: norm of every conv.
            use_coord_conv: append coordinates to the deepest level's input.
            deformable: use DCNv2 for every conv of the branch.
        """
        super().__init__()
        self.use_coord_conv = use_coord_conv
        self.level_convs = nn.ModuleList()
        for level in range(num_levels):
            convs = []
            for j in range(max(level, 1)):
                conv_in = in_channels if j == 0 else channels
                if j == 0 and level == num_levels - 1 and use_coord_conv:
                    conv_in += 2
                convs.append(_conv_norm_relu(conv_in, channels, 3, norm, deformable))
            self.level_convs.append(nn.Sequential(*convs))
        self.conv_pred = _conv_norm_relu(channels, mask_dim, 1, norm, deformable)
        _init_normal(self)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        c = cfg.MODEL.SOLOV2
        return {
            "in_channels": _common_channels(input_shape, "MASK_IN_FEATURES", c),
            "num_levels": len(input_shape),
            "channels": c.MASK_CHANNELS,
            "mask_dim": c.MASK_DIM,
            "norm": c.NORM,
            "use_coord_conv": c.USE_COORD_CONV,
            "deformable": c.DCN_IN_MASK_BRANCH,
        }

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: [N, C, H_l, W_l] per level, finest first, each level half the previous size.
        Returns:
            [N, mask_dim, H_0, W_0], the mask feature at the finest level's stride.
        """
        total = None
        last = len(features) - 1
        for level, (x, convs) in enumerate(zip(features, self.level_convs)):
            if level == last and self.use_coord_conv:
                x = torch.cat([x, coordinate_channels(x)], dim=1)
            for conv in convs:
                x = conv(x)
                if level > 0:
                    x = F.interpolate(
                        x, scale_factor=2.0, mode="bilinear", align_corners=False
                    )
            # Out of place: an in-place sum into a tensor autograd saved breaks backward.
            total = x if total is None else total + x
        return self.conv_pred(total)
