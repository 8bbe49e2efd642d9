import torch

from solov2_d2.grouping import ceil_log2, groups


def test_ceil_log2_is_exact():
    values = torch.tensor([1, 2, 3, 4, 5, 1023, 1024, 1025, 2**40, 2**40 + 1])
    expected = [0, 1, 2, 2, 3, 10, 10, 11, 40, 41]
    assert ceil_log2(values).tolist() == expected


def test_groups_hold_each_used_item_once_with_their_largest_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300, (200,), generator=g)
    widths = torch.randint(0, 50, (200,), generator=g)
    used = torch.rand(200, generator=g) > 0.3
    bins = ceil_log2(sizes)
    seen = []
    for items, (largest, widest) in groups(bins, used, 10, sizes, widths):
        assert len(set(bins[items].tolist())) == 1  # one bin per group, in bin order
        seen.append(int(bins[items[0]]))
        assert used[items].all()
        assert largest == sizes[items].max() and widest == widths[items].max()
        assert largest <= 2 * sizes[items].min()  # padding to the largest wastes at most 2x
    assert seen == sorted(set(bins[used].tolist()))
    assert sorted(torch.cat([items for items, _ in groups(bins, used, 10)]).tolist()) == (
        torch.nonzero(used).flatten().tolist()
    )
    assert list(groups(bins, torch.zeros(200, dtype=torch.bool), 10)) == []
