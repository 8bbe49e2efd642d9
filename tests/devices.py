"""Test helpers for device behaviour: the `cuda` marker, host synchronisations counted on a GPU
and on the CPU, where they cost nothing but show where a GPU's host would wait for its queue."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def needs_cuda(test):
    """Mark `test` as a CUDA test: `pytest -m cuda` selects them (tools/gpu_check.sh runs them);
    without a GPU they are skipped, so the suite passes on CPU machines."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.cuda(test)


def count_cuda_syncs(fn):
    """fn() under CUDA's sync debug mode: (its result, the number of host synchronisations)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


# Operators whose result the host must wait for on a GPU: a value read by the host, an output
# whose size depends on values, or a tensor made from host data (a blocking copy to a GPU).
_VALUE_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(), float(), bool()
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.lift_fresh.default,  # torch.tensor(host data)
}
_VALUE_SIZED = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
_BOOL_INDEXED = {"index", "index_put", "index_put_"}


class HostSyncCounter(TorchDispatchMode):
    """Records, in `syncs`, every operator run inside it that makes the host wait for the device
    on a GPU (:data:`_VALUE_READS`, :data:`_VALUE_SIZED`, boolean-mask indexing,
    `repeat_interleave` without `output_size`) and every `Tensor.tolist()` (which reads values
    without dispatching an operator). Forward and backward passes are both seen."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (
            func in _VALUE_READS
            or name in _VALUE_SIZED
            or (name == "repeat_interleave" and kwargs.get("output_size") is None)
            or (name in _BOOL_INDEXED and _has_bool_index(args[1]))
        ):
            self.syncs.append(name)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter.syncs.append("tolist")
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
