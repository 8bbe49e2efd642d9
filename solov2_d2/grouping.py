"""Grouping items of varied sizes (masks, blocks, components) into batches of similar sizes.

Batched tensor operations need equal sizes within a batch: items are padded to the largest of
their group, and grouping by ceil(log2(size)) bounds the padding to a factor 2 per size while
keeping the number of groups, hence of operations, logarithmic in the sizes.
"""
from typing import Iterator, List, Tuple

import torch

__all__ = ["ceil_log2", "groups"]


def ceil_log2(values: torch.Tensor) -> torch.Tensor:
    """int64 ceil(log2(v)) of int64 values >= 1, exactly (0 for 1)."""
    return torch.frexp((values - 1).double()).exponent.long()


def groups(
    bins: torch.Tensor, used: torch.Tensor, num_bins: int, *sizes: torch.Tensor
) -> Iterator[Tuple[torch.Tensor, List[int]]]:
    """The items of each non-empty bin, in bin order.

    Args:
        bins: int64 [M], each item's bin in [0, num_bins) (ignored where not `used`).
        used: bool [M]; unused items are in no group.
        sizes: int64 [M] each, item sizes.
    Yields:
        (items, maxima): int64 [n] indices of the bin's items, and per tensor of `sizes` the
        largest size in the bin (host ints). The groups' sizes are read to the host at once.
    """
    bins = torch.where(used, bins, num_bins)
    stats = [bins.new_zeros(num_bins + 1).index_add_(0, bins, used.long())]
    for size in sizes:
        stats.append(size.new_zeros(num_bins + 1).scatter_reduce(0, bins, size, reduce="amax"))
    order = torch.sort(bins, stable=True).indices
    start = 0
    for count, *maxima in zip(*torch.stack(stats)[:, :-1].tolist()):
        if count:
            yield order[start : start + count], maxima
        start += count
