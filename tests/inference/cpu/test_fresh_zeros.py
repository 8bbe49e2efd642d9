import gc
import io
import mmap
import os
import sys
import weakref

import pytest
import torch

from solov2_d2.inference.cpu import fresh_zeros as module
from solov2_d2.inference.cpu.fresh_zeros import fresh_zeros

LARGE = (5, 600, 700)  # 2.1 MB of bool, 8.4 MB of float32: above the threshold either way


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.int64])
@pytest.mark.parametrize("shape", [(0, 4), (3, 5), LARGE])
def test_equals_torch_zeros(shape, dtype):
    x = fresh_zeros(shape, dtype, torch.device("cpu"))
    assert x.shape == shape and x.dtype == dtype and x.is_contiguous()
    assert torch.equal(x, torch.zeros(shape, dtype=dtype))


def test_large_tensors_are_writable_and_independent():
    a = fresh_zeros(LARGE, torch.float32, "cpu")
    b = fresh_zeros(LARGE, torch.float32, "cpu")
    a[2, 100:300, 50:60] = 1.5
    a.view(-1)[-1] = -2.0
    assert float(a.sum()) == 1.5 * 200 * 10 - 2.0
    assert not b.any()
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_large_tensors_survive_serialisation():
    x = fresh_zeros(LARGE, torch.bool, "cpu")
    x[1, 5, 7] = True
    buffer = io.BytesIO()
    torch.save(x, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), x)


@pytest.mark.skipif(
    module._FLAGS is None,
    reason="no anonymous memory maps on this platform: fresh_zeros is torch.zeros there (below)",
)
def test_memory_is_taken_when_written_and_released_with_the_tensor(monkeypatch):
    import resource  # POSIX, as anonymous maps are

    maps, real = [], mmap.mmap

    def spy(*args, **kwargs):
        made = real(*args, **kwargs)
        maps.append(weakref.ref(made))
        return made

    monkeypatch.setattr(module.mmap, "mmap", spy)
    size = 64 << 20
    fresh_zeros((size,), torch.uint8, "cpu")  # first-call costs
    maps.clear()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = fresh_zeros((size,), torch.uint8, "cpu")
    # torch.zeros faults in every page here: 16384 of 4 KB (or 32 huge pages).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 8
    x[::4096] = 1
    assert int(x.sum()) == size // 4096
    assert len(maps) == 1 and maps[0]() is not None
    del x
    gc.collect()
    assert maps[0]() is None  # the map is closed (unmapped) with the tensor


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_process_gets_its_own_copy():
    x = fresh_zeros(LARGE, torch.uint8, "cpu")
    pid = os.fork()
    if pid == 0:  # the child writes (by numpy: torch's threads do not survive a fork), exits
        x.numpy().fill(7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert not x.any()


def test_other_devices_and_platforms_get_torch_zeros(monkeypatch):
    x = fresh_zeros(LARGE, torch.float32, torch.device("meta"))
    assert x.device.type == "meta" and x.shape == LARGE
    monkeypatch.setattr(module, "_FLAGS", None)
    y = fresh_zeros(LARGE, torch.float32, "cpu")
    assert torch.equal(y, torch.zeros(LARGE)) and y.untyped_storage().nbytes() == y.numel() * 4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
