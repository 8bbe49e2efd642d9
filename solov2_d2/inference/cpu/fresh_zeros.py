"""Zero-filled CPU tensors in fresh anonymous memory: for large outputs that stay mostly zero."""
import mmap
from typing import Sequence

import torch

__all__ = ["fresh_zeros"]

# Below this, torch.zeros is as cheap (its memory is likely to be reused heap memory).
_LEAST_BYTES = 1 << 20
# Private: a forked process gets the pages copy-on-write, as for any other memory (an anonymous
# map is shared by default). None where the platform has no anonymous maps.
_FLAGS = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
    else None
)


def fresh_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype, device=device)`.

    On the CPU, large tensors are backed by a private anonymous memory map: the OS supplies each
    page zeroed when it is first written, and pages never written read as the shared zero page,
    so a mostly-zero output costs only the pages written, where `torch.zeros` writes every byte.
    The map is released with the tensor. Other devices, small tensors and platforms without
    anonymous maps get `torch.zeros`.
    """
    shape = tuple(shape)
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < _LEAST_BYTES or _FLAGS is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=_FLAGS), dtype=dtype).view(shape)
