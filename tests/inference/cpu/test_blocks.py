"""The grid of blocks of the CPU's fast paths (`solov2_d2.inference.cpu.blocks`): `BlockBounds`
(bounds checked on super-blocks first against every block's bound), `groups_by_key` against a
loop over the keys, and the reusable `Buffer`s (reuse, growth, one set per post-processing call,
and results that never depend on what a buffer held before)."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from test_block_masks import STRIDES, _blob_case, _compact_load, _fast_and_plain

from solov2_d2.inference.cpu import CPUCandidateMasks
from solov2_d2.inference.cpu import blocks as cpu_blocks
from solov2_d2.inference.cpu.block_masks import MaskBlocks
from solov2_d2.inference.cpu.blocks import BLOCK, SUPER, BlockBounds, Buffer, groups_by_key
from solov2_d2.inference.masks import MIN_PRODUCT_ROWS
from solov2_d2.inference.pipeline import SOLOv2PostProcessor


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
    monkeypatch.setattr(cpu_blocks, "EVERY_BLOCK_FRACTION", 1.0)
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
    monkeypatch.setattr(cpu_blocks, "EVERY_BLOCK_FRACTION", fraction)
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


@pytest.mark.parametrize("seed", range(4))
def test_groups_by_key_against_a_loop_over_keys(seed, monkeypatch):
    """Every item once, in the row of its key, items in increasing order; a group's keys share
    the width (the next power of two of their item count, at least `MIN_PRODUCT_ROWS`) and fill
    at most `_GROUP_ROWS` rows."""
    monkeypatch.setattr(cpu_blocks, "_GROUP_ROWS", 256)
    g = torch.Generator().manual_seed(seed)
    num_keys = 300
    # Skewed counts: from 0 to a few hundred items per key.
    weights = torch.rand(num_keys, generator=g) ** 6
    key = torch.multinomial(weights, 20000, replacement=True, generator=g)
    seen = []
    for keys, table, filled in groups_by_key(key, num_keys):
        width = table.shape[1]
        assert keys.tolist() == sorted(keys.tolist())
        assert keys.shape[0] * width <= 256 or keys.shape[0] == 1
        for k, row, fill in zip(keys.tolist(), table, filled):
            items = (key == k).nonzero()[:, 0]
            assert width == max(MIN_PRODUCT_ROWS, 1 << (len(items) - 1).bit_length())
            assert fill.tolist() == [True] * len(items) + [False] * (width - len(items))
            assert torch.equal(row[: len(items)], items) and not row[len(items) :].any()
            seen.append(k)
    assert sorted(seen) == key.unique().tolist()
    assert list(groups_by_key(key[:0], num_keys)) == []


def test_take_reuses_a_buffer_until_it_is_too_small():
    buffer = Buffer()
    assert buffer.nbytes() == 0
    first = buffer.take((4, 6), torch.device("cpu"), torch.float32)
    assert first.shape == (4, 6) and first.dtype == torch.float32 and first.is_contiguous()
    assert first.device == torch.device("cpu")
    smaller = buffer.take((3, 2, 2), "cpu", torch.float32)
    assert smaller.shape == (3, 2, 2) and smaller.data_ptr() == first.data_ptr()
    other = Buffer().take((4, 6), "cpu")
    assert other.data_ptr() != first.data_ptr()  # buffers never share memory
    assert buffer.nbytes() == 24 * 4
    larger = buffer.take((5, 6), "cpu")
    assert larger.shape == (5, 6) and larger.data_ptr() != first.data_ptr()
    assert buffer.nbytes() == 30 * 4
    again = buffer.take((2, 3), "cpu")
    assert again.data_ptr() == larger.data_ptr()  # the grown memory is reused in turn
    wide = buffer.take((2, 3), "cpu", torch.float64)
    assert wide.dtype == torch.float64 and wide.shape == (2, 3)
    assert buffer.nbytes() == 6 * 8  # a new dtype: memory of that dtype, as large as asked
    assert buffer.take((0, 5), "cpu").shape == (0, 5)


def test_each_post_processing_call_has_its_own_buffers():
    """Buffers belong to the objects whose loops use them (no buffer shared between threads or
    calls): each batch's `MaskBlocks` and its `BlockBounds` hold their own, and two batches'
    computations share none."""
    features, kernels, valid, _ = _blob_case(8, (61, 77), (50, 35), 40, largest=0.4)
    made = [
        CPUCandidateMasks(features, None, 0.5, 4, 256, kernels=kernels, valid=valid, force=True)
        for _ in range(2)
    ]
    held = []
    for masks in made:
        blocks = masks.blocks
        assert isinstance(blocks, MaskBlocks)
        own = [v for v in vars(blocks).values() if isinstance(v, Buffer)]
        own += [v for v in vars(blocks.bounds).values() if isinstance(v, Buffer)]
        assert len(own) >= 2
        held.append(own)
    assert not {id(b) for b in held[0]} & {id(b) for b in held[1]}


def test_results_do_not_depend_on_what_the_buffers_held(monkeypatch, one_thread):
    """Every buffer taken full of NaN (or True): the fast path still gives the plain path's
    detections, so it reads nothing of a buffer that it has not written."""
    taken = []
    real = Buffer.take

    def take(self, shape, device, dtype=torch.float32):
        x = real(self, shape, device, dtype)
        taken.append(x.numel() * x.element_size())
        if dtype == torch.bool:
            return x.fill_(True)
        return x.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max)

    monkeypatch.setattr(Buffer, "take", take)
    cate, kernels, features = _compact_load(2, 600, (64, 80), seed=5)
    sizes = [(256, 320), (230, 270)]
    found = _fast_and_plain(cate, kernels, features, sizes, sizes)
    assert sum(taken) > 0 and all(len(r) > 20 for r in found)


def test_threads_at_the_same_time_get_their_own_results(one_thread):
    """Two threads post-processing different loads at once, each with its post-processor, give
    the results each gets alone (their buffers are their own)."""
    procs = [
        SOLOv2PostProcessor(
            strides=STRIDES, mask_stride=4, inference_path="fast", fast_masks=CPUCandidateMasks
        )
        for _ in range(2)
    ]
    sizes = [(256, 320)]
    loads = [_compact_load(1, 400, (64, 80), seed=s) for s in (6, 7)]
    run = lambda i: procs[i](*loads[i], [(64, 80)], sizes, sizes)[0]  # noqa: E731
    alone = [run(i) for i in range(2)]
    assert all(p.last_paths["scoring"] == "blocks" for p in procs)
    together = [[], []]
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        for _ in range(3):
            together[i].append(run(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for expected, found in zip(alone, together):
        assert len(found) == 3 and len(expected) > 20
        for r in found:
            assert torch.equal(r.pred_masks, expected.pred_masks)
            assert torch.equal(r.scores, expected.scores)
