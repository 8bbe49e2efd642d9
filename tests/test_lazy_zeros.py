"""`lazy_zeros` against `torch.zeros`."""
import pytest
import torch

from solov2_d2.lazy_zeros import lazy_zeros


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16])
def test_lazy_zeros_equal_torch_zeros(dtype):
    x = lazy_zeros((3, 1000, 1500), dtype, torch.device("cpu"))
    assert x.dtype == dtype and x.shape == (3, 1000, 1500) and x.is_contiguous()
    assert torch.equal(x, torch.zeros((3, 1000, 1500), dtype=dtype))


def test_lazy_zeros_are_writable_and_independent():
    a = lazy_zeros((2, 3), torch.bool, "cpu")
    b = lazy_zeros((2, 3), torch.bool, "cpu")
    a[1, 2] = True
    a.view(-1)[:2] = True
    assert a.sum() == 3 and not b.any()
    assert torch.cat([a, b]).shape == (4, 3) and a.clone().sum() == 3


def test_empty_shape():
    assert lazy_zeros((0, 5, 7), torch.bool, "cpu").shape == (0, 5, 7)
