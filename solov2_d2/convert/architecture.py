"""What a checkpoint fixes of the architecture, read off its tensors or off a config.

:class:`ResNetSpec` and :class:`HeadSpec` hold the config keys that shape parameters: each field
is the ``MODEL.RESNETS`` or ``MODEL.SOLOV2`` key of its name in upper case. The detectors read
them off a state dict in our names (after renaming), from shapes and names only: block counts per
stage give the depth, the 3x3 conv's weight gives the ResNeXt groups, ``conv_offset`` tensors give
the deformable layers, the first tower conv and the predictors give the head widths, E and the
number of categories. Everything that is not read here is still checked, name by name and shape
by shape, against the model built from the result
(:func:`solov2_d2.convert.mapping.fit_to_model`).
"""
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch

from detectron2.config import CfgNode

from .mapping import ConversionError

__all__ = ["HeadSpec", "ResNetSpec", "detect_heads", "detect_resnet"]

_STAGES = ("res2", "res3", "res4", "res5")


class _ConfigKeys:
    """Conversion between a spec's fields and the config keys of the same names."""

    @classmethod
    def from_cfg(cls, node: CfgNode):
        """The spec of `node`, ``cfg.MODEL.RESNETS`` or ``cfg.MODEL.SOLOV2``."""
        values = {f.name: node[f.name.upper()] for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def config(self) -> Dict[str, Any]:
        """The config keys and values, lists where yaml has lists."""
        values = dataclasses.asdict(self)
        return {k.upper(): list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class ResNetSpec(_ConfigKeys):
    """What the tensors of a ResNet/ResNeXt fix."""

    depth: int
    num_groups: int
    width_per_group: int
    res2_out_channels: int
    deform_on_per_stage: Tuple[bool, bool, bool, bool]
    deform_num_groups: int

    @property
    def layers(self) -> Tuple[int, int, int, int]:
        """The part that pretrained weights fix whatever the detector: depth and widths."""
        return (self.depth, self.num_groups, self.width_per_group, self.res2_out_channels)

    def describe_layers(self) -> str:
        """``ResNet-50``, ``ResNeXt-101 64x4d``, with unusual widths spelled out."""
        if self.num_groups > 1:
            text = f"ResNeXt-{self.depth} {self.num_groups}x{self.width_per_group}d"
        else:
            text = f"ResNet-{self.depth}"
            if self.width_per_group != 64:
                text += f" with bottleneck width {self.width_per_group}"
        if self.res2_out_channels != (64 if self.depth in (18, 34) else 256):
            text += f" with {self.res2_out_channels} res2 output channels"
        return text

    def describe_dcn(self) -> str:
        stages = [s for s, on in zip(_STAGES, self.deform_on_per_stage) if on]
        return f"deformable convs in {', '.join(stages)}" if stages else "no deformable convs"


@dataclass(frozen=True)
class HeadSpec(_ConfigKeys):
    """What the tensors of the two heads fix (``mask_dim`` is E)."""

    instance_channels: int
    num_instance_convs: int
    mask_channels: int
    mask_dim: int
    dynamic_kernel_size: int
    dcn_in_tower: str
    dcn_in_mask_branch: bool

    def describe_towers(self) -> str:
        return f"{self.num_instance_convs} tower convs of {self.instance_channels} channels"

    def describe_mask(self) -> str:
        text = f"E = {self.mask_dim}, from {self.mask_channels}-channel mask-branch convs"
        if self.dynamic_kernel_size != 1:
            text += f", {self.dynamic_kernel_size}x{self.dynamic_kernel_size} dynamic kernels"
        return text

    def describe_dcn(self) -> str:
        parts = {"none": [], "last": ["the last tower conv"], "all": ["all tower convs"]}[
            self.dcn_in_tower
        ]
        if self.dcn_in_mask_branch:
            parts.append("the mask branch")
        return f"deformable convs in {' and '.join(parts)}" if parts else "no deformable head convs"


_BOTTOM_UP = "backbone.bottom_up."
# (blocks in res2..res5, bottleneck blocks?) -> depth, as detectron2's ResNet builds them.
_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def _require(tensors: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name not in tensors:
        raise ConversionError(
            f"Cannot tell the {what}: the checkpoint has no tensor that maps to {name}."
        )
    return tensors[name]


def _deform_groups(offset_weight: torch.Tensor) -> int:
    """Deform groups of an offset conv: 3 (DCNv2) or 2 (DCNv1) channels per tap and group."""
    per_group = offset_weight.shape[0] // (offset_weight.shape[2] * offset_weight.shape[3])
    return per_group // 3 if per_group % 3 == 0 else per_group // 2


def detect_resnet(tensors: Mapping[str, torch.Tensor]) -> ResNetSpec:
    """The ResNet/ResNeXt of ``backbone.bottom_up.*``.

    Raises:
        ConversionError: no ResNet stages, or block counts of no standard depth.
    """
    blocks = {stage: set() for stage in range(2, 6)}
    for name in tensors:
        m = re.match(re.escape(_BOTTOM_UP) + r"res([2-5])\.(\d+)\.", name)
        if m:
            blocks[int(m[1])].add(int(m[2]))
    counts = tuple(max(b) + 1 if b else 0 for b in blocks.values())
    bottleneck = f"{_BOTTOM_UP}res2.0.conv3.weight" in tensors
    depth = _DEPTHS.get((counts, bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConversionError(
            f"Cannot tell the ResNet depth: the checkpoint has {list(counts)} {kind} blocks in "
            "stages res2..res5, which is no ResNet-18/34/50/101/152."
        )
    conv1 = _require(tensors, f"{_BOTTOM_UP}res2.0.conv1.weight", "ResNet width")
    conv2 = _require(tensors, f"{_BOTTOM_UP}res2.0.conv2.weight", "ResNet width")
    last = "conv3" if bottleneck else "conv2"
    res2_out = _require(tensors, f"{_BOTTOM_UP}res2.0.{last}.weight", "ResNet width").shape[0]
    if bottleneck:
        width = conv1.shape[0]
        num_groups = width // conv2.shape[1]
        width_per_group = width // num_groups
    else:
        num_groups, width_per_group = 1, 64

    deform, deform_groups = [], set()
    for stage in range(2, 6):
        offsets = [
            v
            for k, v in tensors.items()
            if k.startswith(f"{_BOTTOM_UP}res{stage}.") and k.endswith("conv_offset.weight")
        ]
        deform.append(bool(offsets))
        deform_groups.update(_deform_groups(w) for w in offsets)
    deform_num_groups = max(deform_groups, default=1)
    return ResNetSpec(
        depth, num_groups, width_per_group, res2_out, tuple(deform), deform_num_groups
    )


def _count(tensors: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of consecutive indices i from 0 for which `pattern.format(i)` is a name."""
    n = 0
    while pattern.format(n) in tensors:
        n += 1
    return n


def detect_heads(tensors: Mapping[str, torch.Tensor]) -> Tuple[HeadSpec, int]:
    """The kernel/category head and mask branch, and the number of categories.

    Raises:
        ConversionError: a tensor needed to tell a setting is missing, or the settings are ones
            our heads cannot have (towers of different depths, scattered deformable convs).
    """
    num_convs = _count(tensors, "ins_head.cate_tower.{}.weight")
    num_kernel_convs = _count(tensors, "ins_head.kernel_tower.{}.weight")
    if num_convs == 0 or num_convs != num_kernel_convs:
        raise ConversionError(
            f"Cannot tell the head depth: the checkpoint has {num_convs} category-tower and "
            f"{num_kernel_convs} kernel-tower convs; SOLOv2 needs the same number (at least 1)."
        )
    channels = tensors["ins_head.cate_tower.0.weight"].shape[0]
    num_classes = _require(tensors, "ins_head.cate_pred.weight", "number of categories").shape[0]
    mask_dim = _require(tensors, "mask_head.conv_pred.weight", "mask feature size E").shape[0]
    mask_channels = _require(
        tensors, "mask_head.level_convs.0.0.weight", "mask-branch width"
    ).shape[0]
    kernel_dim = _require(tensors, "ins_head.kernel_pred.weight", "dynamic kernel size").shape[0]
    kernel_size = math.isqrt(kernel_dim // mask_dim)
    if kernel_size * kernel_size * mask_dim != kernel_dim:
        raise ConversionError(
            f"The kernel predictor has {kernel_dim} outputs, which is not E * k * k for the mask "
            f"feature's E = {mask_dim} channels."
        )

    def deformable(tower):
        names = (f"ins_head.{tower}_tower.{i}.conv_offset.weight" for i in range(num_convs))
        return [name in tensors for name in names]

    cate, kernel = deformable("cate"), deformable("kernel")
    placements = {
        "none": [False] * num_convs,
        "last": [False] * (num_convs - 1) + [True],
        "all": [True] * num_convs,
    }
    dcn_in_tower = next((p for p, flags in placements.items() if flags == cate == kernel), None)
    if dcn_in_tower is None:
        raise ConversionError(
            f"Unsupported deformable tower convs: category tower {cate}, kernel tower {kernel} "
            "(per conv); supported are none, the last conv of both towers, or all convs."
        )
    dcn_in_mask_branch = any(
        k.startswith("mask_head.") and ".conv_offset." in k for k in tensors
    )
    heads = HeadSpec(
        channels, num_convs, mask_channels, mask_dim, kernel_size, dcn_in_tower, dcn_in_mask_branch
    )
    return heads, num_classes
