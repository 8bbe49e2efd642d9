"""Reading foreign checkpoint files and writing Detectron2 ones.

Reading never downloads and never runs code from the file: checkpoints are read with torch's
``weights_only`` loader; files whose metadata holds objects of other classes (mmdetection keeps
its config, log buffers and numpy scalars there) are read again with an unpickler that builds
tensors and ordered dicts normally and replaces every other object by an inert placeholder.
"""
import os
import pickle
import re
import types
from typing import Dict, Mapping

import torch

from .mapping import ConversionError

__all__ = ["load_state_dict", "save_detectron2_checkpoint"]

# "https://...", "s3://...", and mmdetection's "torchvision://resnet50" or "open-mmlab://...".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class _Inert:
    """Stand-in for an object of a class the converter has no use for (metadata, logs)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _is_needed_global(module: str, name: str) -> bool:
    """Globals a state dict is made of: torch's tensor rebuilders, dtypes, sizes, devices and
    parameters (storages are resolved by torch itself), and OrderedDict."""
    if module in ("torch._utils", "torch._tensor"):
        return name.startswith("_rebuild")
    if module == "torch":
        return name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.nn.parameter":
        return name == "Parameter"
    return (module, name) == ("collections", "OrderedDict")


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if _is_needed_global(module, name):
            return super().find_class(module, name)
        return _Inert


def _inert_load(file, **kwargs):
    return _InertUnpickler(file, **kwargs).load()


# The module interface torch.load expects of `pickle_module`.
_inert_pickle = types.ModuleType("solov2_d2_inert_pickle")
_inert_pickle.Unpickler = _InertUnpickler
_inert_pickle.load = _inert_load


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Objects beyond tensors and containers, typically in the metadata.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file.

    The state dict is taken from the ``state_dict`` entry (SOLO, mmdetection), else the
    ``model`` entry (Detectron2, AdelaiDet), else the file itself when it is a bare state dict
    (torchvision). Other entries (optimizer, metadata) are ignored.

    Raises:
        ConversionError: `path` is a URL (nothing is downloaded), does not exist, is not a
            PyTorch checkpoint, or holds no state dict.
    """
    if _URL.match(path):
        raise ConversionError(
            f"{path} is a URL; the converter does not download anything. Download the file "
            "yourself and pass its local path."
        )
    if not os.path.isfile(path):
        raise ConversionError(f"No such checkpoint file: {path}")
    try:
        data = _read(path)
    except Exception as e:  # whatever torch raises for a file that is not a checkpoint
        raise ConversionError(f"Cannot read {path} as a PyTorch checkpoint: {e}") from e
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                return dict(data[key])
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return dict(data)
        entries = ", ".join(repr(k) for k in list(data)[:20])
        raise ConversionError(
            f"{path} holds no state dict: expected a 'state_dict' or 'model' entry, or tensors "
            f"only; its entries are {entries}."
        )
    raise ConversionError(f"{path} holds a {type(data).__name__}, not a checkpoint dict.")


def save_detectron2_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str, author: str):
    """Write `state_dict` as :class:`detectron2.checkpoint.DetectionCheckpointer` reads it.

    ``.pkl`` files are written as detectron2's model zoo does (pickled numpy arrays); any other
    name gets a ``torch.save`` file. Either way the names are ours already, so detectron2's
    name-matching heuristics are switched off.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if path.endswith(".pkl"):
        model = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": author, "matching_heuristics": False}, f)
    else:
        model = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        torch.save({"model": model, "__author__": author, "matching_heuristics": False}, path)
