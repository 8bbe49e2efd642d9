"""Grouping of (key, item) pairs into batched matrix products of similar widths, for the CPU's
fast paths: one product per key (a block of pixels), its items (candidates) as rows."""
from typing import Iterator

import torch

__all__ = ["MIN_PRODUCT_ROWS", "groups_by_key"]

# Products of fewer candidates take other BLAS kernels, which round differently: both paths give
# every product at least this many rows.
MIN_PRODUCT_ROWS = 16
# Rows (candidate slots) of the products computed at once: with E = 256 their kernels take 4 MB
# and their blocks' features at most 16 MB, so that memory stays bounded whatever the load.
_GROUP_ROWS = 4096


def groups_by_key(key: torch.Tensor, num_keys: int) -> Iterator[tuple]:
    """Group the items of int64 keys [P] (in [0, num_keys)) for batched products.

    Keys are bucketed by their number of items, padded to the next power of two (at least
    `MIN_PRODUCT_ROWS`), so that padding at most doubles the work, and split into groups of at
    most `_GROUP_ROWS` rows. Yields per group: its keys [g] (increasing), table [g, W] (item
    indices, in increasing order; 0 for padding) and filled [g, W] (bool, False for padding).
    """
    counts = torch.bincount(key, minlength=num_keys)
    widths = counts.clamp(min=MIN_PRODUCT_ROWS).float().log2().ceil().exp2().long()
    used = counts.nonzero()[:, 0]
    # Keys by (width, key) and items by (width, key, index): a group's keys and items are then
    # contiguous ranges, so each group touches only its own items.
    keys = used[widths[used].argsort(stable=True)]
    order = (widths[key] * num_keys + key).argsort(stable=True)
    sizes = counts[keys]
    item_key = torch.arange(keys.shape[0], device=key.device).repeat_interleave(sizes)  # [P]
    ends = sizes.cumsum(0)
    rank = torch.arange(key.shape[0], device=key.device) - (ends - sizes)[item_key]
    # Host reads: the group boundaries.
    bucket_widths, bucket_sizes = torch.unique_consecutive(widths[keys], return_counts=True)
    ends = [0] + ends.tolist()
    bucket_start = 0
    for width, size in zip(bucket_widths.tolist(), bucket_sizes.tolist()):
        bucket_stop, step = bucket_start + size, max(1, _GROUP_ROWS // width)
        for start in range(bucket_start, bucket_stop, step):
            stop = min(start + step, bucket_stop)
            items = slice(ends[start], ends[stop])
            table = torch.zeros((stop - start, width), dtype=torch.long, device=key.device)
            filled = torch.zeros((stop - start, width), dtype=torch.bool, device=key.device)
            index = (item_key[items] - start, rank[items])
            table[index] = order[items]
            filled[index] = True
            yield keys[start:stop], table, filled
        bucket_start = bucket_stop
