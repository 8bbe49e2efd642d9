"""ModulatedDeformConv2d: function, mmcv channel layout of conv_offset, gradients."""
import pytest
import torch
import torch.nn.functional as F
from devices import needs_cuda
from torch import nn

from solov2_d2.layers.deform_conv import ModulatedDeformConv2d  # isort: split
from detectron2.layers import Conv2d

# sigmoid(50) == 1.0 and sigmoid(-50) == 2e-22 in float64: a mask logit of +-50 switches a tap.
ON, OFF = 50.0, -50.0


def make_layer(*args, **kwargs):
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(*args, **kwargs).double()
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    return layer


def set_offset_mask(layer, offset_channels=None, mask_logits=ON):
    """Make conv_offset output a constant: its bias, with zero weight.

    offset_channels (dict[int, float]): value of channels of the offset tensor, indexed as the
        deform kernel reads it (cat(o1, o2)); the rest is zero. mask_logits: scalar or tensor
        (deform_groups * kh * kw) of mask logits.
    """
    kh, kw = layer.kernel_size
    num_offsets = 2 * layer.deform_groups * kh * kw
    bias = torch.zeros(layer.conv_offset.out_channels, dtype=torch.float64)
    for c, v in (offset_channels or {}).items():
        bias[c] = v
    bias[num_offsets:] = torch.as_tensor(mask_logits, dtype=torch.float64)
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.copy_(bias)


def plain_conv(layer, x, weight=None):
    weight = layer.weight if weight is None else weight
    return F.conv2d(
        x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def reference_dcn(x, offset, mask, weight, bias, stride, padding, dilation):
    """Modulated deformable conv (groups=1) by bilinear sampling, independent of torchvision.

    offset (N, dg*2*kh*kw, Ho, Wo): per deform group, (dy, dx) of tap k = i*kw + j at channels
    (2k, 2k+1); mask (N, dg*kh*kw, Ho, Wo): tap k at channel k of its group.
    """
    n, c, h, w = x.shape
    _, _, kh, kw = weight.shape
    dg = mask.shape[1] // (kh * kw)
    ho, wo = offset.shape[-2:]
    base_y = torch.arange(ho, dtype=x.dtype)[:, None] * stride - padding
    base_x = torch.arange(wo, dtype=x.dtype)[None, :] * stride - padding
    cols = x.new_zeros(n, c, kh * kw, ho, wo)
    for g in range(dg):
        xg = x[:, g * c // dg : (g + 1) * c // dg]
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            dy = offset[:, g * 2 * kh * kw + 2 * k]
            dx = offset[:, g * 2 * kh * kw + 2 * k + 1]
            py = base_y + i * dilation + dy
            px = base_x + j * dilation + dx
            # align_corners=True maps -1/+1 to the centres of the border pixels; outside is zero.
            grid = torch.stack((2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1), dim=-1)
            sampled = F.grid_sample(xg, grid, mode="bilinear", align_corners=True)
            m = mask[:, g * kh * kw + k, None]
            cols[:, g * c // dg : (g + 1) * c // dg, k] = sampled * m
    out = torch.einsum("nckhw,ock->nohw", cols, weight.flatten(2))
    return out + bias[None, :, None, None]


CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=2, deform_groups=2),
    dict(kernel_size=5, stride=2, padding=2, deform_groups=4),
    dict(kernel_size=(3, 1), padding=(1, 0), groups=4, bias=False),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_zero_offset_mask_one_is_conv(cfg):
    layer = make_layer(4, 8, **cfg)
    set_offset_mask(layer)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain_conv(layer, x))


def test_init_is_conv_with_half_mask():
    layer = make_layer(4, 6, 3, padding=1)
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kernel_size,padding", [(3, 1), (1, 0)])
def test_integer_offset_is_shift(kernel_size, padding):
    """dx = +1 for every tap reads one pixel to the right: the output moves one pixel left."""
    layer = make_layer(3, 5, kernel_size, padding=padding)
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    ref = plain_conv(layer, x)
    taps = kernel_size * kernel_size
    set_offset_mask(layer, {2 * k + 1: 1.0 for k in range(taps)})
    torch.testing.assert_close(layer(x)[..., :-1], ref[..., 1:])
    set_offset_mask(layer, {2 * k: 1.0 for k in range(taps)})
    torch.testing.assert_close(layer(x)[..., :-1, :], ref[..., 1:, :])


def test_single_tap_offset_and_mask_channels():
    """Channel 2k / 2k+1 of the offset and channel 2*9 + k of conv_offset belong to tap k."""
    layer = make_layer(3, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for k in (0, 5):
        logits = torch.full((9,), OFF)
        logits[k] = ON
        tap_only = torch.zeros_like(layer.weight)
        tap_only.view(4, 3, 9)[:, :, k] = layer.weight.view(4, 3, 9)[:, :, k]
        set_offset_mask(layer, mask_logits=logits)
        torch.testing.assert_close(layer(x), plain_conv(layer, x, tap_only))
        # Shifting only tap k right by one moves this single-tap output left by one.
        set_offset_mask(layer, {2 * k + 1: 1.0}, mask_logits=logits)
        ref = plain_conv(layer, x, tap_only)
        torch.testing.assert_close(layer(x)[..., :-1], ref[..., 1:])


def test_mask_scaling_is_linear():
    layer = make_layer(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    set_offset_mask(layer, {1: 0.3, 6: -0.7})
    out_one = layer(x) - layer.bias[:, None, None]
    for p in (0.25, 0.5, 0.9):
        set_offset_mask(layer, {1: 0.3, 6: -0.7}, mask_logits=torch.logit(torch.tensor(p)))
        torch.testing.assert_close(layer(x) - layer.bias[:, None, None], p * out_one)


def test_conv_offset_chunk_layout_two_deform_groups():
    """mmcv layout: conv_offset = (o1, o2, m) in three equal chunks, offset = cat(o1, o2).

    With 2 deform groups and a 3x3 kernel, chunk o1 (channels 0..17) holds group 0's (dy, dx)
    pairs, o2 (18..35) group 1's, m (36..53) the 9 + 9 mask logits.
    """
    layer = make_layer(4, 6, 3, padding=1, deform_groups=2)
    assert layer.conv_offset.out_channels == 54
    x = torch.randn(1, 4, 7, 8, dtype=torch.float64)
    w0, w1 = layer.weight.clone(), layer.weight.clone()
    w0[:, 2:] = 0  # the part of the conv that reads deform group 0 (input channels 0, 1)
    w1[:, :2] = 0
    bias = layer.bias[:, None, None]
    part0 = plain_conv(layer, x, w0) - bias
    part1 = plain_conv(layer, x, w1) - bias

    # Group 1 taps shifted right by one (dx at 18 + 2k + 1), group 1 masked off (logits 45..53).
    set_offset_mask(layer, {18 + 2 * k + 1: 1.0 for k in range(9)})
    out = layer(x)
    torch.testing.assert_close(out[..., :-1], part0[..., :-1] + part1[..., 1:] + bias)
    logits = torch.tensor([ON] * 9 + [OFF] * 9)
    set_offset_mask(layer, {18 + 2 * k + 1: 1.0 for k in range(9)}, mask_logits=logits)
    torch.testing.assert_close(layer(x), part0 + bias)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=2, dilation=2, deform_groups=2),
        dict(kernel_size=1),
    ],
)
def test_random_offsets_match_bilinear_reference(cfg):
    layer = make_layer(4, 5, **cfg)
    with torch.no_grad():
        nn.init.normal_(layer.conv_offset.weight, std=0.3)
        nn.init.normal_(layer.conv_offset.bias)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    o1, o2, m = torch.chunk(layer.conv_offset(x), 3, dim=1)
    expected = reference_dcn(
        x,
        torch.cat((o1, o2), dim=1),
        m.sigmoid(),
        layer.weight,
        layer.bias,
        layer.stride[0],
        layer.padding[0],
        layer.dilation[0],
    )
    torch.testing.assert_close(layer(x), expected.detach())


