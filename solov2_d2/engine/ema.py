"""An exponential moving average (EMA) of the model's weights during training (``MODEL_EMA``).

After each training iteration k = 1, 2, ... (counted from the first update of the average, also
across resumes) every floating-point entry of the model's state dict (parameters and persistent
float buffers) is averaged as

    average = d_k * average + (1 - d_k) * weights,    d_k = DECAY * (1 - exp(-k / WARMUP_ITERS))

(d_k = DECAY when WARMUP_ITERS is 0). The warm-up keeps the first iterations from weighing on
the average for long: d_1 is about 0 (the average starts as the weights), d_k reaches 63% of
DECAY at k = WARMUP_ITERS and 95% at 3 WARMUP_ITERS. With DECAY d the average spans about
1 / (1 - d) iterations (1000 for 0.999).

Where the average is used (:func:`add_model_ema_hook` sets it up in a trainer):

* every evaluation (``TEST.EVAL_PERIOD`` and the one after training, also with test-time
  augmentation) scores the averaged weights, which are swapped into the model after the
  iteration's update and out again after the iteration's hooks: training goes on with its own
  weights;
* a checkpoint written at such an iteration, ``model_final.pth`` always, holds the averaged
  weights as ``model``, so that ``--eval-only``, :class:`~solov2_d2.SOLOv2Predictor` and
  fine-tuning from it (``MODEL.WEIGHTS``) use them;
* every checkpoint holds the average under ``model_ema`` ({"average": {name: tensor},
  "num_updates": int}, plus "raw_model": the training weights, where ``model`` holds the
  average), and ``--resume`` restores it with the training weights: a resumed run gives the
  weights and the average of the uninterrupted run.

The average is float32 (whatever the dtype of the weights), on the model's device; integer
buffers are not averaged (the model's own are used). One update is a few fused ``torch._foreach``
operations over all tensors (no Python loop over them), with a plain loop only where torch lacks
them.
"""
import logging
import math
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PreciseBN

__all__ = [
    "ModelEMA",
    "ModelEMAHook",
    "RestoreTrainingWeightsHook",
    "add_model_ema_hook",
    "check_model_ema_config",
]

logger = logging.getLogger(__name__)


