"""Renaming a foreign state dict into ours, and fitting it to the model it is meant for.

A conversion is two explicit steps, each of which lists every name it cannot account for:

1. :func:`rename`: every source tensor is either renamed by the first :class:`Rule` of the
   source's table that names it, or dropped on purpose by a :class:`DropRule` (with the reason
   recorded); any other name stops the conversion.
2. :func:`fit_to_model`: the renamed tensors are checked against the parameter and buffer names
   and shapes of the target model, built for the detected or requested variant. Missing,
   unexpected and mis-shaped tensors all stop the conversion, reported together.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ConversionError",
    "DropRule",
    "Renamed",
    "Rule",
    "fit_to_model",
    "rename",
]

# Names listed in full in an error message; longer lists are cut with a count of the rest.
_MAX_LISTED = 40


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the offending tensors or settings."""


def _format_names(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    """One name per indented line, at most `limit` of them, then the count of the others."""
    names = list(names)
    lines = [f"    {n}" for n in names[:limit]]
    if len(names) > limit:
        lines.append(f"    ... and {len(names) - limit} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class Rule:
    """Renames source tensors whose whole name matches `pattern`.

    Attributes:
        pattern: a regular expression matched against the whole source name.
        target: the new name, either a template formatted with the match's groups
            (``"res{1}.{2}.conv1.weight"``: ``{1}`` is group 1, ``{0}`` the whole name) or a
            callable taking the match and returning the new name, or None when the match names
            no tensor we know (the name is then reported as unmapped).
    """

    pattern: str
    target: Union[str, Callable[["re.Match"], Optional[str]]]

    def apply(self, name: str) -> Optional[str]:
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        if callable(self.target):
            return self.target(m)
        return self.target.format(m.group(0), *m.groups())


@dataclass(frozen=True)
class DropRule:
    """Source tensors dropped on purpose: whole-name `pattern`, and the `reason` reported."""

    pattern: str
    reason: str

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass
class Renamed:
    """The outcome of :func:`rename`.

    Attributes:
        tensors: the renamed tensors, by our name.
        origin: for each of our names, the source name it came from (for messages).
        dropped: source names dropped on purpose, with their reason.
    """

    tensors: Dict[str, torch.Tensor]
    origin: Dict[str, str]
    dropped: Dict[str, str] = field(default_factory=dict)


def rename(
    state_dict: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    drop_rules: Sequence[DropRule],
    source_label: str,
) -> Renamed:
    """Rename every tensor of `state_dict` by `rules`, or drop it by `drop_rules`.

    Args:
        state_dict: the source tensors.
        rules: tried in order; the first that returns a name wins.
        drop_rules: names dropped on purpose (checked first).
        source_label: how the source is called in messages ("mmdetection", ...).
    Raises:
        ConversionError: listing every source name that no rule renames or drops, every value
            that is not a tensor, and every pair of source names that would land on one name.
    """
    tensors, origin, dropped = {}, {}, {}
    unmapped, not_tensors, collisions = [], [], []
    for name, value in state_dict.items():
        reason = next((d.reason for d in drop_rules if d.matches(name)), None)
        if reason is not None:
            dropped[name] = reason
            continue
        if not isinstance(value, torch.Tensor):
            not_tensors.append(f"{name} ({type(value).__name__})")
            continue
        new = next((t for t in (r.apply(name) for r in rules) if t is not None), None)
        if new is None:
            unmapped.append(name)
        elif new in tensors:
            collisions.append(f"{origin[new]} and {name} -> {new}")
        else:
            tensors[new] = value
            origin[new] = name
    problems = []
    if unmapped:
        problems.append(
            f"{len(unmapped)} tensor(s) have names that are not part of a {source_label} "
            f"SOLOv2 checkpoint, so there is nothing to map them to:\n{_format_names(unmapped)}"
        )
    if not_tensors:
        problems.append(f"entries that are not tensors:\n{_format_names(not_tensors)}")
    if collisions:
        problems.append(f"tensors that map onto the same parameter:\n{_format_names(collisions)}")
    if problems:
        raise ConversionError("Cannot convert the checkpoint: " + "\n".join(problems))
    return Renamed(tensors, origin, dropped)


# sigmoid(30) rounds to exactly 1.0 in float32 and float16, and its gradient to exactly 0, so a
# converted DCNv1 layer also stays unmodulated when fine-tuned.
_SATURATED_LOGIT = 30.0


def _widen_dcn_v1_offsets(
    tensor: torch.Tensor, target_shape: Tuple[int, ...], is_bias: bool
) -> Optional[torch.Tensor]:
    """
    A DCNv1 offset conv (``2 * kh * kw`` channels per deform group: offsets only) as the offset
    conv of our DCNv2 layer (``3 * kh * kw``: offsets, then modulation logits), computing the
    same function; None when the shapes do not have that relation.

    The offsets keep their channels; the modulation logits get zero weights and a bias so large
    that their sigmoid is exactly 1.0 in float32 and float16, the unmodulated sampling of DCNv1.
    (The authors' light DCN model uses DCNv1; mmdetection and the other variants use DCNv2.)
    """
    if len(target_shape) != tensor.dim() or target_shape[1:] != tuple(tensor.shape[1:]):
        return None
    if tensor.shape[0] * 3 != target_shape[0] * 2:
        return None
    extra = target_shape[0] - tensor.shape[0]
    if is_bias:
        filler = torch.full((extra,), _SATURATED_LOGIT, dtype=tensor.dtype, device=tensor.device)
    else:
        filler = tensor.new_zeros((extra,) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, filler], dim=0)


def fit_to_model(
    renamed: Renamed,
    target_shapes: Mapping[str, Tuple[int, ...]],
    may_stay_missing: Callable[[str], bool] = lambda name: False,
) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Check the renamed tensors against the target model's names and shapes.

    Args:
        renamed: output of :func:`rename`.
        target_shapes: name -> shape of every entry of the target model's state dict.
        may_stay_missing: names of the target that the source is not expected to provide (the
            heads when converting an ImageNet backbone); they keep their initialisation.
    Returns:
        (state_dict, notes, left_at_init): the tensors to save, in the target's order; notes on
        tensors adapted on the way (DCNv1 offsets); target names left at initialisation.
    Raises:
        ConversionError: listing missing target names, unexpected names (with the source name
            each came from) and shape mismatches, all at once.
    """
    tensors = renamed.tensors
    missing = [k for k in target_shapes if k not in tensors and not may_stay_missing(k)]
    left_at_init = [k for k in target_shapes if k not in tensors and may_stay_missing(k)]
    unexpected = [f"{k} (from {renamed.origin[k]})" for k in tensors if k not in target_shapes]
    out, widened, mismatched = {}, [], []
    for name, shape in target_shapes.items():
        if name not in tensors:
            continue
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape) and ".conv_offset." in name:
            dcn_v2 = _widen_dcn_v1_offsets(tensor, tuple(shape), name.endswith(".bias"))
            if dcn_v2 is not None:
                widened.append(name)
                tensor = dcn_v2
        if tuple(tensor.shape) != tuple(shape):
            mismatched.append(
                f"{name} (from {renamed.origin[name]}): checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(shape)}"
            )
        out[name] = tensor
    problems = []
    if missing:
        problems.append(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs (model names):\n"
            f"{_format_names(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) of the checkpoint have no place in the model:\n"
            f"{_format_names(unexpected)}"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) have the wrong shape:\n{_format_names(mismatched)}"
        )
    if problems:
        raise ConversionError("The checkpoint does not fit the model: " + "\n".join(problems))
    notes = []
    if widened:
        notes.append(
            f"{len(widened)} DCNv1 offset tensor(s) widened to DCNv2 with the modulation fixed "
            f"at 1 (the same function), e.g. {widened[0]}"
        )
    return out, notes, left_at_init
