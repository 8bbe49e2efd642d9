"""The SOLOv2 meta-architecture: backbone + FPN, kernel/category head, mask-feature head."""
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances

from ..checks import instances_with_masks
from ..config import check_solov2_config
from ..inference.cpu import CPUCandidateMasks
from ..inference.pipeline import SOLOv2PostProcessor
from ..layers.dynamic_conv import flatten_levels
from .heads import SOLOv2InstanceHead, SOLOv2MaskHead
from .losses import category_focal_loss, positive_cells_dice_loss
from .targets import SOLOv2Targets, assign_targets

__all__ = ["HeadOutputs", "NetworkPolicy", "SOLOv2", "check_finite_image", "mask_extent"]


class HeadOutputs(NamedTuple):
    """The network's outputs for a batch.

    cate_logits: per level [B, C, S_l, S_l]; kernels: per level [B, D, S_l, S_l];
    mask_features: [B, E, H_m, W_m]; mask_extents: per image (h_m, w_m), the part of the mask
    features computed for that image (its input padded to the size divisibility, divided by the
    mask stride).
    """

    cate_logits: List[torch.Tensor]
    kernels: List[torch.Tensor]
    mask_features: torch.Tensor
    mask_extents: List[Tuple[int, int]]


@dataclass(frozen=True)
class NetworkPolicy:
    """per_image: run the network on each image padded on its own, so that an image's results do
    not depend on the other images of its batch (the S x S grids cover the padded input, so a
    larger neighbour would move every cell); otherwise on the whole batch, padded to its
    largest image. channels_last: run in NHWC layout, which oneDNN's CPU convolutions prefer
    (the layout propagates through the network; weights need no conversion).
    """

    per_image: bool
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device) -> "NetworkPolicy":
        """One image at a time in channels-last layout on the CPU, where a batch costs as much
        per image as single images; the whole batch elsewhere."""
        cpu = torch.device(device).type == "cpu"
        return cls(per_image=cpu, channels_last=cpu)

    def run(
        self,
        network: Callable[[torch.Tensor], Tuple[List[torch.Tensor], ...]],
        images: List[torch.Tensor],
        size_divisibility: int,
        mask_stride: int,
    ) -> HeadOutputs:
        """
        Args:
            network: normalised padded batch [B, 3, H, W] -> (category logits per level,
                kernels per level, mask features), as `SOLOv2.network`.
            images: normalised [3, H_i, W_i] images.
            size_divisibility: the backbone's padding multiple.
            mask_stride: stride of the mask features.
        """
        if self.per_image:
            batches = [ImageList.from_tensors([x], size_divisibility).tensor for x in images]
        else:
            batches = [ImageList.from_tensors(images, size_divisibility).tensor]
        if self.channels_last:
            batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
        outputs = [network(x) for x in batches]
        extents = [
            tuple(mask_extent(s, size_divisibility, mask_stride) for s in image.shape[-2:])
            for image in images
        ]
        if len(outputs) == 1:  # nothing to concatenate (a copy of the mask features)
            cate_logits, kernels, mask_features = outputs[0]
        else:
            cates, kernels, masks = zip(*outputs)
            cate_logits = [torch.cat(level) for level in zip(*cates)]
            kernels = [torch.cat(level) for level in zip(*kernels)]
            height = max(m.shape[2] for m in masks)
            width = max(m.shape[3] for m in masks)
            mask_features = torch.cat(
                [F.pad(m, (0, width - m.shape[3], 0, height - m.shape[2])) for m in masks]
            )
        size = mask_features.shape[-2:]
        extents = [(min(h, size[0]), min(w, size[1])) for h, w in extents]
        return HeadOutputs(cate_logits, kernels, mask_features, extents)


