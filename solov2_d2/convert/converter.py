"""Converting a foreign SOLOv2 (or ImageNet ResNet) checkpoint into a Detectron2 one for ours."""
import collections
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from .architecture import HeadSpec, ResNetSpec, detect_heads, detect_resnet
from .checkpoint_io import load_state_dict, save_detectron2_checkpoint
from .mapping import ConversionError, Renamed, fit_to_model, rename
from .overrides import config_overrides, model_cfg, overrides_yaml, target_shapes
from .sources import SOURCES, Source, guess_source, solov2_d2_names
from .variants import (
    BASE_CONFIG,
    COCO_CLASSES,
    CONFIGS_DIR,
    Variant,
    choose_variant,
    find_variant,
    load_config,
    mismatches,
)

__all__ = ["ConversionResult", "convert_checkpoint", "convert_state_dict", "summary"]


@dataclass
class ConversionResult:
    """A converted checkpoint and what it needs to run.

    Attributes:
        state_dict: our parameter names -> tensors, ready to save.
        source: the checkpoint family it came from.
        variant: the published variant it is, or None when it fits none (then the config is
            built on Base-SOLOv2.yaml, with the same overrides).
        overrides: config keys the weights need (nested, yaml layout), without MODEL.WEIGHTS.
        description: the architecture of the model the weights are for, in words.
        notes: adaptations made on the way and things the user should know.
        dropped: source names dropped on purpose -> why.
        left_at_init: target names the source does not provide (backbone-only conversion).
        config_path: the config file written next to the weights (file conversions only).
    """

    state_dict: Dict[str, torch.Tensor]
    source: Source
    variant: Optional[Variant]
    overrides: Dict[str, Any]
    description: str
    notes: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    left_at_init: List[str] = field(default_factory=list)
    config_path: Optional[str] = None

    @property
    def base_config(self) -> str:
        """The config file, relative to ``configs/``, to use as ``_BASE_``."""
        return self.variant.config_file if self.variant else BASE_CONFIG


def _refuse_converted(names: List[str], what: str):
    """Raise ConversionError when `names` are already this project's (see solov2_d2_names)."""
    ours = solov2_d2_names(names)
    if ours:
        raise ConversionError(
            f"{what} is already a solov2_d2 checkpoint (its tensors have this project's SOLOv2 "
            f"names, e.g. {', '.join(ours[:2])}): there is nothing to convert. Use it as it is, "
            "MODEL.WEIGHTS with the config it was trained or converted with."
        )


def _resolve_source(names: List[str], source: Optional[str]) -> Source:
    if source is None:
        source = guess_source(names)
        if source is None:
            raise ConversionError(
                "Cannot tell which code base wrote this checkpoint from its names; pass "
                f"--from ({', '.join(SOURCES)})."
            )
    if source not in SOURCES:
        raise ConversionError(f"Unknown source {source!r}; expected one of {', '.join(SOURCES)}.")
    return SOURCES[source]


def _rename(state_dict: Mapping[str, torch.Tensor], src: Source) -> Renamed:
    """Rename by `src`'s rules; when names are unknown, say which family they look like."""
    try:
        renamed = rename(state_dict, src.rules, src.drop_rules, src.label)
    except ConversionError as e:
        guess = guess_source(state_dict)
        if guess is not None and guess != src.name:
            raise ConversionError(
                f"{e}\nThe names look like a {SOURCES[guess].label} checkpoint: "
                f"try --from {guess}."
            ) from None
        raise
    return renamed


def _requested_variant(
    config: str, resnet: ResNetSpec, heads: Optional[HeadSpec], num_classes: Optional[int]
) -> Variant:
    """The variant of `config`, if the checkpoint matches it."""
    variant = find_variant(config)
    problems = mismatches(resnet, heads, num_classes, variant)
    if problems:
        fitting = choose_variant(resnet, heads, num_classes)
        hint = ""
        if fitting is not None:
            hint = f"\nThe checkpoint fits {fitting.name}; leave out --config to use it."
        raise ConversionError(
            f"The checkpoint does not match config {variant.name}:\n  "
            + "\n  ".join(problems)
            + hint
        )
    return variant


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: Optional[str] = None,
    config: Optional[str] = None,
) -> ConversionResult:
    """Convert a state dict in a foreign naming into ours.

    Args:
        state_dict: the tensors of the checkpoint.
        source: "solo", "mmdet", "adelaidet" or "torchvision"; guessed from the names if None.
        config: a variant's config name (``SOLOv2_R50_3x``); detected from the tensors if None.
    Returns:
        The converted tensors with the config overrides they need. For "torchvision" only
        ``backbone.bottom_up.*`` is converted; the rest of the model keeps its initialisation.
    Raises:
        ConversionError: naming every tensor that cannot be mapped, is missing or has the wrong
            shape, or every way the checkpoint differs from the requested config; or saying
            that the checkpoint is already in this project's format.
    """
    _refuse_converted(list(state_dict), "The checkpoint")
    src = _resolve_source(list(state_dict), source)
    renamed = _rename(state_dict, src)
    notes = src.adjust(renamed) if src.adjust else []

    resnet = detect_resnet(renamed.tensors)
    heads, num_classes = (None, None) if src.backbone_only else detect_heads(renamed.tensors)
    if config is not None:
        variant = _requested_variant(config, resnet, heads, num_classes)
    else:
        variant = choose_variant(resnet, heads, num_classes)

    if src.backbone_only:
        # ImageNet weights start a variant: its heads, its deformable stages (offsets at zero).
        if variant is not None:
            resnet = dataclasses.replace(
                resnet,
                deform_on_per_stage=variant.resnet.deform_on_per_stage,
                deform_num_groups=variant.resnet.deform_num_groups,
            )
            heads, num_classes = variant.heads, variant.class_counts[0]
        else:
            heads = HeadSpec.from_cfg(load_config(BASE_CONFIG).MODEL.SOLOV2)
            num_classes = COCO_CLASSES
        description = f"{resnet.describe_layers()} backbone with {resnet.describe_dcn()}"
    else:
        description = (
            f"{resnet.describe_layers()} backbone with {resnet.describe_dcn()}; "
            f"{heads.describe_towers()}; {heads.describe_mask()}; {heads.describe_dcn()}; "
            f"{num_classes} categories"
        )

    overrides = config_overrides(resnet, heads, num_classes, src.input_style, variant)

    def may_stay_missing(name):
        # ImageNet weights cover the ResNet's convs and norms only.
        return src.backbone_only and (
            not name.startswith("backbone.bottom_up.") or ".conv_offset." in name
        )

    tensors, fit_notes, left_at_init = fit_to_model(
        renamed, target_shapes(model_cfg(overrides)), may_stay_missing
    )
    notes += fit_notes
    if variant is None:
        notes.append(
            f"No published config fits this architecture; the config is built on {BASE_CONFIG} "
            "with overrides for all of it."
        )
    elif not src.backbone_only and num_classes not in variant.class_counts:
        notes.append(
            f"{num_classes} categories, not {COCO_CLASSES}: set DATASETS to the data the model "
            "was trained on (same category order)."
        )
    return ConversionResult(
        state_dict=tensors,
        source=src,
        variant=variant,
        overrides=overrides,
        description=description,
        notes=notes,
        dropped=renamed.dropped,
        left_at_init=left_at_init,
    )


