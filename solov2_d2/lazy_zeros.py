"""Zero-filled tensors that the CPU does not write: for large outputs that stay mostly zero."""
from typing import Sequence

import numpy as np
import torch

__all__ = ["lazy_zeros"]

_NUMPY_DTYPES = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.float32: np.float32}


def lazy_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype, device=device)`.

    On the CPU the memory comes from calloc (numpy's zeros): large blocks are fresh pages that
    the OS supplies already zeroed when they are first written, and pages never written read as
    the shared zero page, so a mostly-zero output costs only the pages written. `torch.zeros`
    writes every byte. Other devices and dtypes (those without a numpy twin) get `torch.zeros`.
    """
    if torch.device(device).type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[dtype]))
    return torch.zeros(tuple(shape), dtype=dtype, device=device)
