"""The CPU's computation of the candidate masks (`solov2_d2.inference.cpu.block_masks`): the
block-bounded mask scoring (`MaskBlocks`) against the plain computation of every pixel, the int8
intersections against the float32 product, the choice of the computation, and the whole
post-processor's fast paths against its plain one; `BlockBounds` (bounds checked on
super-blocks first against every block's bound), `groups_by_key` against a loop over the keys,
and the reusable `Buffer`s (reuse, growth, one set per post-processing call, and results that
never depend on what a buffer held before)."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from devices import needs_cuda

from solov2_d2.inference import pipeline as pp
from solov2_d2.inference.cpu import CPUCandidateMasks, block_masks, cropped_paste
from solov2_d2.inference.cpu.block_masks import (
    BLOCK,
    DENSE_FRACTION,
    SUPER,
    BlockBits,
    BlockBounds,
    Buffer,
    MaskBlocks,
    _int8_products_work,
    dense_intersections,
    groups_by_key,
)
from solov2_d2.inference.cpu.cropped_paste import NEAR_MARGIN, paste_cropped
from solov2_d2.inference.masks import (
    MIN_PRODUCT_ROWS,
    CandidateMasks,
    mask_intersections,
    paste_masks,
)
from solov2_d2.inference.pipeline import SOLOv2PostProcessor

GRIDS = [40, 36, 24, 16, 12]
STRIDES = [8, 8, 16, 32, 32]


def _blob_features(batch, size, objects, dim, g, largest=0.6, noise=0.3):
    """float32 [B, dim, H, W]: channel j < `objects` an elliptical object (logit 4 (1 - d) at
    normalised elliptical distance d, at least -8; sqrt(area) log-uniform in 2 .. `largest` of
    the map's larger side), the last channel constant 1, the others small noise."""
    h, w = size
    n = objects
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    side = torch.exp(math.log(2) + rand(batch, n) * math.log(largest * max(h, w) / 2))
    aspect = 0.5 + 1.5 * rand(batch, n)
    ry, rx = side * aspect.sqrt() / 2, side / aspect.sqrt() / 2
    cy, cx = rand(batch, n) * h, rand(batch, n) * w
    angle = rand(batch, n) * math.pi
    ys = torch.arange(h, dtype=torch.float32)[:, None] - cy[..., None, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :] - cx[..., None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    u, v = xs * cos + ys * sin, -xs * sin + ys * cos
    dist = ((u / rx[..., None, None]) ** 2 + (v / ry[..., None, None]) ** 2).sqrt()
    features = noise * torch.randn(batch, dim, h, w, generator=g)
    features[:, :n] = (4 * (1 - dist)).clamp(min=-8)
    features[:, -1] = 1
    return features


def _blob_kernels(batch, num, objects, dim, g, noise=0.05):
    """float32 [B, num, dim]: a * (an object's channel) + b * (the constant channel), a in
    [0.8, 1.25], b in [-1, 1], plus small weights on the noise channels."""
    kernels = noise * torch.randn(batch, num, dim, generator=g)
    kernels[..., :objects] = 0
    obj = torch.randint(objects, (batch, num, 1), generator=g)
    kernels.scatter_(2, obj, 0.8 + 0.45 * torch.rand(batch, num, 1, generator=g))
    kernels[..., -1] = 2 * torch.rand(batch, num, generator=g) - 1
    return kernels


def _blob_case(seed, size, second_extent, count, largest):
    """Two images of object-like masks (the second with a smaller extent), `count` candidates
    each, about 10% of them invalid: features, kernels, valid and their `MaskBlocks`."""
    g = torch.Generator().manual_seed(seed)
    features = _blob_features(2, size, objects=12, dim=16, g=g, largest=largest)
    kernels = _blob_kernels(2, count, objects=12, dim=16, g=g)
    valid = torch.rand(2, count, generator=g) < 0.9
    return features, kernels, valid, MaskBlocks(features, _inside(size, [size, second_extent]))


def _inside(size, extents):
    """float32 [B, 1, H * W]: 1 inside each image's extent (h, w)."""
    rows, cols = torch.arange(size[0]), torch.arange(size[1])
    inside = [(rows[:, None] < h) & (cols < w) for h, w in extents]
    return torch.stack(inside).flatten(1)[:, None].float()


def _plain(features, kernels, inside, thresh):
    """The plain path's int32 areas, float64 sums and bool binary masks of every candidate."""
    probs = torch.bmm(kernels, features.flatten(2)).sigmoid()
    if inside is not None:
        probs = probs * inside
    binary = probs > thresh
    sums = (probs * binary).sum(dim=2, dtype=torch.float64)
    return binary.sum(dim=2, dtype=torch.int32), sums, binary


def _block_max(features, kernels, inside, thresh):
    """bool [B, n, nb]: whether a pixel of each 8 x 8 block passes `thresh`, brute force."""
    b, _, h, w = features.shape
    probs = torch.bmm(kernels, features.flatten(2)).sigmoid()
    if inside is not None:
        probs = probs * inside
    probs = probs.view(b, -1, h, w)
    padded = F.pad(probs, (0, -w % BLOCK, 0, -h % BLOCK))
    return F.max_pool2d(padded, BLOCK).flatten(2) > thresh


def _dense(binary):
    """bool [B, n, H * W] of binary masks, dense or `BlockBits`."""
    return binary.dense() if isinstance(binary, BlockBits) else binary


def _assert_valid_equal(found, expected, valid):
    areas, sums, binary = found = (found[0], found[1], _dense(found[2]))
    assert areas.dtype == torch.int32 and sums.dtype == torch.float64
    assert binary.dtype == torch.bool and binary.shape == expected[2].shape
    for ours, plain in zip(found, expected):
        assert torch.equal(ours[valid], plain[valid])
        assert not ours[~valid].any()  # invalid candidates: 0


@pytest.mark.parametrize("thresh", [0.5, 0.3])
@pytest.mark.parametrize(
    "size,extents",
    [((32, 40), [(32, 40), (21, 27)]), ((37, 45), [(37, 45), (30, 19)]),
     ((61, 77), [(61, 77), (50, 35)])],
)
def test_score_equals_the_plain_path_on_object_like_masks(
    size, extents, thresh, monkeypatch, one_thread
):
    """Batches of two images of different extents, maps of multiples of 8 pixels and not."""
    g = torch.Generator().manual_seed(size[0] + int(10 * thresh))
    features = _blob_features(2, size, objects=12, dim=16, g=g, largest=0.4)
    kernels = _blob_kernels(2, 40, objects=12, dim=16, g=g)
    valid = torch.rand(2, 40, generator=g) < 0.8
    inside = _inside(size, extents)
    found = MaskBlocks(features, inside).score(kernels, valid, thresh)
    if found is None:
        # The blocks at the edge of a map padded to multiples of 8 loosen the bound.
        assert size[0] % BLOCK or size[1] % BLOCK
        monkeypatch.setattr(block_masks, "DENSE_FRACTION", 1.0)
        found = MaskBlocks(features, inside).score(kernels, valid, thresh)
    expected = _plain(features, kernels, inside, thresh)
    areas = expected[0][valid]
    assert areas.min() == 0 and areas.max() > 100 and (areas > 0).sum() > 30
    _assert_valid_equal(found, expected, valid)
    # Every pixel inside, every pair computed however many may pass.
    monkeypatch.setattr(block_masks, "DENSE_FRACTION", 1.0)
    valid[-1, -1] = False  # its last pixels: see `one_thread`
    found = MaskBlocks(features).score(kernels, valid, thresh)
    _assert_valid_equal(found, _plain(features, kernels, None, thresh), valid)


@pytest.mark.parametrize("size", [(32, 40), (37, 45)])
def test_score_of_a_single_candidate(size):
    """One candidate (a product of 1 row on the plain path): same areas and binary mask, sums to
    float rounding."""
    g = torch.Generator().manual_seed(3)
    features = _blob_features(2, size, objects=6, dim=16, g=g, largest=0.3)
    inside = _inside(size, [size, (size[0] - 11, size[1] - 5)])
    checked = 0
    for _ in range(10):
        kernels = _blob_kernels(2, 1, objects=6, dim=16, g=g)
        valid = torch.ones(2, 1, dtype=torch.bool)
        found = MaskBlocks(features, inside).score(kernels, valid, 0.5)
        if found is None:  # a mask over most blocks
            continue
        areas, sums, binary = _plain(features, kernels, inside, 0.5)
        assert torch.equal(found[0], areas) and torch.equal(_dense(found[2]), binary)
        torch.testing.assert_close(found[1], sums, rtol=1e-7, atol=0)
        checked += int((areas > 0).sum())
    assert checked >= 10


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.5, 0.3, 0.9, 0.05])
def test_may_pass_never_misses_a_passing_block(seed, thresh):
    g = torch.Generator().manual_seed(seed)
    size = [(32, 40), (37, 45), (16, 16), (9, 23)][seed]
    dim = [8, 16, 32, 64][seed]
    features = torch.randn(2, dim, *size, generator=g) * (1 + seed)
    kernels = torch.randn(2, 50, dim, generator=g) / dim**0.5
    kernels[:, :25] *= 0.2  # small logits: blocks near the threshold
    inside = _inside(size, [size, (size[0] // 2 - 1, size[1] // 2)])
    blocks = MaskBlocks(features, inside)
    may = blocks.may_pass(kernels, thresh)
    nb = math.ceil(size[0] / BLOCK) * math.ceil(size[1] / BLOCK)
    assert may.shape == (2, 50, nb) and may.dtype == torch.bool
    passes = _block_max(features, kernels, inside, thresh)
    assert passes.any() and not (passes & ~may).any()
    # Blocks wholly outside an extent never pass.
    ones = torch.ones(2, 1, 1)
    outside = ~_block_max(inside.view(2, 1, *size), ones, None, 0.5).expand(-1, 50, -1)
    assert outside[1].any() and not (may & outside).any()


@pytest.mark.parametrize("thresh", [0.5, 0.3, 0.9])
def test_may_pass_at_the_rounding_edge(thresh):
    """Blocks whose bound is their exact largest logit (every channel but one constant in each
    block), kernels whose largest logit is within float rounding of the threshold's: the bound,
    a product summed in another order, needs its rounding margin."""
    g = torch.Generator().manual_seed(int(10 * thresh))
    dim, num = 64, 300
    features = F.interpolate(torch.randn(1, dim, 4, 5, generator=g) * 3, scale_factor=8)
    features[0, 0] = torch.rand(32, 40, generator=g) * 4 - 2
    features[0, -1] = 1
    kernels = torch.randn(1, num, dim, generator=g)
    kernels[0, :, -1] = 0
    top = torch.bmm(kernels, features.flatten(2)).amax(dim=2)
    logit = math.log(thresh / (1 - thresh))
    ulps = torch.randint(-30, 31, (1, num), generator=g) * 1e-7 * (1 + abs(logit))
    kernels[:, :, -1] = logit - top + ulps
    passes = _block_max(features, kernels, None, thresh)
    assert passes.sum() > 20
    assert not (passes & ~MaskBlocks(features).may_pass(kernels, thresh)).any()


def test_may_pass_is_tight_on_object_like_masks():
    g = torch.Generator().manual_seed(11)
    size = (64, 80)
    features = _blob_features(2, size, objects=24, dim=32, g=g, largest=0.4)
    kernels = _blob_kernels(2, 200, objects=24, dim=32, g=g)
    for thresh in [0.5, 0.3]:
        may = MaskBlocks(features).may_pass(kernels, thresh)
        true = _block_max(features, kernels, None, thresh)
        assert not (true & ~may).any()
        fraction, true_fraction = may.float().mean(), true.float().mean()
        assert 0 < true_fraction < 0.2
        assert fraction < 3 * true_fraction + 0.05


def test_score_gives_up_on_large_noisy_masks(one_thread):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 16, 37, 45, generator=g)
    kernels = 10 * torch.randn(2, 30, 16, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    blocks = MaskBlocks(features)
    assert blocks.may_pass(kernels, 0.5).float().mean() > DENSE_FRACTION
    assert blocks.score(kernels, valid, 0.5) is None
    # Only invalid candidates are counted: with few valid ones it computes them.
    valid[:, 4:] = False
    found = blocks.score(kernels, valid, 0.5)
    assert found is not None
    _assert_valid_equal(found, _plain(features, kernels, None, 0.5), valid)


def test_threshold_zero_lets_every_block_inside_pass(one_thread):
    g = torch.Generator().manual_seed(6)
    size = (37, 45)
    features = torch.randn(2, 16, *size, generator=g)
    kernels = torch.randn(2, 20, 16, generator=g) - 30  # every logit far below 0
    inside = _inside(size, [(37, 45), (10, 17)])
    may = MaskBlocks(features, inside).may_pass(kernels, 0.0)
    assert may[0].all()
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[:2, :3] = True  # blocks with a pixel of rows < 10 and columns < 17
    assert torch.equal(may[1], expected.flatten().expand(20, -1))
    # Scoring at 0 with a small extent: every pixel inside passes, in few blocks.
    small = _inside(size, [(9, 7), (10, 17)])
    valid = torch.ones(2, 20, dtype=torch.bool)
    kernels = torch.randn(2, 20, 16, generator=g)
    found = MaskBlocks(features, small).score(kernels, valid, 0.0)
    assert found is not None
    expected = _plain(features, kernels, small, 0.0)
    _assert_valid_equal(found, expected, valid)
    assert found[0][:, 0].tolist() == [63, 170]


def test_all_invalid_candidates_and_no_candidate():
    g = torch.Generator().manual_seed(7)
    size = (37, 45)
    features = _blob_features(2, size, objects=6, dim=16, g=g)
    kernels = _blob_kernels(2, 20, objects=6, dim=16, g=g)
    blocks = MaskBlocks(features, _inside(size, [size, (20, 20)]))
    areas, sums, bits = blocks.score(kernels, torch.zeros(2, 20, dtype=torch.bool), 0.5)
    binary = _dense(bits)
    assert areas.shape == (2, 20) and sums.shape == (2, 20) and binary.shape == (2, 20, 37 * 45)
    assert not areas.any() and not sums.any() and not binary.any()
    if isinstance(bits, BlockBits):
        assert torch.equal(bits.intersections(), torch.zeros(2, 20, 20))
        assert not bits.select(torch.arange(5).expand(2, -1)).dense().any()
    empty = kernels[:, :0]
    assert blocks.may_pass(empty, 0.5).shape == (2, 0, 30)
    areas, sums, bits = blocks.score(empty, torch.zeros(2, 0, dtype=torch.bool), 0.5)
    binary = _dense(bits)
    assert areas.shape == (2, 0) and sums.shape == (2, 0) and binary.shape == (2, 0, 37 * 45)
    assert areas.dtype == torch.int32 and sums.dtype == torch.float64 and binary.dtype == torch.bool
    if isinstance(bits, BlockBits):
        assert bits.intersections().shape == (2, 0, 0)
        assert bits.select(torch.zeros(2, 0, dtype=torch.long)).dense().shape == (2, 0, 37 * 45)


def test_block_bits_select_cat_and_intersections(one_thread):
    """The binary masks kept in blocks: dense, reordered, concatenated and their intersections
    as those of the dense masks."""
    features, kernels, valid, blocks = _blob_case(8, (61, 77), (50, 35), 40, largest=0.4)
    first = blocks.score(kernels[:, :16], valid[:, :16], 0.5)[2]
    second = blocks.score(kernels[:, 16:], valid[:, 16:], 0.5)[2]
    assert isinstance(first, BlockBits) and isinstance(second, BlockBits)
    bits = BlockBits.cat([first, second])
    dense = bits.dense()
    assert torch.equal(dense, torch.cat([first.dense(), second.dense()], dim=1))
    assert torch.equal(dense, _dense(blocks.score(kernels, valid, 0.5)[2]))
    assert dense.shape == (2, 40, 61 * 77) and dense.flatten(2).any(dim=2).sum() > 40
    counts = bits.intersections()
    assert counts.dtype == torch.float32
    assert torch.equal(counts, mask_intersections(dense))
    # The kept blocks' probabilities: the plain ones, pixels row by row.
    inside = _inside((61, 77), [(61, 77), (50, 35)])
    plain = torch.bmm(kernels, features.flatten(2)).sigmoid() * inside
    assert torch.equal(_block_values(bits), _plain_block_values(plain, bits))
    assert (counts.diagonal(dim1=1, dim2=2) > 0).sum() > 40 and counts.triu(1).any()
    g = torch.Generator().manual_seed(9)
    order = torch.stack([torch.randperm(40, generator=g)[:25] for _ in range(2)])
    chosen = bits.select(order)
    assert chosen.shape == (2, 25, 61 * 77)
    assert torch.equal(chosen.dense(), dense[torch.arange(2)[:, None], order])
    assert torch.equal(chosen.intersections(), mask_intersections(chosen.dense()))
    chosen_plain = plain[torch.arange(2)[:, None], order]
    assert torch.equal(_block_values(chosen), _plain_block_values(chosen_plain, chosen))


def _kept(kept):
    """The tensors of `KeptMasks`: the probabilities, then the rows and the columns near the
    threshold."""
    rows, cols = kept.near_lines
    return kept.probs, rows, cols


def _block_values(bits):
    """float32 [P, 64]: the probabilities that `bits` keeps, checked to match its binary masks."""
    assert bits.values is not None and bits.values.shape == bits.bits.shape
    assert torch.equal(bits.values > 0.5, bits.bits)
    return bits.values


def _plain_block_values(probs, bits):
    """float32 [P, 64]: the plain probabilities [B, n, H * W] of the blocks of `bits`."""
    (h, w), (hb, wb) = bits.size, bits.grid
    maps = F.pad(probs.view(*probs.shape[:2], h, w), (0, wb * BLOCK - w, 0, hb * BLOCK - h))
    rows, cols = block_masks._block_pixels(bits.block, wb)
    return maps[bits.image[:, None, None], bits.row[:, None, None], rows, cols].flatten(1)


def test_block_values_are_dropped_beyond_their_memory_budget(monkeypatch, one_thread):
    """Past `_VALUES_MAX_BYTES` a chunk keeps no probabilities, and masks concatenated with such
    a chunk keep none: the kept masks' probabilities are then computed around every block that
    may pass, with the same values where they are exact."""
    features, kernels, valid, blocks = _blob_case(8, (61, 77), (50, 35), 40, largest=0.4)
    with_values = blocks.score(kernels, valid, 0.5)[2]
    monkeypatch.setattr(block_masks, "_VALUES_MAX_BYTES", 0)
    without = blocks.score(kernels, valid, 0.5)[2]
    assert with_values.values is not None and without.values is None
    assert torch.equal(without.dense(), with_values.dense())
    assert BlockBits.cat([with_values, without]).values is None
    near = 0.5 - NEAR_MARGIN
    expected = _kept(blocks.probs(kernels, near))
    for ours, alone in zip(_kept(blocks.probs(kernels, near, without)), expected):
        assert torch.equal(ours, alone)


@pytest.mark.parametrize("with_known", [False, True])
@pytest.mark.parametrize("thresh", [0.5, 0.3])
@pytest.mark.parametrize("size,extents", [((64, 80), [(64, 80), (58, 68)]),
                                          ((61, 77), [(61, 77), (50, 35)])])
def test_probs_are_exact_around_the_pixels_that_may_pass(
    size, extents, thresh, with_known, monkeypatch, one_thread
):
    """`MaskBlocks.probs`, alone or with the masks' blocks kept by scoring: the plain
    probabilities within `REACH` (2) pixels of any above `near`, at most `near` where 0, and
    the rows and columns that hold one; pasting them gives the plain path's masks, at the
    input's size (with and without those rows and columns) and resized."""
    g = torch.Generator().manual_seed(size[0] + int(10 * thresh))
    features = _blob_features(2, size, objects=12, dim=16, g=g, largest=0.3)
    kernels = _blob_kernels(2, 32, objects=12, dim=16, g=g)
    inside = _inside(size, extents)
    near = thresh - NEAR_MARGIN
    blocks = MaskBlocks(features, inside)
    known = None
    if with_known:
        monkeypatch.setattr(block_masks, "DENSE_FRACTION", 1.0)
        known = blocks.score(kernels, torch.ones(2, 32, dtype=torch.bool), thresh)[2]
        assert known.values is not None and known.bits.shape[0] > 50
    kept = blocks.probs(kernels, near, known)
    if kept is None:
        # The blocks at the edge of a map padded to multiples of 8 loosen the bound.
        assert size[0] % BLOCK or size[1] % BLOCK
        monkeypatch.setattr(block_masks, "DENSE_FRACTION", 1.0)
        kept = blocks.probs(kernels, near, known)
    fast = kept.probs
    assert fast.shape == (2, 32, size[0] * size[1])
    plain = torch.bmm(kernels, features.flatten(2)).sigmoid() * inside
    above = (plain > near).view(2, 32, *size)
    rows, cols = kept.near_lines
    assert torch.equal(rows, above.any(dim=3)) and torch.equal(cols, above.any(dim=2))
    assert ((fast == plain) | ((fast == 0) & (plain <= near))).all()
    around = F.max_pool2d((plain > near).float().view(-1, 1, *size), 5, stride=1, padding=2)
    around = around.view_as(plain) > 0
    assert around.sum() > 1000 and torch.equal(fast[around], plain[around])

    def paste(probs, image, output):
        """The plain computation's pasting."""
        return paste_masks(probs, image, output, 4, thresh)

    for i, (h, w) in enumerate(extents):
        soft = [x[i].view(-1, *size)[:, :h, :w] for x in (fast, plain)]
        image = (4 * h - 3, 4 * w - 1)
        expected = paste(soft[1], image, image)
        found = paste_cropped(soft[0], thresh, 4, image, 1 << 24)
        lines = (rows[i, :, :h], cols[i, :, :w])
        given = paste_cropped(soft[0], thresh, 4, image, 1 << 24, lines)
        assert found is not None and expected[0].any()
        assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
        assert torch.equal(given[0], expected[0]) and torch.equal(given[1], expected[1])
        for output in [(4 * h - 3, 4 * w - 1), (301, 197)]:
            ours = paste(soft[0], image, output)
            theirs = paste(soft[1], image, output)
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("rows", [1, 16, 40])
def test_products_in_small_groups(rows, monkeypatch, one_thread):
    """Groups of products cut to a few rows (one block each at most): the same areas, sums,
    masks, intersections and probabilities."""
    features, kernels, valid, blocks = _blob_case(12, (64, 80), (58, 68), 48, largest=0.3)
    whole = blocks.score(kernels, valid, 0.5)
    probs = blocks.probs(kernels, 0.5 - NEAR_MARGIN)
    known = whole[2]
    with_known = blocks.probs(kernels, 0.5 - NEAR_MARGIN, known)
    monkeypatch.setattr(block_masks, "_GROUP_ROWS", rows)
    grouped = blocks.score(kernels, valid, 0.5)
    assert torch.equal(grouped[0], whole[0]) and torch.equal(grouped[1], whole[1])
    assert torch.equal(grouped[2].dense(), whole[2].dense())
    assert torch.equal(grouped[2].intersections(), whole[2].intersections())
    for ours, theirs in zip(_kept(blocks.probs(kernels, 0.5 - NEAR_MARGIN)), _kept(probs)):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(
        _kept(blocks.probs(kernels, 0.5 - NEAR_MARGIN, known)), _kept(with_known)
    ):
        assert torch.equal(ours, theirs)
    expected = _plain(features, kernels, _inside((64, 80), [(64, 80), (58, 68)]), 0.5)
    _assert_valid_equal(grouped, expected, valid)


def test_probs_with_known_blocks_compute_only_the_pixels_around_them(monkeypatch, one_thread):
    """With the blocks kept by scoring, the kept masks' probabilities take products only for
    blocks that scoring did not keep: its values are the ones written (a marker put in them
    comes out), and far fewer blocks are computed than without them."""
    features, kernels, valid, blocks = _blob_case(12, (64, 80), (58, 68), 48, largest=0.3)
    known = blocks.score(kernels, valid, 0.5)[2]
    computed = []
    real = MaskBlocks._products

    def products(self, kernels, pairs):
        computed.append(pairs)
        return real(self, kernels, pairs)

    monkeypatch.setattr(MaskBlocks, "_products", products)
    near = 0.5 - NEAR_MARGIN
    alone = blocks.probs(kernels, near).probs
    ours = blocks.probs(kernels, near, known).probs
    assert ((ours == alone) | (ours == 0)).all() and ours.count_nonzero() > 1000
    alone_pairs, known_pairs = computed
    key = lambda p: (p[:, 0] * 48 + p[:, 1]) * 80 + p[:, 2]  # noqa: E731
    kept = key(torch.stack([known.image, known.row, known.block], dim=1))
    assert not torch.isin(key(known_pairs), kept).any()
    assert known_pairs.shape[0] < alone_pairs.shape[0] // 2
    # Known values marked (each changed, the same pixels above `near`) come out in their
    # blocks, and only there.
    v = known.values
    marker = torch.where(v > near, v + 1, -1 - v)
    marked = blocks.probs(kernels, near, known._replace(values=marker)).probs
    (hb, wb), n = blocks.grid, kernels.shape[1]
    rows, cols = block_masks._block_pixels(known.block, wb)
    where = (known.image[:, None, None], known.row[:, None, None], rows, cols)
    found, exact = marked.view(2, n, 64, 80)[where], alone.view(2, n, 64, 80)[where]
    assert torch.equal(found, torch.where(exact > near, exact + 1, -1 - exact))
    changed = (marked != ours).view(2, n, hb, BLOCK, wb, BLOCK).any(5).any(3).flatten(2)
    assert changed.sum() == known.bits.shape[0]


def test_probs_give_up_on_large_noisy_masks():
    g = torch.Generator().manual_seed(9)
    features = torch.randn(2, 16, 32, 40, generator=g)
    kernels = 10 * torch.randn(2, 20, 16, generator=g)
    assert MaskBlocks(features).probs(kernels, 0.5 - NEAR_MARGIN) is None


def _compact_load(batch, num, mask_size, seed, classes=5, dim=16, objects=12):
    """Head outputs where exactly `num` (cell, class) pairs per image pass the score threshold
    and point NMS (cells of even row and column), with object-like masks (bench/benchmark.py's
    compact load): each chosen cell's kernel picks one of `objects` elliptical blobs."""
    g = torch.Generator().manual_seed(seed)
    offsets = [0] + torch.tensor([s * s for s in GRIDS]).cumsum(0).tolist()
    even = torch.cat(
        [
            (o + torch.arange(0, s, 2)[:, None] * s + torch.arange(0, s, 2)).flatten()
            for o, s in zip(offsets, GRIDS)
        ]
    )
    flat_cate = torch.full((batch, offsets[-1], classes), -4.6)
    flat_kernels = torch.zeros(batch, offsets[-1], dim)
    for i in range(batch):
        cells = torch.cat([even[torch.randperm(len(even), generator=g)] for _ in range(2)])[:num]
        labels = torch.arange(num) // len(even) * 2 + torch.randint(3, (num,), generator=g)
        score = 0.2 + 0.7 * torch.rand(num, generator=g)
        flat_cate[i, cells, labels % classes] = torch.log(score / (1 - score))
        flat_kernels[i, cells] = _blob_kernels(1, num, objects, dim, g)[0]
    features = _blob_features(batch, mask_size, objects, dim, g, largest=0.3)
    cate, kernels = [], []
    for o, s in zip(offsets, GRIDS):
        cate.append(flat_cate[:, o : o + s * s].transpose(1, 2).reshape(batch, -1, s, s))
        kernels.append(flat_kernels[:, o : o + s * s].transpose(1, 2).reshape(batch, -1, s, s))
    return cate, kernels, features


def _heavy_load(batch, mask_size, seed, classes=5, dim=16):
    """Random head outputs with large, noisy masks (random features, large kernels)."""
    g = torch.Generator().manual_seed(seed)
    cate = [torch.randn(batch, classes, s, s, generator=g) - 1 for s in GRIDS]
    kernels = [10 * torch.randn(batch, dim, s, s, generator=g) for s in GRIDS]
    return cate, kernels, torch.randn(batch, dim, *mask_size, generator=g)


def _spy(monkeypatch):
    """Record, per call of `MaskBlocks.score`, `MaskBlocks.probs` and `paste_cropped` (as the
    CPU's computation calls it), whether the fast path computed the result (not None).

    The maps of these tests are small, so their masks' crops cover more of them than in real
    images: cropped pasting is taken up to half the map covered."""
    monkeypatch.setattr(cropped_paste, "CROP_FRACTION", 0.5)
    calls = {"score": [], "probs": [], "paste": []}

    def spy(name, real):
        def call(*args, **kwargs):
            found = real(*args, **kwargs)
            calls[name].append(found is not None)
            return found

        return call

    monkeypatch.setattr(MaskBlocks, "score", spy("score", MaskBlocks.score))
    monkeypatch.setattr(MaskBlocks, "probs", spy("probs", MaskBlocks.probs))
    monkeypatch.setattr(block_masks, "paste_cropped", spy("paste", block_masks.paste_cropped))
    return calls


def _fast_and_plain(cate, kernels, features, sizes, outputs, **kwargs):
    """Results of the fast and the plain post-processors (stride 4, extents from the sizes);
    asserts that they are identical."""
    extents = [(-(-h // 4), -(-w // 4)) for h, w in sizes]
    results = []
    for path in ["fast", "plain"]:
        proc = SOLOv2PostProcessor(
            strides=STRIDES, mask_stride=4, inference_path=path, fast_masks=CPUCandidateMasks,
            **kwargs,
        )
        results.append(proc(cate, kernels, features, extents, sizes, outputs))
    # "plain" turns every fast path off.
    assert set(proc.last_paths.values()) == {"plain"}
    for fast, plain in zip(*results):
        assert fast.image_size == plain.image_size
        assert torch.equal(fast.scores, plain.scores)
        assert torch.equal(fast.pred_classes, plain.pred_classes)
        assert torch.equal(fast.pred_masks, plain.pred_masks)
        assert torch.equal(fast.pred_boxes.tensor, plain.pred_boxes.tensor)
    return results[0]


@pytest.mark.parametrize("outputs", [None, [(300, 400), (115, 135)]])
@pytest.mark.parametrize("chunk_size,topk", [(256, 500), (50, 100)])
def test_post_processor_fast_path_equals_the_plain_one(
    outputs, chunk_size, topk, monkeypatch, one_thread
):
    """A compact load of 600 candidates per image: the fast scoring (and, at the input's size,
    the cropped pasting) is taken and gives the plain path's detections, also where the pool
    is cut to the top `pre_nms_topk` after other chunks than on the plain path."""
    cate, kernels, features = _compact_load(2, 600, (64, 80), seed=1)
    scores = torch.cat([pp.point_nms(c.sigmoid()).flatten(1) for c in cate], dim=1)
    assert (scores > 0.1).sum(dim=1).tolist() == [600, 600]
    sizes = [(256, 320), (230, 270)]  # mask extents 64 x 80 and 58 x 68
    calls = _spy(monkeypatch)
    found = _fast_and_plain(
        cate, kernels, features, sizes, outputs or sizes, chunk_size=chunk_size,
        pre_nms_topk=topk,
    )
    assert calls["score"] and all(calls["score"]) and calls["probs"] == [True]
    assert calls["paste"] == ([True, True] if outputs is None else [])
    assert all(len(r) > 20 for r in found)


def test_post_processor_fast_path_on_channels_last_features(monkeypatch, one_thread):
    cate, kernels, features = _compact_load(2, 300, (64, 80), seed=3)
    features = features.contiguous(memory_format=torch.channels_last)
    sizes = [(256, 320), (250, 300)]
    calls = _spy(monkeypatch)
    found = _fast_and_plain(cate, kernels, features, sizes, sizes)
    assert all(calls["score"]) and calls["paste"] == [True, True]
    assert all(len(r) > 20 for r in found)


def test_post_processor_falls_back_to_the_plain_path_on_large_noisy_masks(
    monkeypatch, one_thread
):
    cate, kernels, features = _heavy_load(2, (32, 40), seed=2)
    sizes = [(128, 160), (100, 130)]
    calls = _spy(monkeypatch)
    found = _fast_and_plain(cate, kernels, features, sizes, sizes)
    # A sample of the candidates already shows large masks: no chunk computes its bounds.
    assert not any(calls["score"]) and not any(calls["probs"])
    assert calls["paste"] and not any(calls["paste"])
    assert all(len(r) > 20 for r in found)


def test_post_processor_with_one_candidate_per_image(monkeypatch, one_thread):
    """One candidate: both paths give each product at least 16 rows (a single row would take
    another BLAS kernel, which rounds differently), so the results are the same."""
    sizes = [(256, 320), (230, 270)]
    extents = [(64, 80), (58, 68)]
    calls = _spy(monkeypatch)
    found = 0
    for seed in range(10, 16):
        cate, kernels, features = _compact_load(2, 1, (64, 80), seed=seed)
        results = []
        for path in ["fast", "plain"]:
            proc = SOLOv2PostProcessor(
                strides=STRIDES, mask_stride=4, inference_path=path, fast_masks=CPUCandidateMasks
            )
            results.append(proc(cate, kernels, features, extents, sizes, sizes))
        for fast, plain in zip(*results):
            assert len(fast) == len(plain) <= 1
            found += len(fast)
            assert torch.equal(fast.scores, plain.scores)
            assert torch.equal(fast.pred_classes, plain.pred_classes)
            assert torch.equal(fast.pred_masks, plain.pred_masks)
            assert torch.equal(fast.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert found >= 8
    assert all(calls["score"]) and len(calls["score"]) == 6
    assert all(calls["paste"]) and len(calls["paste"]) == 12


def test_post_processor_with_chunks_of_both_paths(monkeypatch, one_thread):
    """Compact masks on the first levels' cells and large, noisy ones on the last levels': the
    pool holds masks of both paths (and is cut to the top `pre_nms_topk` across them)."""
    cate, kernels, features = _compact_load(2, 600, (64, 80), seed=4)
    g = torch.Generator().manual_seed(4)
    for level in (3, 4):
        cate[level] = torch.randn(cate[level].shape, generator=g)
        kernels[level] = 10 * torch.randn(kernels[level].shape, generator=g)
    sizes = [(256, 320), (230, 270)]
    calls = _spy(monkeypatch)
    # A sample of these candidates has mostly large masks: past it, each chunk decides.
    monkeypatch.setattr(MaskBlocks, "pass_fraction", lambda *args: 0.0)
    for topk in [500, 150]:
        found = _fast_and_plain(
            cate, kernels, features, sizes, sizes, chunk_size=32, pre_nms_topk=topk
        )
        assert all(len(r) > 20 for r in found)
    assert True in calls["score"] and False in calls["score"]


@needs_cuda
def test_post_processor_fast_path_on_cuda(monkeypatch):
    """`INFERENCE_PATH fast` on CUDA (TF32 off): the fast paths run there too and give the plain
    CUDA path's instances, on the device."""
    cate, kernels, features = _compact_load(2, 600, (64, 80), seed=4)
    on_cuda = ([c.cuda() for c in cate], [k.cuda() for k in kernels], features.cuda())
    sizes = [(256, 320), (230, 270)]
    calls = _spy(monkeypatch)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    found = _fast_and_plain(*on_cuda, sizes, sizes)
    assert all(r.pred_masks.is_cuda and len(r) > 20 for r in found)
    assert any(calls["score"]) and any(calls["paste"])


# The int8 intersections: `dense_intersections` against the float32 product, count for count.

# A torch without working int8 products (`torch._int_mm` is private) takes the float32 one.
needs_int8_products = pytest.mark.skipif(
    not _int8_products_work(), reason="this torch has no working torch._int_mm on the CPU"
)


@pytest.fixture
def int8_check_again():
    """`_int8_products_work` checked afresh for the test (which may change torch) and after it."""
    _int8_products_work.cache_clear()
    yield
    _int8_products_work.cache_clear()


@needs_int8_products
@pytest.mark.parametrize("shape", [(2, 0, 37), (1, 1, 9), (3, 17, 1000), (2, 33, 4097), (1, 5, 8)])
def test_int8_counts_equal_the_float_matrix_product(shape):
    g = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(shape, generator=g) > torch.rand(shape[0], shape[1], 1, generator=g)
    expected = mask_intersections(masks)
    counts = dense_intersections(masks)
    assert counts.dtype == torch.float32 and counts.shape == (shape[0], shape[1], shape[1])
    assert torch.equal(counts, expected)
    # Diagonal: the areas.
    assert torch.equal(counts.diagonal(dim1=1, dim2=2), masks.sum(dim=2).float())


def _dense_masks(seed):
    """`CPUCandidateMasks` of a small batch (no blocks: intersections of dense masks)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 8, 12, 16, generator=g)
    kernels, valid = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)
    masks = CPUCandidateMasks(features, None, 0.5, 4, 256, kernels=kernels, valid=valid)
    assert masks.blocks is None
    return masks


@needs_int8_products
def test_a_strided_view_and_the_dispatch():
    masks = torch.rand(2, 40, 300) > 0.3
    view = masks[:, ::2]  # not contiguous
    assert torch.equal(dense_intersections(view), mask_intersections(view))
    # Float inputs and masks of fewer than 8 pixels take the plain path.
    tiny = masks[..., :1]
    assert dense_intersections(masks.half()) is None and dense_intersections(tiny) is None
    computation = _dense_masks(1)
    assert torch.equal(computation.intersections(view), mask_intersections(view))
    assert computation.paths == {"intersections": "int8"}
    assert torch.equal(computation.intersections(masks.half()), mask_intersections(masks))
    assert torch.equal(computation.intersections(tiny), mask_intersections(tiny))
    assert computation.paths == {"intersections": "int8+plain"}


@needs_int8_products
def test_counts_beyond_half_precision():
    masks = torch.ones(1, 3, 300 * 300, dtype=torch.bool)
    masks[0, 2, 70_000:] = False
    counts = dense_intersections(masks)
    assert counts[0].tolist() == [[90_000.0] * 2 + [70_000.0]] * 2 + [[70_000.0] * 3]


@needs_int8_products
@pytest.mark.parametrize("seed", range(3))
def test_dense_intersections_equal_the_plain_ones_on_random_masks(seed):
    """Random bool masks of random densities, batches and sizes, contiguous or not."""
    g = torch.Generator().manual_seed(seed)
    b, n, p = 1 + seed, int(torch.randint(1, 80, (1,), generator=g)), 8 + 997 * seed
    density = torch.rand(b, n, 1, generator=g)
    masks = torch.rand(b, n, 2 * p, generator=g) < density
    for x in [masks, masks[..., ::2], masks[:, ::2]]:
        counts = dense_intersections(x)
        assert counts is not None and torch.equal(counts, mask_intersections(x))


def _fail(*args):
    raise RuntimeError("int8 products are not supported here")


def _int_mm_missing(monkeypatch):
    monkeypatch.delattr(torch, "_int_mm")
    _int8_products_work.cache_clear()  # checked again, without them


def _int_mm_failing(monkeypatch):
    monkeypatch.setattr(torch, "_int_mm", _fail)
    _int8_products_work.cache_clear()


def _int_mm_failing_after_the_check(monkeypatch):
    assert _int8_products_work()  # checked with the real products, which then fail
    monkeypatch.setattr(torch, "_int_mm", _fail)


@needs_int8_products
@pytest.mark.parametrize(
    "breaking", [_int_mm_missing, _int_mm_failing, _int_mm_failing_after_the_check]
)
def test_without_working_int8_products_the_plain_intersections(
    breaking, monkeypatch, int8_check_again, one_thread
):
    """Without `torch._int_mm`, or where it raises: `dense_intersections` gives None, and the
    post-processor takes the plain intersections with the same detections."""
    cate, kernels, features = _heavy_load(2, (32, 40), seed=2)
    sizes = [(128, 160), (100, 130)]
    extents = [(32, 40), (25, 33)]
    proc = SOLOv2PostProcessor(
        strides=STRIDES, mask_stride=4, inference_path="fast", fast_masks=CPUCandidateMasks
    )
    with_int8 = proc(cate, kernels, features, extents, sizes, sizes)
    assert proc.last_paths["intersections"] == "int8"
    assert proc.last_paths["scoring"] == "plain"  # large masks: dense binary masks
    masks = torch.rand(2, 30, 500) > 0.5
    breaking(monkeypatch)
    assert dense_intersections(masks) is None
    found = proc(cate, kernels, features, extents, sizes, sizes)
    assert proc.last_paths["intersections"] == "plain"
    assert len(found) == 2 and all(len(r) > 20 for r in found)
    for ours, theirs in zip(found, with_int8):
        assert torch.equal(ours.scores, theirs.scores)
        assert torch.equal(ours.pred_classes, theirs.pred_classes)
        assert torch.equal(ours.pred_masks, theirs.pred_masks)
        assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)


# The choice of the computation.


def _choose(monkeypatch, exporting, force):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
    features, kernels, valid, _ = _blob_case(8, (61, 77), (50, 35), 40, largest=0.4)
    return CPUCandidateMasks.choose(
        features, None, 0.5, 4, 256, kernels=kernels, valid=valid, force=force
    )


@pytest.mark.parametrize("force", [False, True])
def test_choose_takes_the_cpu_computation_on_the_cpu(force, monkeypatch):
    chosen = _choose(monkeypatch, exporting=False, force=force)
    assert isinstance(chosen, CPUCandidateMasks) and chosen.force == force


def test_choose_takes_the_plain_computation_while_exporting(monkeypatch):
    """A graph being exported holds the plain computation (unless forced)."""
    chosen = _choose(monkeypatch, exporting=True, force=False)
    assert type(chosen) is CandidateMasks
    forced = _choose(monkeypatch, exporting=True, force=True)
    assert isinstance(forced, CPUCandidateMasks)


# Block bounds, grouped products and buffers.


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
    monkeypatch.setattr(block_masks, "EVERY_BLOCK_FRACTION", 1.0)
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
    monkeypatch.setattr(block_masks, "EVERY_BLOCK_FRACTION", fraction)
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
    monkeypatch.setattr(block_masks, "_GROUP_ROWS", 256)
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
