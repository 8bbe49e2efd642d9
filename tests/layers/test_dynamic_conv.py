import pytest
import torch
import torch.nn.functional as F

from solov2_d2.layers.dynamic_conv import dynamic_mask_logits, flat_mask_features, flatten_levels


@pytest.mark.parametrize("k", [1, 3])
def test_dynamic_conv_equals_per_image_convolution(k):
    feats = torch.randn(3, 8, 10, 12)
    kernels = torch.randn(3, 5, 8 * k * k)
    out = dynamic_mask_logits(feats, kernels)
    assert out.shape == (3, 5, 10, 12)
    for b in range(3):
        ref = F.conv2d(feats[b : b + 1], kernels[b].view(5, 8, k, k), padding=k // 2)
        torch.testing.assert_close(out[b], ref[0], rtol=1e-5, atol=1e-5)


def test_dynamic_conv_rejects_mismatched_kernels():
    with pytest.raises(ValueError, match="E \\* k \\* k"):
        dynamic_mask_logits(torch.randn(1, 8, 4, 4), torch.randn(1, 2, 20))


def test_flatten_levels_layout():
    a = torch.arange(2 * 3 * 4).view(1, 2, 3, 4).float()  # [B, K, S?, S?] with K = 2
    b = torch.arange(2 * 1 * 1).view(1, 2, 1, 1).float()
    flat = flatten_levels([a, b])
    assert flat.shape == (1, 13, 2)
    assert flat[0, 5].tolist() == [5.0, 17.0]  # row 1, col 1 of the first level
    assert flat[0, 12].tolist() == [0.0, 1.0]


def test_flat_mask_features_are_views_in_both_layouts():
    feats = torch.randn(2, 8, 5, 6)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = feats.contiguous(memory_format=layout)
        flat = flat_mask_features(x)
        assert flat.shape == (2, 8, 30) and flat.data_ptr() == x.data_ptr()
        assert torch.equal(flat, feats.flatten(2))
        kernels = torch.randn(2, 3, 8)
        torch.testing.assert_close(
            dynamic_mask_logits(x, kernels), dynamic_mask_logits(feats, kernels)
        )
