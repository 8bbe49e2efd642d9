"""The int8 intersection path equals the plain float32 one, count for count."""
import pytest
import torch

from solov2_d2.inference.cpu import int8_intersections as mi


@pytest.mark.parametrize("shape", [(2, 0, 37), (1, 1, 9), (3, 17, 1000), (2, 33, 4097), (1, 5, 8)])
def test_int8_counts_equal_the_float_matrix_product(shape):
    g = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(shape, generator=g) > torch.rand(shape[0], shape[1], 1, generator=g)
    expected = mi.mask_intersections_float(masks)
    counts = mi.mask_intersections_int8(masks)
    assert counts.dtype == torch.float32 and counts.shape == (shape[0], shape[1], shape[1])
    assert torch.equal(counts, expected)
    # Diagonal: the areas.
    assert torch.equal(counts.diagonal(dim1=1, dim2=2), masks.sum(dim=2).float())


def test_a_strided_view_and_the_dispatch():
    masks = torch.rand(2, 40, 300) > 0.3
    view = masks[:, ::2]  # not contiguous
    assert torch.equal(mi.mask_intersections(view), mi.mask_intersections_float(view))
    # Float inputs and masks of fewer than 8 pixels take the plain path.
    assert torch.equal(mi.mask_intersections(masks.half()), mi.mask_intersections_float(masks))
    tiny = masks[..., :1]
    assert torch.equal(mi.mask_intersections(tiny), mi.mask_intersections_float(tiny))


def test_counts_beyond_half_precision():
    masks = torch.ones(1, 3, 300 * 300, dtype=torch.bool)
    masks[0, 2, 70_000:] = False
    counts = mi.mask_intersections(masks)
    assert counts[0].tolist() == [[90_000.0] * 2 + [70_000.0]] * 2 + [[70_000.0] * 3]
