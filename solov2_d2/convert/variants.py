"""The published SOLOv2 variants, described by what their tensors show, and matching them.

Each :class:`Variant` is named after its config file under ``configs/`` and describes what a
checkpoint of that variant must look like: the ResNet (depth, ResNeXt groups, deformable stages)
and the heads (tower width and depth, mask-feature channels, E, deformable head convs). These
descriptions stand on their own: nothing here reads the config files, which need not exist when
converting.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .mapping import ConversionError

__all__ = [
    "COCO_CLASSES",
    "HeadSpec",
    "LVIS_CLASSES",
    "ResNetSpec",
    "STANDARD_HEADS",
    "VARIANTS",
    "Variant",
    "choose_variant",
    "find_variant",
    "mismatches",
]

COCO_CLASSES = 80
# LVIS v0.5 (the paper's results) and v1 have different category sets.
LVIS_CLASSES = {1230: "lvis_v0.5", 1203: "lvis_v1"}

_STAGES = ("res2", "res3", "res4", "res5")
NO_DCN = (False, False, False, False)
DCN_RES3_TO_RES5 = (False, True, True, True)


@dataclass(frozen=True)
class ResNetSpec:
    """What the tensors of a ResNet/ResNeXt fix (each field's ``MODEL.RESNETS`` key in its
    comment)."""

    depth: int  # DEPTH
    num_groups: int = 1  # NUM_GROUPS
    width_per_group: int = 64  # WIDTH_PER_GROUP
    res2_out_channels: int = 256  # RES2_OUT_CHANNELS (64 for ResNet-18/34)
    deform_on_per_stage: Tuple[bool, bool, bool, bool] = NO_DCN  # DEFORM_ON_PER_STAGE
    deform_num_groups: int = 1  # DEFORM_NUM_GROUPS

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
class HeadSpec:
    """What the tensors of the two heads fix (each field's ``MODEL.SOLOV2`` key in its
    comment)."""

    instance_channels: int = 512  # INSTANCE_CHANNELS
    num_instance_convs: int = 4  # NUM_INSTANCE_CONVS
    mask_channels: int = 128  # MASK_CHANNELS
    mask_dim: int = 256  # MASK_DIM (E)
    dynamic_kernel_size: int = 1  # DYNAMIC_KERNEL_SIZE
    dcn_in_tower: str = "none"  # DCN_IN_TOWER: "none", "last" or "all"
    dcn_in_mask_branch: bool = False  # DCN_IN_MASK_BRANCH

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


STANDARD_HEADS = HeadSpec()
LIGHT_HEADS = HeadSpec(instance_channels=256, num_instance_convs=2, mask_dim=128)
# Scale ranges of the light models, for their smaller inputs (448 or 512 short side).
LIGHT_448_SCALE_RANGES = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
LIGHT_512_SCALE_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))


@dataclass(frozen=True)
class Variant:
    """A published SOLOv2 variant.

    Attributes:
        name: its config file under ``configs/``, without ``.yaml``.
        resnet, heads: what its checkpoints look like.
        class_counts: category counts it is trained with (COCO: 80; LVIS: v0.5 or v1).
        scale_ranges: its MODEL.SOLOV2.SCALE_RANGES when not the default.
    """

    name: str
    resnet: ResNetSpec
    heads: HeadSpec
    class_counts: Tuple[int, ...] = (COCO_CLASSES,)
    scale_ranges: Optional[Tuple[Tuple[int, int], ...]] = None

    @property
    def config_file(self) -> str:
        return f"{self.name}.yaml"


_R50 = ResNetSpec(50)
_R101 = ResNetSpec(101)
_R50_DCN = ResNetSpec(50, deform_on_per_stage=DCN_RES3_TO_RES5)
_R101_DCN = ResNetSpec(101, deform_on_per_stage=DCN_RES3_TO_RES5)
_X101_DCN = ResNetSpec(101, 64, 4, deform_on_per_stage=DCN_RES3_TO_RES5)
_DCN_HEADS = HeadSpec(dcn_in_tower="all", dcn_in_mask_branch=True)
_LVIS = tuple(LVIS_CLASSES)

# In order of preference when several variants fit a checkpoint: R50 1x and 3x checkpoints look
# alike, and 3x is the better config to run and fine-tune them with.
VARIANTS = (
    Variant("SOLOv2_R50_3x", _R50, STANDARD_HEADS),
    Variant("SOLOv2_R50_1x", _R50, STANDARD_HEADS),
    Variant("SOLOv2_R101_3x", _R101, STANDARD_HEADS),
    Variant("SOLOv2_R101_DCN_3x", _R101_DCN, _DCN_HEADS),
    Variant("SOLOv2_X101_DCN_3x", _X101_DCN, _DCN_HEADS),
    Variant(
        "SOLOv2_Light_448_R18_3x",
        ResNetSpec(18, res2_out_channels=64),
        LIGHT_HEADS,
        scale_ranges=LIGHT_448_SCALE_RANGES,
    ),
    Variant(
        "SOLOv2_Light_448_R34_3x",
        ResNetSpec(34, res2_out_channels=64),
        LIGHT_HEADS,
        scale_ranges=LIGHT_448_SCALE_RANGES,
    ),
    Variant("SOLOv2_Light_448_R50_3x", _R50, LIGHT_HEADS, scale_ranges=LIGHT_448_SCALE_RANGES),
    Variant(
        "SOLOv2_Light_512_R50_DCN_3x",
        _R50_DCN,
        HeadSpec(instance_channels=256, num_instance_convs=3, mask_dim=128, dcn_in_tower="last"),
        scale_ranges=LIGHT_512_SCALE_RANGES,
    ),
    Variant("LVIS/SOLOv2_R50_3x", _R50, STANDARD_HEADS, class_counts=_LVIS),
    Variant("LVIS/SOLOv2_R101_3x", _R101, STANDARD_HEADS, class_counts=_LVIS),
)


def find_variant(name: str) -> Variant:
    """The variant of a config name: ``SOLOv2_R50_3x``, with or without ``.yaml``, or a path to
    the config file (``configs/LVIS/SOLOv2_R50_3x.yaml``)."""
    key = name.replace("\\", "/")
    if key.endswith(".yaml"):
        key = key[: -len(".yaml")]
    # The longest name that fits wins: "configs/LVIS/SOLOv2_R50_3x" is the LVIS variant.
    fits = [v for v in VARIANTS if key == v.name or key.endswith("/" + v.name)]
    if fits:
        return max(fits, key=lambda v: len(v.name))
    known = ", ".join(v.name for v in VARIANTS)
    raise ConversionError(f"Unknown config {name!r}. Known configs: {known}.")


def mismatches(
    resnet: ResNetSpec,
    heads: Optional[HeadSpec],
    num_classes: Optional[int],
    variant: Variant,
) -> List[str]:
    """How a checkpoint differs from `variant`, one phrase per difference.

    Args:
        resnet, heads, num_classes: what the checkpoint shows; `heads` and `num_classes` are None
            for a backbone alone, which is then compared on depth and widths only (an ImageNet
            ResNet can start any variant of its depth: deformable convs start as plain ones).
    """
    name = variant.name
    out = []
    if resnet.layers != variant.resnet.layers:
        out.append(
            f"checkpoint has a {resnet.describe_layers()} backbone; "
            f"config {name} expects {variant.resnet.describe_layers()}"
        )
    if heads is None:
        return out
    if resnet.deform_on_per_stage != variant.resnet.deform_on_per_stage:
        out.append(
            f"checkpoint has {resnet.describe_dcn()} of the backbone; "
            f"config {name} expects {variant.resnet.describe_dcn()}"
        )
    if resnet.deform_num_groups != variant.resnet.deform_num_groups:
        out.append(
            f"checkpoint has {resnet.deform_num_groups} deformable groups; "
            f"config {name} expects {variant.resnet.deform_num_groups}"
        )
    want = variant.heads
    if (heads.num_instance_convs, heads.instance_channels) != (
        want.num_instance_convs,
        want.instance_channels,
    ):
        out.append(
            f"checkpoint has {heads.describe_towers()}; config {name} expects "
            f"{want.num_instance_convs} of {want.instance_channels}"
        )
    if (heads.mask_dim, heads.mask_channels, heads.dynamic_kernel_size) != (
        want.mask_dim,
        want.mask_channels,
        want.dynamic_kernel_size,
    ):
        out.append(
            f"checkpoint has {heads.describe_mask()}; config {name} expects {want.describe_mask()}"
        )
    if (heads.dcn_in_tower, heads.dcn_in_mask_branch) != (
        want.dcn_in_tower,
        want.dcn_in_mask_branch,
    ):
        out.append(
            f"checkpoint has {heads.describe_dcn()}; config {name} expects {want.describe_dcn()}"
        )
    if num_classes not in variant.class_counts:
        counts = " or ".join(str(c) for c in variant.class_counts)
        out.append(f"checkpoint has {num_classes} categories; config {name} expects {counts}")
    return out


def choose_variant(
    resnet: ResNetSpec, heads: Optional[HeadSpec], num_classes: Optional[int]
) -> Optional[Variant]:
    """The preferred variant a checkpoint fits, or None.

    A full model fits a variant when nothing but, possibly, the number of categories differs,
    and that number is not one of another dataset's (a COCO model fine-tuned on custom data
    still runs with its COCO variant's config; an LVIS count picks the LVIS config). A backbone
    alone fits the variants of its depth and widths; one without deformable convs is preferred.
    """
    if heads is None:
        fits = [v for v in VARIANTS if not mismatches(resnet, None, None, v)]
        fits.sort(key=lambda v: any(v.resnet.deform_on_per_stage))
        return fits[0] if fits else None
    for variant in VARIANTS:
        if not mismatches(resnet, heads, num_classes, variant):
            return variant
    if num_classes in LVIS_CLASSES:
        return None
    for variant in VARIANTS:
        if COCO_CLASSES in variant.class_counts and not mismatches(
            resnet, heads, COCO_CLASSES, variant
        ):
            return variant
    return None