def mask_extent(size, size_divisibility: int, mask_stride: int):
    """The mask features computed for an image side of `size` pixels (an int, or an int64 tensor
    of sizes): the side padded to `size_divisibility`, divided by `mask_stride`, rounded up."""
    padded = -(-size // size_divisibility) * size_divisibility if size_divisibility > 0 else size
    return -(-padded // mask_stride)


@META_ARCH_REGISTRY.register()
class SOLOv2(nn.Module):
    """SOLOv2 (Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020).

    In training, `forward` returns the losses `loss_cate` and `loss_mask`; in inference, one
    `{"instances": Instances}` per image with `pred_masks`, `scores`, `pred_classes` and
    `pred_boxes`, as detectron2's evaluators and `DefaultPredictor` expect.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        ins_head: nn.Module,
        mask_head: nn.Module,
        postprocessor: SOLOv2PostProcessor,
        instance_in_features: Sequence[str],
        instance_resize_to: Sequence[Optional[str]],
        mask_in_features: Sequence[str],
        num_grids: Sequence[int],
        scale_ranges: Sequence[Sequence[float]],
        sigma: float,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 3.0,
        mask_loss_pairs: str = "all",
        network_policy: Optional[NetworkPolicy] = None,
    ):
        """
        Args:
            backbone: a detectron2 backbone whose outputs include the features named below.
            ins_head: the kernel/category head (:class:`SOLOv2InstanceHead`).
            mask_head: the mask-feature head (:class:`SOLOv2MaskHead`).
            postprocessor: inference from head outputs (:class:`SOLOv2PostProcessor`).
            instance_in_features: backbone features of the kernel/category branch, one per level.
            instance_resize_to: per level, None or the name of the backbone feature whose size
                the level is resized to (SOLOv2 halves P2 and brings P6 to P5's size).
            mask_in_features: backbone features of the mask branch, finest first.
            num_grids, scale_ranges, sigma: target assignment (see :func:`assign_targets`).
            num_classes: number of categories.
            pixel_mean, pixel_std: input normalisation, in the channel order of the input.
            focal_alpha, focal_gamma, focal_weight: category loss.
            dice_weight: weight of the mask (Dice) loss.
            mask_loss_pairs: the (cell, instance) pairs the Dice loss averages over,
                "all" (each instance on each cell it claims, as the references) or
                "last_owner" (each positive cell with its category's instance only); see
                :meth:`SOLOv2Targets.mask_pairs`.
            network_policy: how the network runs over an inference batch; None: chosen by
                device at each call (:meth:`NetworkPolicy.for_device`).
        """
        super().__init__()
        self.backbone = backbone
        self.ins_head = ins_head
        self.mask_head = mask_head
        self.postprocessor = postprocessor
        self.instance_in_features = list(instance_in_features)
        self.instance_resize_to = list(instance_resize_to)
        self.mask_in_features = list(mask_in_features)
        self.num_grids = list(num_grids)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.sigma = sigma
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        if mask_loss_pairs not in ("all", "last_owner"):
            raise ValueError(
                f"mask_loss_pairs = {mask_loss_pairs!r}; expected 'all' or 'last_owner'."
            )
        self.mask_loss_pairs = mask_loss_pairs
        self.network_policy = network_policy
        self.mask_stride = backbone.output_shape()[self.mask_in_features[0]].stride
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        check_solov2_config(cfg)
        c = cfg.MODEL.SOLOV2
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        for key in ("INSTANCE_IN_FEATURES", "MASK_IN_FEATURES"):
            missing = [f for f in c[key] if f not in shapes]
            if missing:
                raise ValueError(
                    f"MODEL.SOLOV2.{key} names {missing}, which the backbone "
                    f"({cfg.MODEL.BACKBONE.NAME}) does not output; it has {sorted(shapes)}."
                )
        strides = {name: s.stride for name, s in shapes.items()}
        by_stride = {s: name for name, s in strides.items()}
        resize_to = []
        for name, stride in zip(c.INSTANCE_IN_FEATURES, c.INSTANCE_STRIDES):
            if shapes[name].stride == stride:
                resize_to.append(None)
            elif stride in by_stride:
                resize_to.append(by_stride[stride])
            else:
                raise ValueError(
                    f"MODEL.SOLOV2.INSTANCE_STRIDES asks for stride {stride} for {name}, but no "
                    f"backbone feature has that stride ({strides})."
                )
        mask_strides = [shapes[f].stride for f in c.MASK_IN_FEATURES]
        if any(b != 2 * a for a, b in zip(mask_strides, mask_strides[1:])):
            raise ValueError(
                f"MODEL.SOLOV2.MASK_IN_FEATURES {list(c.MASK_IN_FEATURES)} have strides "
                f"{mask_strides}; each level must have twice the stride of the previous one."
            )
        return {
            "backbone": backbone,
            "ins_head": SOLOv2InstanceHead(cfg, [shapes[f] for f in c.INSTANCE_IN_FEATURES]),
            "mask_head": SOLOv2MaskHead(cfg, [shapes[f] for f in c.MASK_IN_FEATURES]),
            "postprocessor": SOLOv2PostProcessor(
                cfg, mask_stride=mask_strides[0], fast_masks=CPUCandidateMasks
            ),
            "instance_in_features": c.INSTANCE_IN_FEATURES,
            "instance_resize_to": resize_to,
            "mask_in_features": c.MASK_IN_FEATURES,
            "num_grids": c.NUM_GRIDS,
            "scale_ranges": c.SCALE_RANGES,
            "sigma": c.SIGMA,
            "num_classes": c.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "focal_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_gamma": c.FOCAL_LOSS_GAMMA,
            "focal_weight": c.FOCAL_LOSS_WEIGHT,
            "dice_weight": c.DICE_LOSS_WEIGHT,
            "mask_loss_pairs": c.MASK_LOSS_PAIRS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: per image, a dict as produced by detectron2's `DatasetMapper`:
                "image": uint8/float [C, H, W] in the model's input format; in training
                "instances" with `gt_boxes`, `gt_classes` and `gt_masks` (polygons or
                bitmasks; an image without instances may lack them); optional "height",
                "width": the output size in inference.
        Returns:
            training: dict of scalar losses; inference: list of {"instances": Instances}.
        """
        if not self.training:
            return self.inference(batched_inputs)
        if len(batched_inputs) == 0:
            raise ValueError(
                "SOLOv2 training got an empty batch (no input dicts): give at least one image "
                "with its 'instances'."
            )
        if "instances" not in batched_inputs[0]:
            raise ValueError("SOLOv2 training needs 'instances' in every input dict.")
        images = ImageList.from_tensors(
            self.preprocess_image(batched_inputs), self.backbone.size_divisibility
        )
        gt_instances = [
            instances_with_masks(x["instances"].to(self.device)) for x in batched_inputs
        ]
        # Targets depend only on the ground truth: assigned before the network runs.
        targets = self.assign_targets(gt_instances, images.tensor.shape[-2:])
        cate_logits, kernels, mask_features = self.network(images.tensor)
        return self.losses(
            cate_logits, kernels, mask_features, gt_instances, images.tensor.shape[-2:], targets
        )

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Detections for a batch, the network run as `network_policy` says (by default
        :meth:`NetworkPolicy.for_device`: one image at a time on the CPU). No inputs: []."""
        if len(batched_inputs) == 0:
            return []
        for i, x in enumerate(batched_inputs):
            if min(x.get("height", 1), x.get("width", 1)) < 1:
                raise ValueError(
                    f"Input {i}: output size {x.get('height')} x {x.get('width')} (\"height\", "
                    "\"width\"); expected positive sizes, or leave them out for the input's size."
                )
        images = self.preprocess_image(batched_inputs)
        policy = self.network_policy or NetworkPolicy.for_device(self.device)
        outputs = policy.run(
            self.network, images, self.backbone.size_divisibility, self.mask_stride
        )
        image_sizes = [tuple(x.shape[-2:]) for x in images]
        output_sizes = [
            (x.get("height", size[0]), x.get("width", size[1]))
            for x, size in zip(batched_inputs, image_sizes)
        ]
        results = self.postprocessor(
            outputs.cate_logits,
            outputs.kernels,
            outputs.mask_features,
            outputs.mask_extents,
            image_sizes,
            output_sizes,
        )
        return [{"instances": r} for r in results]

    def network(self, x: torch.Tensor):
        """Backbone and heads of a normalised, padded batch [B, 3, H, W]: per-level category
        logits [B, C, S, S], per-level kernels [B, D, S, S] and mask features [B, E, H/4, W/4]."""
        features = self.backbone(x)
        cate_logits, kernels = self.ins_head(self._instance_features(features))
        mask_features = self.mask_head([features[f] for f in self.mask_in_features])
        return cate_logits, kernels, mask_features

    def preprocess_image(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """The input images, normalised: float [3, H_i, W_i] each."""
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"].to(self.device)
            check_finite_image(image, f"Input {i}")
            channels = self.pixel_mean.shape[0]
            if image.dim() != 3 or image.shape[0] not in (1, channels):
                raise ValueError(
                    f"Input {i}: image of shape {tuple(image.shape)}; expected [C, H, W] with "
                    f"C = {channels} (in INPUT.FORMAT order) or 1 (grayscale, replicated). "
                    "Convert 4-channel images first, e.g. cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)."
                )
            image = image.expand(channels, -1, -1)
            images.append((image - self.pixel_mean) / self.pixel_std)
        return images

    def _instance_features(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The kernel/category branch's input per level, resized to the level's stride."""
        out = []
        for name, target in zip(self.instance_in_features, self.instance_resize_to):
            x = features[name]
            if target is not None:
                size = features[target].shape[-2:]
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(x)
        return out

    def assign_targets(self, gt_instances: List[Instances], padded_size) -> SOLOv2Targets:
        """Category and mask targets of every cell (:func:`assign_targets`) for ground truth on
        the model's device and the padded batch's (H, W)."""
        return assign_targets(
            gt_instances,
            tuple(padded_size),
            self.num_grids,
            self.scale_ranges,
            self.sigma,
            self.num_classes,
            self.mask_stride,
        )

    def losses(
        self,
        cate_logits: List[torch.Tensor],
        kernels: List[torch.Tensor],
        mask_features: torch.Tensor,
        gt_instances: List[Instances],
        padded_size,
        targets: Optional[SOLOv2Targets] = None,
    ) -> Dict[str, torch.Tensor]:
        """Focal loss on every cell (over positive cells + 1), Dice loss on the mask of every
        positive (cell, instance) pair chosen by `mask_loss_pairs` (mean over the pairs).

        Target assignment runs on the device without host synchronisation; the Dice loss
        synchronises once (the number of pairs per image) and computes the masks of the pairs
        in chunks of bounded memory (:func:`positive_cells_dice_loss`).
        Both losses are computed in float32 under autocast.

        Args:
            cate_logits, kernels: per level [B, C, S, S] and [B, D, S, S] from the head.
            mask_features: [B, E, H_m, W_m].
            gt_instances: per image, the ground truth, on the model's device.
            padded_size: (H, W) of the padded batch.
            targets: those of :meth:`assign_targets`, if already assigned.
        Returns:
            "loss_cate" and "loss_mask", float32 scalars.
        """
        if targets is None:
            targets = self.assign_targets(gt_instances, padded_size)
        logits = flatten_levels(cate_logits)
        loss_cate = category_focal_loss(
            logits.reshape(-1, logits.shape[-1]),
            targets.labels.reshape(-1),
            (targets.matched >= 0).sum(),
            self.focal_alpha,
            self.focal_gamma,
        )
        pair_instances, pair_cells = targets.mask_pairs(self.mask_loss_pairs)
        loss_mask = positive_cells_dice_loss(
            mask_features, flatten_levels(kernels), targets.masks, pair_instances, pair_cells
        )
        return {
            "loss_cate": loss_cate * self.focal_weight,
            "loss_mask": loss_mask * self.dice_weight,
        }


def check_finite_image(image: torch.Tensor, what: str) -> None:
    """Raise ValueError when a float image (`what`, e.g. "Input 0", names it in the message)
    holds NaN or infinite values: the network would spread them into NaN scores and return no
    detection, silently."""
    if not image.is_floating_point():
        return
    finite = torch.isfinite(image)
    if not finite.all():
        raise ValueError(
            f"{what}: image of shape {tuple(image.shape)} has "
            f"{int(finite.numel() - finite.sum())} non-finite values (NaN or inf); replace "
            "them first (e.g. np.nan_to_num) or drop the image."
        )
