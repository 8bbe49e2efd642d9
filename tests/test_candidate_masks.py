import math

import pytest
import torch
import torch.nn.functional as F

from solov2_d2.candidate_masks import BLOCK, candidate_masks, lazy_zeros
from solov2_d2.heads import dynamic_mask_logits
from solov2_d2.matrix_nms import mask_boxes

SUPPORT = 0.5 * (1 - 2.0**-18)


def _blob_features(batch, dim, height, width, seed):
    """Mask features whose channels are discs (logit-like: positive inside, falling outside),
    so that kernels picking a channel give local masks, as a trained model's do."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    cy = torch.rand(batch, dim, 1, 1, generator=g) * height
    cx = torch.rand(batch, dim, 1, 1, generator=g) * width
    radius = 1 + torch.rand(batch, dim, 1, 1, generator=g) * 6
    return (radius - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()).clamp(min=-8)


def _dense(feats, kernels, extents):
    """The straightforward computation: all soft masks, binary inside each image's extent."""
    soft = dynamic_mask_logits(feats, kernels).sigmoid()
    binary = soft > 0.5
    for i, (rows, cols) in enumerate(extents):
        binary[i, :, rows:] = False
        binary[i, :, :, cols:] = False
    return soft, binary


def _check(feats, kernels, extents, valid=None):
    masks = candidate_masks(feats, kernels, extents, 0.5, SUPPORT, valid)
    soft, binary = _dense(feats, kernels, extents)
    if valid is not None:
        binary &= valid[..., None, None]
    h, w = feats.shape[2:]
    assert not masks.binary[..., h:, :].any() and not masks.binary[..., w:].any()
    assert torch.equal(masks.binary[..., :h, :w], binary)
    assert torch.equal(masks.areas, binary.sum(dim=(2, 3)))
    torch.testing.assert_close(masks.soft_sums, (soft * binary).sum(dim=(2, 3)))
    if masks.boxes is not None:
        # The boxes of the blocks that the masks touch.
        nonempty = binary.flatten(2).any(dim=2)
        tight = mask_boxes(binary.flatten(0, 1)).view(*binary.shape[:2], 4)[nonempty]
        boxes = masks.boxes[nonempty]
        assert torch.equal(boxes[:, :2], tight[:, :2] // BLOCK * BLOCK)
        assert torch.equal(boxes[:, 2:], tight[:, 2:] // BLOCK * BLOCK + BLOCK - 1)
        assert (masks.boxes[~nonempty][:, 2:] == -1).all()

    # The kept candidates' soft masks: exact wherever pasting reads them (within 2 pixels of a
    # pixel above the support threshold), below that threshold everywhere else.
    b, k = kernels.shape[:2]
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(k, generator=g)[: k // 2] for _ in range(b)])
    kept = torch.rand(keep.shape, generator=g) > 0.2
    if valid is not None:
        kept &= valid.gather(1, keep)  # NMS keeps only valid candidates
    ours = masks.soft_masks(keep, kept)
    expected = soft[torch.arange(b)[:, None], keep] * kept[..., None, None]
    assert ours.shape == expected.shape
    # Pasting reads the image's extent and one more row and column.
    readable = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i, (rows, cols) in enumerate(extents):
        readable[i, :, : rows + 1, : cols + 1] = True
    above = (expected > SUPPORT) & readable
    near = (F.max_pool2d(above.float(), 5, stride=1, padding=2) > 0) & readable
    assert torch.equal(ours[near], expected[near])
    assert (ours[readable.expand_as(ours) & ~near] <= SUPPORT).all()
    return masks


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equal_to_the_dense_computation(batch, layout):
    feats = _blob_features(batch, 16, 43, 61, seed=batch)  # not multiples of BLOCK
    g = torch.Generator().manual_seed(2)
    kernels = torch.randn(batch, 60, 16, generator=g)
    extents = [(43, 61), (30, 50), (43, 40)][:batch]
    _check(feats.contiguous(memory_format=layout), kernels, extents)


def test_k_by_k_kernels_are_computed_densely():
    feats = _blob_features(2, 8, 24, 32, seed=3)
    kernels = torch.randn(2, 20, 8 * 9, generator=torch.Generator().manual_seed(3))
    _check(feats, kernels, [(24, 32), (20, 27)])


def test_logits_at_the_threshold_are_decided_as_densely():
    """Features constant over each block (the bound is then the logit itself) and large terms
    that cancel to within float rounding of 0 (probability 0.5) in isolated blocks, surrounded by
    blocks far below the threshold: the bound's margin must not skip a block that the dense
    computation finds foreground, or one near the support threshold."""
    g = torch.Generator().manual_seed(4)
    images, blocks, dim = 20, 9, 32
    kernels = torch.randn(images, 1, dim, generator=g) * 100
    # Per image, block vectors: far below the threshold (logit -1e5 |k|^2)...
    values = -1e-1 * kernels.expand(-1, blocks * blocks, -1).clone()
    # ... but at even rows and columns about 0, +- 1e-3 (the last channel solved for).
    tuned = torch.tensor([y % 2 == 0 and x % 2 == 0 for y in range(blocks) for x in range(blocks)])
    near_zero = torch.randn(images, int(tuned.sum()), dim, generator=g) * 100
    rest = (near_zero[..., :-1] * kernels[..., :-1]).sum(dim=2)
    delta = torch.rand(rest.shape, generator=g) * 2e-3 - 1e-3
    near_zero[..., -1] = (delta - rest) / kernels[..., -1]
    values[:, tuned] = near_zero
    grid = values.transpose(1, 2).reshape(images, dim, blocks, 1, blocks, 1)
    feats = grid.expand(-1, -1, -1, BLOCK, -1, BLOCK).reshape(images, dim, blocks * BLOCK, -1)
    masks = candidate_masks(feats, kernels, [(blocks * BLOCK, blocks * BLOCK)] * images, 0.5,
                            SUPPORT)
    exact = torch.einsum("bke,behw->bkhw", kernels.double(), feats.double())
    # Float32 logits of the terms here are off by up to about 1e-2 from the exact ones: only
    # clear cases are compared.
    assert torch.equal(masks.binary[exact > 1e-2], torch.ones_like(exact > 1e-2)[exact > 1e-2])
    assert not masks.binary[exact < -1e-2].any()
    # Every pixel whose exact probability exceeds the support threshold was computed (a
    # skipped block reads 0, a computed one about 0.5).
    soft = masks.soft_masks(torch.zeros(images, 1, dtype=torch.long),
                            torch.ones(images, 1, dtype=torch.bool))
    must = exact > math.log(SUPPORT / (1 - SUPPORT))
    assert 0 < must.sum() < tuned.sum() * BLOCK * BLOCK * images
    assert (soft[must] > 0.4).all()


def test_invalid_candidates_are_not_computed():
    feats = _blob_features(2, 16, 32, 40, seed=5)
    kernels = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(5))
    valid = torch.rand(2, 30, generator=torch.Generator().manual_seed(6)) > 0.5
    masks = _check(feats, kernels, [(32, 40), (32, 40)], valid)
    assert (masks.areas[~valid] == 0).all() and (masks.soft_sums[~valid] == 0).all()


def test_only_blocks_near_the_masks_are_computed():
    # Kernels that each pick one disc channel: masks of a few blocks in a 25 x 42 block map.
    feats = _blob_features(1, 32, 200, 336, seed=7)
    kernels = torch.zeros(1, 64, 32)
    kernels[0, torch.arange(64), torch.arange(64) % 32] = 1.0
    masks = _check(feats, kernels, [(200, 336)])
    blocks = (200 // BLOCK) * (336 // BLOCK)
    computed = len(masks._masks)
    assert masks.areas.min() > 0
    assert computed < 0.05 * 64 * blocks


def test_thresholds_are_checked():
    feats = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="threshold"):
        candidate_masks(feats, torch.zeros(1, 2, 4), [(8, 8)], 1.0, 0.5)
    with pytest.raises(ValueError, match="support threshold"):
        candidate_masks(feats, torch.zeros(1, 2, 4), [(8, 8)], 0.5, 0.7)


def test_lazy_zeros_are_zero_and_writable():
    for dtype in (torch.bool, torch.float32):
        x = lazy_zeros((3, 50, 70), dtype, torch.device("cpu"))
        assert x.shape == (3, 50, 70) and x.dtype == dtype and x.is_contiguous()
        assert not x.any()
        x[1, 2, 3] = 1
        assert x.sum() == 1
    assert lazy_zeros((0, 5), torch.bool, torch.device("cpu")).shape == (0, 5)


def test_no_block_can_reach_the_threshold():
    feats = torch.ones(2, 8, 16, 24)
    kernels = -torch.ones(2, 5, 8)  # every logit is -8
    masks = candidate_masks(feats, kernels, [(16, 24), (10, 12)], 0.5, SUPPORT)
    assert not masks.binary.any() and (masks.areas == 0).all() and len(masks._masks) == 0
    soft = masks.soft_masks(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    assert soft.shape == (2, 3, 16, 24) and not soft.any()
