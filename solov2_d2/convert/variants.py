"""The published SOLOv2 variants, read from the repository's config files, and matching them.

A variant is a config of the model zoo, ``configs/SOLOv2_*.yaml`` or
``configs/LVIS/SOLOv2_*.yaml``, named by its path under ``configs/`` without ``.yaml``; what its
checkpoints must look like is what the config builds. (``configs/fruit/`` trains from scratch:
no published checkpoint.)
"""
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from detectron2.config import CfgNode, get_cfg

from ..config import add_solov2_config
from .architecture import HeadSpec, ResNetSpec
from .mapping import ConversionError

__all__ = [
    "BASE_CONFIG",
    "CONFIGS_DIR",
    "COCO_CLASSES",
    "LVIS_CLASSES",
    "Variant",
    "choose_variant",
    "find_variant",
    "load_config",
    "mismatches",
    "published_variants",
]

# The repository's configs folder, beside the package.
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
BASE_CONFIG = "Base-SOLOv2.yaml"
_ZOO = ("SOLOv2_*.yaml", "LVIS/SOLOv2_*.yaml")

COCO_CLASSES = 80
# LVIS v0.5 (the paper's results) and v1 have different category sets.
LVIS_CLASSES = {1230: "lvis_v0.5", 1203: "lvis_v1"}


def _configs_dir() -> Path:
    if not CONFIGS_DIR.is_dir():
        raise ConversionError(
            f"The converter reads the model variants from the repository's configs/, expected "
            f"at {CONFIGS_DIR}, which does not exist: run it from a clone of the repository "
            "(pip install -e . keeps the package there)."
        )
    return CONFIGS_DIR


def load_config(name: str) -> CfgNode:
    """The config file `name` under ``configs/`` on SOLOv2's defaults.

    Raises:
        ConversionError: the repository's ``configs/`` folder is not beside the package.
    """
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(_configs_dir() / name))
    return cfg


@dataclass(frozen=True)
class Variant:
    """A published SOLOv2 variant.

    Attributes:
        name: its config file under ``configs/``, without ``.yaml``.
        resnet, heads: what its checkpoints look like.
        class_counts: category counts it is trained with (COCO: 80; LVIS: v0.5 or v1).
        scale_ranges: its MODEL.SOLOV2.SCALE_RANGES, which its heads were trained with.
    """

    name: str
    resnet: ResNetSpec
    heads: HeadSpec
    class_counts: Tuple[int, ...]
    scale_ranges: Tuple[Tuple[int, int], ...]

    @property
    def config_file(self) -> str:
        return f"{self.name}.yaml"

    @property
    def is_lvis(self) -> bool:
        return self.class_counts == tuple(LVIS_CLASSES)


@functools.lru_cache(maxsize=None)
def published_variants() -> Tuple[Variant, ...]:
    """The variants, in order of preference when several fit a checkpoint: COCO before LVIS,
    plain backbones before deformable ones (ImageNet weights have no offsets), the longest
    schedule (R50 1x and 3x checkpoints look alike), the widest heads."""
    found, configs = [], _configs_dir()
    for path in sorted(p for pattern in _ZOO for p in configs.glob(pattern)):
        name = path.relative_to(configs).with_suffix("").as_posix()
        cfg = load_config(f"{name}.yaml")
        lvis = cfg.DATASETS.TRAIN[0].startswith("lvis")
        variant = Variant(
            name,
            ResNetSpec.from_cfg(cfg.MODEL.RESNETS),
            HeadSpec.from_cfg(cfg.MODEL.SOLOV2),
            tuple(LVIS_CLASSES) if lvis else (cfg.MODEL.SOLOV2.NUM_CLASSES,),
            tuple(tuple(r) for r in cfg.MODEL.SOLOV2.SCALE_RANGES),
        )
        preference = (
            lvis,
            any(variant.resnet.deform_on_per_stage),
            -cfg.SOLVER.MAX_ITER,
            -variant.heads.instance_channels,
        )
        found.append((preference, variant))
    return tuple(v for _, v in sorted(found, key=lambda pair: pair[0]))


def find_variant(name: str) -> Variant:
    """The variant of a config name: ``SOLOv2_R50_3x``, with or without ``.yaml``, or a path to
    the config file (``configs/LVIS/SOLOv2_R50_3x.yaml``)."""
    key = name.replace("\\", "/")
    if key.endswith(".yaml"):
        key = key[: -len(".yaml")]
    # The longest name that fits wins: "configs/LVIS/SOLOv2_R50_3x" is the LVIS variant.
    fits = [v for v in published_variants() if key == v.name or key.endswith("/" + v.name)]
    if fits:
        return max(fits, key=lambda v: len(v.name))
    known = ", ".join(v.name for v in published_variants())
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
    want_resnet, want, config = variant.resnet, variant.heads, f"config {variant.name} expects"
    out = []
    if resnet.layers != want_resnet.layers:
        out.append(
            f"checkpoint has a {resnet.describe_layers()} backbone; "
            f"{config} {want_resnet.describe_layers()}"
        )
    if heads is None:
        return out
    if resnet.deform_on_per_stage != want_resnet.deform_on_per_stage:
        out.append(
            f"checkpoint has {resnet.describe_dcn()} of the backbone; "
            f"{config} {want_resnet.describe_dcn()}"
        )
    if resnet.deform_num_groups != want_resnet.deform_num_groups:
        out.append(
            f"checkpoint has {resnet.deform_num_groups} deformable groups; "
            f"{config} {want_resnet.deform_num_groups}"
        )
    if heads.describe_towers() != want.describe_towers():
        out.append(
            f"checkpoint has {heads.describe_towers()}; "
            f"{config} {want.num_instance_convs} of {want.instance_channels}"
        )
    for describe in (HeadSpec.describe_mask, HeadSpec.describe_dcn):
        if describe(heads) != describe(want):
            out.append(f"checkpoint has {describe(heads)}; {config} {describe(want)}")
    if num_classes not in variant.class_counts:
        counts = " or ".join(str(c) for c in variant.class_counts)
        out.append(f"checkpoint has {num_classes} categories; {config} {counts}")
    return out


def choose_variant(
    resnet: ResNetSpec, heads: Optional[HeadSpec], num_classes: Optional[int]
) -> Optional[Variant]:
    """The preferred variant a checkpoint fits, or None.

    A full model fits a variant when nothing but, possibly, the number of categories differs,
    and that number is not one of another dataset's (a COCO model fine-tuned on custom data
    still runs with its COCO variant's config; an LVIS count picks the LVIS config). A backbone
    alone fits the variants of its depth and widths.
    """
    for variant in published_variants():
        if not mismatches(resnet, heads, num_classes, variant):
            return variant
    if heads is None or num_classes in LVIS_CLASSES:
        return None
    for variant in published_variants():
        if COCO_CLASSES in variant.class_counts and not mismatches(
            resnet, heads, COCO_CLASSES, variant
        ):
            return variant
    return None
