"""The optimizer of SOLOv2 training: detectron2's SGD, with gradient clipping of the whole model.

The authors and mmdetection clip the norm of all gradients together at 35
(``torch.nn.utils.clip_grad_norm_`` over every parameter). Detectron2 0.6's
``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "norm"`` clips each parameter's gradient separately, which lets
the whole update grow with the number of parameters. ``CLIP_TYPE "full_model"`` (the name other
detectron2 projects use for it) clips the global norm; ``"value"`` and ``"norm"`` stay
detectron2's.

Under mixed precision, detectron2's AMPTrainer calls ``GradScaler.step(optimizer)``, which unscales
the gradients before it calls ``optimizer.step()`` (and skips the step when they are not finite),
so the clipping here always sees true, unscaled gradients.
"""
import itertools
from typing import Type

import torch

from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping as _add_per_parameter_clipping

__all__ = ["FULL_MODEL", "build_optimizer", "maybe_add_gradient_clipping"]

FULL_MODEL = "full_model"


def maybe_add_gradient_clipping(cfg, optimizer_type: Type[torch.optim.Optimizer]):
    """The optimizer class ``optimizer_type`` with the gradient clipping ``cfg`` asks for.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"``: a subclass whose ``step`` first scales all
    gradients of all parameter groups together so that their ``NORM_TYPE`` norm is at most
    ``CLIP_VALUE``, exactly ``torch.nn.utils.clip_grad_norm_`` over every parameter. Other types
    (and ``ENABLED False``) are detectron2's
    :func:`detectron2.solver.build.maybe_add_gradient_clipping`.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return _add_per_parameter_clipping(cfg, optimizer_type)
    if clip.CLIP_VALUE <= 0:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE = {clip.CLIP_VALUE}: the largest gradient norm "
            f"of CLIP_TYPE {FULL_MODEL!r} must be positive."
        )
    max_norm, norm_type = float(clip.CLIP_VALUE), float(clip.NORM_TYPE)

    def step(self, closure=None):
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        # One norm over all gradients; the scale stays on the device (no host synchronisation).
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return optimizer_type.step(self, closure)

    return type(
        optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,), {"step": step}
    )


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD (learning rate, momentum, Nesterov, weight decay with its norm and bias
    variants from ``cfg.SOLVER``) with the gradient clipping of :func:`maybe_add_gradient_clipping`.
    """
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