def test_gradients_reach_all_inputs():
    layer = make_layer(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    with torch.no_grad():
        nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for name, t in [("input", x)] + list(layer.named_parameters()):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    # torchvision's analytic gradients agree with finite differences.
    small = make_layer(2, 2, 3, padding=1)
    with torch.no_grad():
        nn.init.normal_(small.conv_offset.weight, std=0.2)
        nn.init.normal_(small.conv_offset.bias, std=0.5)
    xs = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(small, (xs,))


def test_norm_and_activation_as_detectron2_conv2d():
    norm = nn.GroupNorm(2, 6).double()
    with torch.no_grad():
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    layer = make_layer(4, 6, 3, padding=1, bias=False, norm=norm, activation=F.relu)
    assert layer.norm is norm
    set_offset_mask(layer)
    conv = Conv2d(4, 6, 3, padding=1, bias=False, norm=norm, activation=F.relu).double()
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, conv(x))
    assert (out >= 0).all() and (out == 0).any()


def test_parameter_names_and_shapes_match_mmcv():
    norm = nn.BatchNorm2d(64)
    layer = ModulatedDeformConv2d(64, 64, 3, padding=1, bias=False, norm=norm)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes["weight"] == (64, 64, 3, 3)
    assert shapes["conv_offset.weight"] == (27, 64, 3, 3)
    assert shapes["conv_offset.bias"] == (27,)
    assert "bias" not in shapes and "norm.running_mean" in shapes
    # mmdet's R101-DCN mask predictor: a 1x1 DCN with 3 offset/mask channels.
    pred = ModulatedDeformConv2d(128, 256, 1)
    assert tuple(pred.conv_offset.weight.shape) == (3, 128, 1, 1)
    assert pred(torch.randn(1, 128, 5, 5)).shape == (1, 256, 5, 5)


def test_empty_input_and_invalid_groups():
    layer = ModulatedDeformConv2d(4, 6, 3, padding=1)
    assert layer(torch.zeros(0, 4, 5, 5)).shape == (0, 6, 5, 5)
    with pytest.raises(ValueError, match="deform_groups"):
        ModulatedDeformConv2d(4, 6, 3, deform_groups=3)
    with pytest.raises(ValueError, match="groups"):
        ModulatedDeformConv2d(4, 6, 3, groups=4)


@needs_cuda
def test_cuda_matches_cpu():
    layer = make_layer(8, 16, 3, padding=1, deform_groups=2).float()
    with torch.no_grad():
        nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 8, 12, 12)
    expected = layer(x)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
