import math

import pytest
import torch

import solov2_d2  # noqa: F401
from solov2_d2.layers.deform_conv import ModulatedDeformConv2d
from solov2_d2.modeling.heads import (
    SOLOv2InstanceHead,
    SOLOv2MaskHead,
    coordinate_channels,
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