def check_model_ema_config(cfg) -> None:
    """Raise ValueError naming the key and its value for a ``MODEL_EMA`` setting that cannot
    work: DECAY outside [0, 1), WARMUP_ITERS below 0 (or not finite)."""
    c = cfg.MODEL_EMA
    if not 0 <= c.DECAY < 1:
        raise ValueError(
            f"MODEL_EMA.DECAY = {c.DECAY!r}; expected a value in [0, 1) (e.g. 0.999: an "
            "average over about 1000 iterations)."
        )
    if not (math.isfinite(c.WARMUP_ITERS) and c.WARMUP_ITERS >= 0):
        raise ValueError(
            f"MODEL_EMA.WARMUP_ITERS = {c.WARMUP_ITERS!r}; expected a number >= 0 (0: no "
            "warm-up of the decay)."
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel, whose state dict names the checkpoints use."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _lerp_(averages: List[torch.Tensor], weights: List[torch.Tensor], weight: float) -> None:
    """averages[i] += weight * (weights[i] - averages[i]) for every i (float32 lists of equal
    shapes), fused: ``torch._foreach_lerp_`` (a private API, so checked), else
    ``_foreach_mul_`` + ``_foreach_add_``, else a loop."""
    if not averages:
        return
    if hasattr(torch, "_foreach_lerp_"):
        torch._foreach_lerp_(averages, weights, weight)
    elif hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_"):
        torch._foreach_mul_(averages, 1.0 - weight)
        torch._foreach_add_(averages, weights, alpha=weight)
    else:  # pragma: no cover - every torch this project installs has the fused operations
        for a, w in zip(averages, weights):
            a.lerp_(w, weight)


def _copy_(targets: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]) for every i (casting as copy_ does)."""
    if not targets:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:  # pragma: no cover
        for t, s in zip(targets, sources):
            t.copy_(s)


class ModelEMA:
    """The exponential moving average of a model's floating-point state (see the module's
    docstring for the formula), with the swap of the average into the model.

    It reads the model's tensors in place (the optimizer updates them in place); the tensors
    are those of the model's state dict when the average was created, so a model whose
    parameters are replaced by new tensors afterwards (``module.weight = ...``) needs a new
    average.

    A checkpointable (``state_dict`` / ``load_state_dict``): register it with a detectron2
    ``Checkpointer`` (``checkpointer.add_checkpointable("model_ema", ema)``), which loads it
    after the model.
    """

    @configurable
    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup_iters: float = 2000):
        """
        Args:
            model: the model (a DistributedDataParallel is unwrapped).
            decay: DECAY in [0, 1).
            warmup_iters: WARMUP_ITERS >= 0 (0: the decay is DECAY from the first update).
        """
        if not 0 <= decay < 1:
            raise ValueError(f"decay = {decay!r}; expected a value in [0, 1).")
        if not warmup_iters >= 0:
            raise ValueError(f"warmup_iters = {warmup_iters!r}; expected a number >= 0.")
        self.decay = float(decay)
        self.warmup_iters = float(warmup_iters)
        self.num_updates = 0
        state = _unwrap(model).state_dict(keep_vars=True)
        self.names = [k for k, v in state.items() if torch.is_floating_point(v)]
        # The model's tensors, sharing their storage; float32 ones are read as they are, others
        # cast at each update.
        self._weights = [state[k].detach() for k in self.names]
        self._average = [w.float().clone() for w in self._weights]
        self._is_f32 = [w.dtype == torch.float32 for w in self._weights]
        self._avg_f32 = [a for a, f in zip(self._average, self._is_f32) if f]
        self._w_f32 = [w for w, f in zip(self._weights, self._is_f32) if f]
        self._avg_other = [a for a, f in zip(self._average, self._is_f32) if not f]
        self._w_other = [w for w, f in zip(self._weights, self._is_f32) if not f]
        # The training weights while the average is in the model, else None.
        self._raw: Optional[List[torch.Tensor]] = None

    @classmethod
    def from_config(cls, cfg, model):
        check_model_ema_config(cfg)
        return {
            "model": model,
            "decay": cfg.MODEL_EMA.DECAY,
            "warmup_iters": cfg.MODEL_EMA.WARMUP_ITERS,
        }

    def decay_at(self, k: int) -> float:
        """d_k, the decay of the k-th update (k >= 1)."""
        if self.warmup_iters == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-k / self.warmup_iters))

    @property
    def applied(self) -> bool:
        """Whether the model holds the average (and this object its training weights)."""
        return self._raw is not None

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average anew from the model's current weights (no update counted)."""
        if self.applied:
            raise RuntimeError("ModelEMA.reset while the average is in the model.")
        _copy_(self._average, self._weights)
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One update of the average with the model's current weights."""
        if self.applied:
            raise RuntimeError(
                "ModelEMA.update while the average is in the model: restore its training "
                "weights first (ModelEMA.restore)."
            )
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        _lerp_(self._avg_f32, self._w_f32, weight)
        if self._w_other:  # e.g. float16 weights: float32 copies, one per tensor
            _lerp_(self._avg_other, [w.float() for w in self._w_other], weight)

    @torch.no_grad()
    def apply(self) -> bool:
        """Put the average into the model, keeping its training weights; False (nothing done)
        where it is already there."""
        if self.applied:
            return False
        self._raw = [w.clone() for w in self._weights]
        _copy_(self._weights, self._average)
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the training weights back into the model (after :meth:`apply`; else nothing)."""
        if self._raw is None:
            return
        _copy_(self._weights, self._raw)
        self._raw = None

    @contextmanager
    def applied_to_model(self):
        """A context in which the model holds the average; what it held before is restored at
        its end (where the average was already in the model, it stays there)."""
        swapped = self.apply()
        try:
            yield
        finally:
            if swapped:
                self.restore()

    def averaged_state_dict(self) -> Dict[str, torch.Tensor]:
        """{name: float32 tensor} of the average, by the model's state-dict names."""
        return dict(zip(self.names, self._average))

    def state_dict(self) -> Dict:
        """{"average": {name: tensor}, "num_updates": int}, and "raw_model": {name: tensor},
        the training weights, while the model holds the average."""
        state = {"average": self.averaged_state_dict(), "num_updates": self.num_updates}
        if self._raw is not None:
            state["raw_model"] = dict(zip(self.names, self._raw))
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Dict) -> None:
        """Restore the average of :meth:`state_dict`; where it holds "raw_model", the training
        weights that a checkpoint's ``model`` (the average) stood in for go back into the model.
        Raises ValueError naming the tensors where the state does not fit the model."""
        if self.applied:
            raise RuntimeError("ModelEMA.load_state_dict while the average is in the model.")
        parts = {"average": state["average"]}
        if "raw_model" in state:
            parts["raw_model"] = state["raw_model"]
        for part, tensors in parts.items():
            missing = [k for k in self.names if k not in tensors]
            unexpected = [k for k in tensors if k not in set(self.names)]
            wrong = [
                f"{k} ({list(w.shape)} in the model, {list(tensors[k].shape)} in the state)"
                for k, w in zip(self.names, self._weights)
                if k in tensors and tensors[k].shape != w.shape
            ]
            if missing or unexpected or wrong:
                raise ValueError(
                    f"The weight average's {part!r} does not fit the model: missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]}, of other shapes {wrong[:5]}. "
                    "It was saved for another model (another config)."
                )
        _copy_(self._average, [state["average"][k] for k in self.names])
        if "raw_model" in parts:
            _copy_(self._weights, [parts["raw_model"][k] for k in self.names])
        self.num_updates = int(state["num_updates"])


class ModelEMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every iteration and puts the average into the model
    after each iteration that ends with an evaluation (every `eval_period`-th and the last),
    for the hooks that follow it (place it before the checkpointer and the evaluation hooks);
    :class:`RestoreTrainingWeightsHook`, placed after them, takes the average out again.

    Before training, an average that has seen no update starts from the model's weights (those
    loaded from ``MODEL.WEIGHTS``, not those the model was built with).
    """

    def __init__(self, ema: ModelEMA, eval_period: int):
        """
        Args:
            ema: the average.
            eval_period: ``TEST.EVAL_PERIOD``, the period of the evaluations (0: only the one
                after training).
        """
        self.ema = ema
        self.eval_period = int(eval_period)

    def before_train(self):
        if self.ema.num_updates == 0:
            self.ema.reset()

    def after_step(self):
        self.ema.update()
        next_iter = self.trainer.iter + 1
        last = next_iter >= self.trainer.max_iter
        if last or (self.eval_period > 0 and next_iter % self.eval_period == 0):
            self.ema.apply()


class RestoreTrainingWeightsHook(HookBase):
    """Puts the training weights back after the hooks that ran with the average in the model:
    after every iteration but the last (whose average stays for the final evaluations) and at
    the end of training. Placed after every checkpointer and evaluation hook."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            self.ema.restore()

    def after_train(self):
        self.ema.restore()


def add_model_ema_hook(trainer, hooks: List[HookBase]) -> List[HookBase]:
    """With ``MODEL_EMA.ENABLED``, the hooks of a detectron2 ``DefaultTrainer`` (those of its
    ``build_hooks``) with the weight average: a :class:`ModelEMAHook` before the first
    checkpointer or evaluation hook, so that the evaluations at ``TEST.EVAL_PERIOD`` and after
    training (every hook after it, test-time augmentation included) score the average and
    checkpoints hold the average of their iteration, a :class:`RestoreTrainingWeightsHook` at
    the end, and the average registered in ``trainer.checkpointer`` as "model_ema". Without it,
    `hooks` unchanged. The average is `trainer.model_ema` (None when disabled).

    An evaluation hook with another period than ``TEST.EVAL_PERIOD`` scores the training
    weights between those iterations. Validates ``MODEL_EMA`` (ValueError naming the key).
    """
    cfg = trainer.cfg
    trainer.model_ema = None
    if not cfg.MODEL_EMA.ENABLED:
        return hooks
    ema = ModelEMA(cfg, trainer.model)
    trainer.model_ema = ema
    trainer.checkpointer.add_checkpointable("model_ema", ema)
    hooks = [h for h in hooks if h is not None]
    later = (EvalHook, PeriodicCheckpointer, PreciseBN)
    position = next((i for i, h in enumerate(hooks) if isinstance(h, later)), len(hooks))
    hooks.insert(position, ModelEMAHook(ema, cfg.TEST.EVAL_PERIOD))
    hooks.append(RestoreTrainingWeightsHook(ema))
    logger.info(
        f"Model EMA: decay {ema.decay}, warm-up {ema.warmup_iters:g} iterations, over "
        f"{len(ema.names)} tensors; evaluations and model_final.pth use the average."
    )
    return hooks
