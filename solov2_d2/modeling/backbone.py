"""ResNet + FPN backbone of SOLOv2, with modulated deformable convs (DCNv2) where configured."""
import fvcore.nn.weight_init as weight_init

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from ..layers.deform_conv import ModulatedDeformConv2d

__all__ = ["build_solov2_resnet_fpn_backbone"]


def _check_deform_config(cfg):
    """Raise ValueError for DCN settings this backbone does not support."""
    r = cfg.MODEL.RESNETS
    if len(r.DEFORM_ON_PER_STAGE) != 4:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one entry per stage res2..res5, "
            f"got {list(r.DEFORM_ON_PER_STAGE)}."
        )
    if not any(r.DEFORM_ON_PER_STAGE):
        return
    if r.DEPTH in (18, 34):
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE = {list(r.DEFORM_ON_PER_STAGE)} is not supported "
            f"with MODEL.RESNETS.DEPTH = {r.DEPTH}: deformable convs replace the 3x3 conv of "
            "bottleneck blocks (depth 50, 101, 152) only."
        )
    if not r.DEFORM_MODULATED:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_MODULATED = False is not supported: SOLOv2 backbones use "
            "modulated deformable convs (DCNv2). Set MODEL.RESNETS.DEFORM_MODULATED = True."
        )


def _to_deformable(conv, deform_groups):
    """
    A :class:`ModulatedDeformConv2d` with the geometry of the 3x3 conv ``conv`` of a
    :class:`detectron2.modeling.backbone.resnet.BottleneckBlock`, taking over its norm.
    """
    deform = ModulatedDeformConv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        deform_groups=deform_groups,
        bias=conv.bias is not None,
        norm=conv.norm,
    )
    # The init detectron2 gives every ResNet conv, its DeformBottleneckBlock's included.
    weight_init.c2_msra_fill(deform)
    return deform


@BACKBONE_REGISTRY.register()
def build_solov2_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Detectron2's :func:`build_resnet_fpn_backbone` (ResNet/ResNeXt per ``MODEL.RESNETS``, FPN per
    ``MODEL.FPN`` with P6 by stride-2 subsampling of P5, as mmdetection's extra level), where the
    3x3 conv (``conv2``) of every block of the stages enabled in
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` is a :class:`ModulatedDeformConv2d` with
    ``MODEL.RESNETS.DEFORM_NUM_GROUPS`` deform groups. Without deformable stages it is exactly
    :func:`build_resnet_fpn_backbone`.

    Detectron2's own deformable blocks need its compiled ops and name their offset conv
    ``conv2_offset``; here the offsets are predicted by ``conv2.conv_offset``, the layout of
    mmdetection's DCN ResNets, so their checkpoints map one to one.

    Returns:
        FPN: a :class:`detectron2.modeling.backbone.FPN` with outputs p2..p6 for the default
        ``MODEL.FPN.IN_FEATURES`` (res2..res5).
    """
    _check_deform_config(cfg)
    deform_on_per_stage = cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE
    plain_cfg = cfg.clone()
    plain_cfg.defrost()
    plain_cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    backbone = build_resnet_fpn_backbone(plain_cfg, input_shape)

    bottom_up = backbone.bottom_up
    # ResNet builds only the stages up to its last output feature.
    for stage, deform_on in zip(bottom_up.stages, deform_on_per_stage):
        if deform_on:
            for block in stage:
                block.conv2 = _to_deformable(block.conv2, cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS)
    # The new convs start trainable: freeze again what MODEL.BACKBONE.FREEZE_AT covers.
    bottom_up.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
    return backbone
