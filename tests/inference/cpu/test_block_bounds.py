"""`BlockBounds`: bounds checked on super-blocks first against every block's bound."""
import math

import pytest
import torch
import torch.nn.functional as F

from solov2_d2.inference.cpu import block_bounds
from solov2_d2.inference.cpu.block_bounds import SUPER, BlockBounds
from solov2_d2.inference.cpu.block_scoring import BLOCK, MaskBlocks


def _blobs(size, dim, num, g, objects=12):
    """Features [1, dim, h, w] of smooth blobs and kernels [1, num, dim] that each pick one
    (compact masks), and a logit threshold."""
    h, w = size
    centres = torch.rand(objects, 2, generator=g) * torch.tensor([h, w])
    ys, xs = torch.arange(h)[:, None], torch.arange(w)
    dist = ((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2).sqrt()
    features = torch.zeros(1, dim, h, w)
    features[0, :objects] = 2 - dist / 2
    features[0, objects:] = 0.3 * torch.randn(dim - objects, h, w, generator=g)
    pick = torch.randint(objects, (num,), generator=g)
    kernels = 0.05 * torch.randn(1, num, dim, generator=g)
    kernels[0, torch.arange(num), pick] = 1.0
    return features, kernels


def _block_max_logits(features, kernels):
    """float32 [B, n, nb]: each block's largest logit, brute force."""
    b, _, h, w = features.shape
    logits = torch.bmm(kernels, features.flatten(2)).view(b, -1, h, w)
    padded = F.pad(logits, (0, -w % BLOCK, 0, -h % BLOCK), value=-math.inf)
    return F.max_pool2d(padded, BLOCK).flatten(2)


def _counting_every_block(monkeypatch):
    calls = []
    real = BlockBounds.every_block

    def every_block(self, *args):
        calls.append(True)
        return real(self, *args)

    monkeypatch.setattr(BlockBounds, "every_block", every_block)
    return calls


@pytest.mark.parametrize("size", [(64, 80), (61, 77), (200, 336), (8, 8), (20, 100), (100, 12)])
@pytest.mark.parametrize("thresh", [0.5, 0.3, 0.9])
def test_super_blocks_first_give_every_blocks_bounds(size, thresh, monkeypatch):
    """Bounding only the blocks of the super-blocks that may pass gives exactly the bounds of
    every block, on grids of any size against the super-blocks (multiples of 4 blocks or not,
    smaller than one super-block, a single block); they never miss a passing block."""
    monkeypatch.setattr(block_bounds, "_EVERY_BLOCK_FRACTION", 1.0)
    g = torch.Generator().manual_seed(size[0] + size[1] + int(10 * thresh))
    features, kernels = _blobs(size, 32, 300, g)
    blocks = MaskBlocks(features)
    logit = math.log(thresh / (1 - thresh))
    calls = _counting_every_block(monkeypatch)
    found = blocks.bounds.may_reach(kernels, logit)
    assert not calls
    expected = blocks.bounds.every_block(kernels, logit)
    assert found.dtype == torch.bool and found.shape == expected.shape
    assert torch.equal(found, expected)
    passing = _block_max_logits(features, kernels) > logit
    assert passing.any() and not (passing & ~found).any()


def test_compact_masks_take_the_super_blocks(monkeypatch):
    """Compact masks on a map of the R50's size at 800 x 1333 (200 x 336): few super-blocks may
    pass, and the blocks of the others are not bounded."""
    g = torch.Generator().manual_seed(1)
    features, kernels = _blobs((200, 336), 32, 500, g)
    bounds = MaskBlocks(features).bounds
    calls = _counting_every_block(monkeypatch)
    found = bounds.may_reach(kernels, 0.0)
    assert not calls and 0 < found.float().mean() < 0.05


def test_most_super_blocks_passing_bound_every_block(monkeypatch):
    """Large noisy masks: most (candidate, super-block) pairs may pass, and every block is
    bounded at once."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 16, 37, 45, generator=g)
    kernels = 10 * torch.randn(2, 30, 16, generator=g)
    bounds = MaskBlocks(features).bounds
    calls = _counting_every_block(monkeypatch)
    found = bounds.may_reach(kernels, 0.0)
    assert calls == [True] and found.float().mean() > 0.25
    passing = _block_max_logits(features, kernels) > 0.0
    assert not (passing & ~found).any()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_batches_and_both_ways_agree(fraction, monkeypatch):
    """A batch of two images, with either way forced: the same bounds, which never miss a
    passing block."""
    monkeypatch.setattr(block_bounds, "_EVERY_BLOCK_FRACTION", fraction)
    g = torch.Generator().manual_seed(5)
    features = torch.cat([_blobs((45, 70), 24, 64, g)[0] for _ in range(2)])
    kernels = torch.cat([_blobs((45, 70), 24, 64, g)[1] for _ in range(2)])
    bounds = MaskBlocks(features).bounds
    found = bounds.may_reach(kernels, 0.0)
    assert torch.equal(found, bounds.every_block(kernels, 0.0))
    passing = _block_max_logits(features, kernels) > 0.0
    assert passing[0].any() and passing[1].any() and not (passing & ~found).any()
    assert bounds.may_reach(kernels[:, :0], 0.0).shape == (2, 0, 6 * 9)


@pytest.mark.parametrize("grid", [(1, 1), (4, 4), (5, 9), (25, 42)])
def test_super_blocks_hold_every_block_once_and_bound_it(grid):
    """Each block is in one super-block; places past the grid hold the slot past the blocks;
    a super-block's ranges contain those of its blocks."""
    g = torch.Generator().manual_seed(grid[1])
    nb = grid[0] * grid[1]
    high = torch.rand(2, nb, 8, generator=g)
    low = high - torch.rand(2, nb, 8, generator=g)
    bounds = BlockBounds(high, low, grid)
    ns = math.ceil(grid[0] / SUPER) * math.ceil(grid[1] / SUPER)
    assert bounds.super_blocks.shape == (ns, SUPER * SUPER)
    inside = bounds.super_blocks[bounds.super_blocks < nb]
    assert sorted(inside.tolist()) == list(range(nb))
    assert (bounds.super_blocks <= nb).all()
    for s, members in enumerate(bounds.super_blocks.tolist()):
        members = [m for m in members if m < nb]
        assert (bounds.super_ranges[:, :8, s, None] >= bounds.ranges[:, :8, members]).all()
        assert (bounds.super_ranges[:, 8:, s, None] <= bounds.ranges[:, 8:, members]).all()
        assert (bounds.super_largest[:, s, None] >= bounds.largest[:, members] - 1e-6).all()
