"""How the network runs over an inference batch: as one padded batch, or one image at a time."""
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from detectron2.structures import ImageList

__all__ = ["HeadOutputs", "NetworkPolicy", "mask_extent"]


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
