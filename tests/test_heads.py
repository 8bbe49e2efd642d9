import math

import pytest
import torch
import torch.nn.functional as F

import solov2_d2  # noqa: F401
from solov2_d2.deform_conv import ModulatedDeformConv2d
from solov2_d2.heads import (
    SOLOv2InstanceHead,
    SOLOv2MaskHead,
    coordinate_channels,
    dynamic_mask_logits,
    flat_mask_features,
    flatten_levels,
)

GRIDS = [40, 36, 24, 16, 12]


def _level_features(batch=2, channels=256, size=(64, 96)):
    """P2..P6 resized as SOLOv2 uses them: strides 8, 8, 16, 32, 32 of a padded input."""
    h, w = size
    return [torch.randn(batch, channels, h // s, w // s) for s in (8, 8, 16, 32, 32)]


@pytest.mark.parametrize(
    "channels,num_convs,kernel_dim,dcn",
    [
        (512, 4, 256, "none"),  # standard
        (256, 2, 128, "none"),  # light
        (64, 4, 256, "all"),  # R101-DCN layout (narrow: CPU deformable convs are slow)
        (64, 3, 128, "last"),  # light 512 DCN layout
    ],
)
def test_instance_head_shapes_for_every_level(channels, num_convs, kernel_dim, dcn):
    head = SOLOv2InstanceHead(
        in_channels=256,
        num_classes=7,
        num_grids=GRIDS,
        channels=channels,
        num_convs=num_convs,
        kernel_dim=kernel_dim,
        dcn_in_tower=dcn,
    )
    with torch.no_grad():
        cate, kernels = head(_level_features(batch=1))
    assert [tuple(c.shape) for c in cate] == [(1, 7, s, s) for s in GRIDS]
    assert [tuple(k.shape) for k in kernels] == [(1, kernel_dim, s, s) for s in GRIDS]
    deformable = [isinstance(m, ModulatedDeformConv2d) for m in head.kernel_tower]
    expected = {
        "none": [False] * num_convs,
        "all": [True] * num_convs,
        "last": [False] * (num_convs - 1) + [True],
    }[dcn]
    assert deformable == expected
    assert deformable == [isinstance(m, ModulatedDeformConv2d) for m in head.cate_tower]
    # CoordConv: only the kernel tower's first conv sees the two coordinate channels.
    assert head.kernel_tower[0].weight.shape[1] == 258
    assert head.cate_tower[0].weight.shape[1] == 256
    assert head.cate_pred.bias.detach() == pytest.approx(
        torch.full((7,), -math.log(0.99 / 0.01)), abs=1e-6
    )


@pytest.mark.parametrize("mask_dim,deformable", [(256, False), (128, False), (256, True)])
def test_mask_head_output_at_stride_4(mask_dim, deformable):
    head = SOLOv2MaskHead(in_channels=256, num_levels=4, mask_dim=mask_dim, deformable=deformable)
    feats = [torch.randn(2, 256, 64 // s, 96 // s, requires_grad=True) for s in (4, 8, 16, 32)]
    out = head(feats)
    assert out.shape == (2, mask_dim, 16, 24)
    assert [len(convs) for convs in head.level_convs] == [1, 1, 2, 3]
    assert head.level_convs[3][0].weight.shape[1] == 258  # coordinates on the deepest level
    assert head.level_convs[2][0].weight.shape[1] == 256
    assert isinstance(head.conv_pred, ModulatedDeformConv2d) == deformable
    out.sum().backward()  # the level sum is out of place: backward must work
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_coordinate_channels():
    c = coordinate_channels(torch.zeros(3, 5, 4, 6))
    assert c.shape == (3, 2, 4, 6)
    assert torch.allclose(c[0, 0, 0], torch.linspace(-1, 1, 6))  # x varies along width
    assert torch.allclose(c[0, 1, :, 0], torch.linspace(-1, 1, 4))  # y along height
    assert torch.equal(c[0, 0, 0], c[2, 0, 3])


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