def convert_checkpoint(
    src: str,
    dst: str,
    source: Optional[str] = None,
    config: Optional[str] = None,
    configs_dir: Optional[str] = None,
) -> ConversionResult:
    """Convert the checkpoint file `src`, write the Detectron2 checkpoint `dst` and its config.

    The config is written next to `dst` with the suffix ``.yaml``; its ``_BASE_`` is the
    variant's config file in `configs_dir` (default: the repository's ``configs``) and its
    ``MODEL.WEIGHTS`` is `dst`, so it can be given to ``--config-file`` as it is.

    Args:
        src: a local checkpoint file (URLs are refused: nothing is downloaded).
        dst: the file to write (``.pth``; ``.pkl`` for detectron2's model-zoo format).
        source, config: see :func:`convert_state_dict`.
        configs_dir: where the config files are.
    """
    config_path = os.path.splitext(dst)[0] + ".yaml"
    if os.path.abspath(config_path) == os.path.abspath(dst):
        raise ConversionError(f"{dst} would be overwritten by its config: name it *.pth.")
    for written in (dst, config_path):
        # samefile also catches another name (link, relative path) for the source.
        if os.path.isfile(src) and os.path.exists(written) and os.path.samefile(src, written):
            raise ConversionError(
                f"{written} is the source checkpoint {src}: converting would overwrite it. "
                "Write the converted checkpoint to another file."
            )
    state_dict = load_state_dict(src)
    _refuse_converted(list(state_dict), src)
    result = convert_state_dict(state_dict, source, config)

    base = os.path.abspath(os.path.join(configs_dir or CONFIGS_DIR, result.base_config))
    if not os.path.isfile(base):
        result.notes.append(f"{base} does not exist (yet): the written config needs it.")
    save_detectron2_checkpoint(
        result.state_dict,
        dst,
        author=f"solov2_d2.convert from {result.source.label} ({os.path.basename(src)})",
    )
    comments = [
        f"Written by `python -m solov2_d2.convert` for {os.path.abspath(dst)}",
        f"converted from {os.path.abspath(src)} ({result.source.label}).",
        f"Architecture: {result.description}.",
    ] + [f"Note: {n}" for n in result.notes]
    with open(config_path, "w") as f:
        f.write(overrides_yaml(result.overrides, base, dst, comments))
    result.config_path = config_path
    return result


def summary(result: ConversionResult) -> List[str]:
    """A report of `result`, line by line."""
    lines = [
        f"Source: {result.source.label}",
        f"Architecture: {result.description}",
        f"Config: {result.variant.name if result.variant else 'none published; ' + BASE_CONFIG}",
        f"Tensors written: {len(result.state_dict)}",
    ]
    reasons = collections.Counter(result.dropped.values())
    for reason, count in sorted(reasons.items()):
        lines.append(f"Dropped on purpose: {count} ({reason})")
    if result.left_at_init:
        parts = collections.Counter(_model_part(k) for k in result.left_at_init)
        lines.append(
            f"Left at initialisation (not in the source): {len(result.left_at_init)} tensors of "
            + ", ".join(f"the {part} ({n})" for part, n in parts.items())
        )
    lines += [f"Note: {n}" for n in result.notes]
    return lines


def _model_part(name: str) -> str:
    if ".conv_offset." in name:
        return "deformable offsets"
    if name.startswith("backbone.fpn_"):
        return "FPN"
    return {"ins_head": "kernel/category head", "mask_head": "mask branch"}.get(
        name.split(".")[0], name.split(".")[0]
    )
