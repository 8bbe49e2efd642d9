"""Pairwise intersections of binary masks, the work of Matrix NMS: a plain float32 matrix
product, and an exact int8 one that the CPU runs faster."""
import torch

__all__ = ["mask_intersections", "mask_intersections_float", "mask_intersections_int8"]


def mask_intersections(masks: torch.Tensor) -> torch.Tensor:
    """float32 [B, N, N] pixel counts |m_i & m_j| of binary masks [B, N, P] (bool or 0/1).

    Bool masks on the CPU take the int8 path (identical counts); everything else, the plain one,
    and so does an export (the int8 path reinterprets memory and loops over the images).
    """
    cpu_bool = masks.dtype == torch.bool and masks.device.type == "cpu"
    if cpu_bool and masks.shape[2] >= 8 and not torch.compiler.is_exporting():
        return mask_intersections_int8(masks)
    return mask_intersections_float(masks)


def mask_intersections_float(masks: torch.Tensor) -> torch.Tensor:
    """The plain path: one float32 batched matrix product. 0/1 products summed in float32 are
    exact integers up to 2^24 pixels per mask."""
    flat = masks.float()
    return torch.bmm(flat, flat.transpose(1, 2))


def mask_intersections_int8(masks: torch.Tensor) -> torch.Tensor:
    """bool masks [B, N, P] read as int8 (no copy) through an int8 matrix product accumulated in
    int32: exact counts up to 2^31 pixels, with a quarter of the memory traffic of float32."""
    as_int8 = masks.contiguous().view(torch.int8)
    # torch._int_mm multiplies 2-D matrices; the loop is over the images of a batch.
    counts = [torch._int_mm(x, x.t()) for x in as_int8]
    if not counts:
        return masks.new_zeros((0, masks.shape[1], masks.shape[1]), dtype=torch.float32)
    return torch.stack(counts).float()
