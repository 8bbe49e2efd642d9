"""Memory that the loops of the CPU's fast paths reuse, from one group of products to the next
and from one call to the next."""
import math
import threading
from typing import Dict, Sequence

import torch

__all__ = ["Scratch", "thread_scratch"]


class Scratch:
    """Named buffers for the large temporaries of a loop (gathered operands, products).

    A large tensor allocated afresh may take new pages from the OS (the allocator maps large
    blocks and unmaps them when freed), and each page then faults when first written; a buffer
    reused across the steps of a loop, and across calls, faults once. A view from `take` holds
    valid data only until the next `take` of the same name.
    """

    def __init__(self):
        self._buffers: Dict[str, torch.Tensor] = {}

    def take(
        self,
        name: str,
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """An uninitialised tensor of `shape`, `dtype` on `device`, in the buffer `name` (replaced
        by a larger one where it is too small, or by one of the right dtype and device)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != torch.device(device)
        ):
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


_local = threading.local()


def thread_scratch() -> Scratch:
    """The calling thread's `Scratch`, kept while the thread lives (threads that run inference
    at the same time never share buffers)."""
    if not hasattr(_local, "scratch"):
        _local.scratch = Scratch()
    return _local.scratch
