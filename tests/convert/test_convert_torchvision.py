"""`--from torchvision`: ImageNet ResNets as backbone initialisation.

A plain torchvision-style ResNet is written here (conv1/bn1/layerN/downsample, stride in the 3x3
conv, ImageNet normalisation of RGB input); its weights, converted, must make our backbone
compute the same res2..res5 features from the same image, normalised by the converted config.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from solov2_d2.convert import ConversionError, convert_state_dict  # isort: split

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from solov2_d2.convert.overrides import model_cfg


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        width = planes * base_width // 64 * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # The stride sits in the 3x3 conv, as in torchvision.
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ReferenceResNet(nn.Module):
    """torchvision's ResNet layout, returning the outputs of layer1..layer4."""

    def __init__(self, block, layers, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                block_stride = stride if b == 0 else 1
                stage.append(
                    block(inplanes, planes, block_stride, downsample, groups, width_per_group)
                )
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(inplanes, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


def imagenet_weights(model, seed):
    """Random weights and BatchNorm statistics of a sensible scale, as a state dict."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=gen) + 0.5
        elif name.endswith("conv1.weight") or ".conv" in name or "downsample.0" in name:
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=gen) * (1.0 / fan_in) ** 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=gen) * 0.1 + (
                1.0 if name.endswith(".weight") and tensor.dim() == 1 else 0.0
            )
    return state


@pytest.mark.parametrize(
    "block, layers, variant",
    [
        (BasicBlock, [2, 2, 2, 2], "SOLOv2_Light_448_R18_3x"),
        (Bottleneck, [3, 4, 6, 3], "SOLOv2_R50_3x"),
    ],
    ids=["R18", "R50"],
)
def test_converted_backbone_computes_the_reference_features(block, layers, variant):
    reference = ReferenceResNet(block, layers).eval()
    weights = imagenet_weights(reference, seed=len(layers) + sum(layers))
    reference.load_state_dict(weights)

    result = convert_state_dict(weights, source="torchvision")
    assert result.variant.name == variant
    assert all(k.startswith("backbone.bottom_up.") for k in result.state_dict)
    assert set(result.dropped) == {"fc.weight", "fc.bias"} | {
        k for k in weights if k.endswith("num_batches_tracked")
    }
    # The heads and the FPN keep their initialisation, and are listed as such.
    assert "ins_head.cate_pred.weight" in result.left_at_init
    assert "backbone.fpn_lateral2.weight" in result.left_at_init
    assert not any(k.startswith("backbone.bottom_up.") for k in result.left_at_init)

    cfg = model_cfg(result.overrides)
    bottom_up = build_backbone(cfg, ShapeSpec(channels=3)).bottom_up.eval()
    bottom_up.load_state_dict(
        {k[len("backbone.bottom_up."):]: v for k, v in result.state_dict.items()}, strict=True
    )

    image = torch.randint(0, 256, (1, 3, 96, 128), generator=torch.Generator().manual_seed(0))
    image = image.float()  # RGB, 0..255, as detectron2 feeds INPUT.FORMAT "RGB"
    assert cfg.INPUT.FORMAT == "RGB"
    ours_in = (image - torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(
        cfg.MODEL.PIXEL_STD
    ).view(3, 1, 1)
    # torchvision's ImageNet preprocessing: [0, 1] then mean/std.
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    reference_in = (image / 255.0 - imagenet_mean) / imagenet_std

    with torch.no_grad():
        expected = reference(reference_in)
        ours = bottom_up(ours_in)
    for i, feature in enumerate(expected):
        got = ours[f"res{i + 2}"]
        assert got.shape == feature.shape
        torch.testing.assert_close(got, feature, rtol=1e-4, atol=1e-4 * feature.abs().max())


def test_resnext_is_detected_and_starts_the_dcn_variant():
    """ResNeXt-101 64x4d, read off shapes only (meta tensors): its only published variant has
    DCN, whose offsets the ImageNet weights cannot provide; they stay at initialisation."""
    with torch.device("meta"):
        reference = ReferenceResNet(Bottleneck, [3, 4, 23, 3], groups=64, width_per_group=4)
    result = convert_state_dict(reference.state_dict(), source="torchvision")

    assert result.variant.name == "SOLOv2_X101_DCN_3x"
    resnets = result.overrides["MODEL"]["RESNETS"]
    assert (resnets["DEPTH"], resnets["NUM_GROUPS"], resnets["WIDTH_PER_GROUP"]) == (101, 64, 4)
    assert resnets["STRIDE_IN_1X1"] is False
    assert "backbone.bottom_up.res4.22.conv2.conv_offset.weight" in result.left_at_init
    assert "backbone.bottom_up.res4.22.conv2.weight" in result.state_dict


def test_requested_config_of_another_depth_is_refused():
    with torch.device("meta"):
        reference = ReferenceResNet(BasicBlock, [2, 2, 2, 2])
    with pytest.raises(ConversionError, match="ResNet-18 backbone; config SOLOv2_R50_3x expects"):
        convert_state_dict(reference.state_dict(), source="torchvision", config="SOLOv2_R50_3x")
