"""Detectron2's checkpointer with errors that name the file and what is wrong with it, and an
opt-out of partly loaded models for evaluation and inference.

Detectron2 loads what fits and logs the rest ("Skip loading parameter", "Some model parameters
or buffers are not found"): right for fine-tuning (a backbone, a head for other classes), wrong
for evaluation, which would silently score randomly initialised layers. Unreadable files end in
torch's unpickling messages ("Memo value not found", a bare EOFError) without the file's name,
and a ``last_checkpoint`` that is not text in a UnicodeDecodeError; a file that is not a
checkpoint ends in torch's advice to load it with ``weights_only=False``, which would run any code
the file holds. Resuming (``--resume``) from a checkpoint of the save folder that another config
wrote would load what fits, skip the rest and go on from its iteration: a finished run then
trains nothing and evaluates layers at their random initialisation.
"""
import os
import re
from collections.abc import Mapping
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["IncompleteWeightsError", "ResumeMismatchError", "SOLOv2Checkpointer"]

# Names listed in a message, at most.
_SHOWN = 5
_OPT_IN = (
    "To use the model anyway, load it with require_complete=False (train_net.py: "
    "--eval-incomplete-weights; SOLOv2Predictor: allow_incomplete_weights=True)."
)


class IncompleteWeightsError(ValueError):
    """The weights leave some of the model's parameters at their random initial values."""


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from does not fit the model (another config wrote it)."""


def _unpickling_reason(error: Exception) -> str:
    """What torch's safe loader (``weights_only=True``) found, without its advice to load the
    file unsafely."""
    message = str(error)
    if "weights_only" not in message:
        return f"{type(error).__name__}: {message}".strip().rstrip(":")
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\s*\n|$)", message, re.S)
    detail = found.group(1) if found else ""
    operand = re.match(r"Unsupported operand (\S+)", detail)
    if operand:
        return f"it is no pickle torch can read (unsupported pickle operand {operand.group(1)})"
    global_ = re.match(r"Unsupported global: GLOBAL (\S+)", detail)
    if global_:
        return (
            f"it holds an object of class {global_.group(1)}, which is not loaded: only "
            "tensors and plain containers are (loading other objects could run code from the "
            "file)"
        )
    return detail.split(". Please use")[0] or "torch's safe loader refused it"


def _some(names: List[str]) -> str:
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


class SOLOv2Checkpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` (same arguments and file formats), which also:

    * raises ValueError naming the file when a checkpoint cannot be read, or holds no model;
      FileNotFoundError when it does not exist; ValueError when ``last_checkpoint`` in the
      save folder is not text;
    * with ``require_complete=True``, raises :class:`IncompleteWeightsError` when there is
      nothing to load or the file does not fill every parameter and buffer of the model with a
      tensor of the right shape (evaluation and inference need that).
    """

    def __init__(self, model, save_dir: str = "", *, require_complete: bool = False, **kwargs):
        """
        Args:
            model, save_dir, kwargs: as in :class:`DetectionCheckpointer`.
            require_complete: refuse to leave any of the model's tensors at initialisation.
        """
        super().__init__(model, save_dir, **kwargs)
        self.require_complete = require_complete
        self._loading: Optional[str] = None
        self._resuming = False

    def get_checkpoint_file(self) -> str:
        try:
            return super().get_checkpoint_file()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{os.path.join(self.save_dir, 'last_checkpoint')} must hold the file name of "
                f"the last checkpoint in {self.save_dir}, but it is not text ({e}). Write the "
                "name of a checkpoint into it (e.g. model_final.pth), or delete it to start "
                "from MODEL.WEIGHTS."
            ) from e

    def resume_or_load(self, path: str, *, resume: bool = True):
        """As detectron2's; resuming from the last checkpoint of the save folder also raises
        :class:`ResumeMismatchError` when that checkpoint does not fit the model exactly (tensors
        of other shapes, missing or unexpected tensors). Loading `path` (no resume) keeps the
        partial loading of fine-tuning."""
        self._resuming = resume and self.has_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        if not path:
            if self.require_complete:
                raise IncompleteWeightsError(
                    "No weights to load (MODEL.WEIGHTS is empty and there is no checkpoint to "
                    "resume): the model would be evaluated at its random initialisation. "
                    + _OPT_IN
                )
            return super().load(path, checkpointables)
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint {path} does not exist.")
        self._loading = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = None

    def _load_file(self, filename: str):
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # whatever torch or pickle raise for a file of another kind
            # Torch's own message, chained, would end the traceback with its advice to load the
            # file with weights_only=False: the reason is kept, the advice is not.
            raise ValueError(
                f"Cannot read {filename} as a checkpoint (a Detectron2 .pth or .pkl file): "
                f"{_unpickling_reason(e)}. Checkpoints of other SOLOv2 code bases are "
                "converted with python -m solov2_d2.convert."
            ) from None
        if not isinstance(checkpoint.get("model"), Mapping) or not checkpoint["model"]:
            raise ValueError(f"{filename} holds no model weights (its 'model' entry is empty).")
        return checkpoint

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if not (self.require_complete or self._resuming):
            return incompatible
        wrong_shape = [
            f"{name} ({list(ours)} in the model, {list(theirs)} in the file)"
            for name, theirs, ours in incompatible.incorrect_shapes
        ]
        reshaped = {name for name, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k not in reshaped]
        problems = []
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} tensors of other shapes: {_some(wrong_shape)}")
        if missing:
            problems.append(f"{len(missing)} tensors missing: {_some(missing)}")
        if self._resuming:
            unexpected = list(incompatible.unexpected_keys)
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected tensors: {_some(unexpected)}")
            if problems:
                raise ResumeMismatchError(
                    f"Cannot resume from {self._loading}, the last checkpoint in {self.save_dir}: "
                    f"it does not fit the model ({'; '.join(problems)}). It was written with "
                    "another config (e.g. another MODEL.SOLOV2.MASK_DIM or NUM_CLASSES). Resume "
                    "with the config of that run, or start this one in another OUTPUT_DIR (to "
                    "fine-tune from it, give it as MODEL.WEIGHTS without --resume)."
                )
            return incompatible
        if problems:
            raise IncompleteWeightsError(
                f"{self._loading} does not fit the model ({'; '.join(problems)}). Those "
                "parameters would keep their random initial values; check that the config "
                "is the one the checkpoint was trained with (e.g. MODEL.SOLOV2.NUM_CLASSES). "
                + _OPT_IN
            )
        return incompatible
