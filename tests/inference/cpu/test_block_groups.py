"""`groups_by_key` against a loop over the keys."""
import pytest
import torch

from solov2_d2.inference.cpu import block_groups


@pytest.mark.parametrize("seed", range(4))
def test_groups_by_key_against_a_loop_over_keys(seed, monkeypatch):
    """Every item once, in the row of its key, items in increasing order; a group's keys share
    the width (the next power of two of their item count, at least `MIN_PRODUCT_ROWS`) and fill
    at most `_GROUP_ROWS` rows."""
    monkeypatch.setattr(block_groups, "_GROUP_ROWS", 256)
    g = torch.Generator().manual_seed(seed)
    num_keys = 300
    # Skewed counts: from 0 to a few hundred items per key.
    weights = torch.rand(num_keys, generator=g) ** 6
    key = torch.multinomial(weights, 20000, replacement=True, generator=g)
    seen = []
    for keys, table, filled in block_groups.groups_by_key(key, num_keys):
        width = table.shape[1]
        assert keys.tolist() == sorted(keys.tolist())
        assert keys.shape[0] * width <= 256 or keys.shape[0] == 1
        for k, row, fill in zip(keys.tolist(), table, filled):
            items = (key == k).nonzero()[:, 0]
            assert width == max(block_groups.MIN_PRODUCT_ROWS, 1 << (len(items) - 1).bit_length())
            assert fill.tolist() == [True] * len(items) + [False] * (width - len(items))
            assert torch.equal(row[: len(items)], items) and not row[len(items) :].any()
            seen.append(k)
    assert sorted(seen) == key.unique().tolist()
    assert list(block_groups.groups_by_key(key[:0], num_keys)) == []
