import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from solov2_d2 import postprocess as pp
from solov2_d2.heads import dynamic_mask_logits, flatten_levels
from solov2_d2.matrix_nms import batched_matrix_nms
from solov2_d2.postprocess import SOLOv2PostProcessor, masks_to_boxes, point_nms

GRIDS = [40, 36, 24, 16, 12]


def _processor(**kwargs):
    args = dict(strides=[8, 8, 16, 32, 32], mask_stride=4)
    args.update(kwargs)
    return SOLOv2PostProcessor(**args)


def _head_outputs(batch, padded=(128, 160), classes=5, dim=16, seed=0):
    """Random head outputs with real candidates: a few cells per image score high and their
    kernels pick out blob-like masks from a mask feature built of blobs."""
    g = torch.Generator().manual_seed(seed)
    cate = [torch.randn(batch, classes, s, s, generator=g) * 2 - 3 for s in GRIDS]
    kernels = [torch.randn(batch, dim, s, s, generator=g) for s in GRIDS]
    hm, wm = padded[0] // 4, padded[1] // 4
    ys = torch.arange(hm).view(-1, 1).float()
    xs = torch.arange(wm).view(1, -1).float()
    feats = []
    for _ in range(batch):
        blobs = []
        for _ in range(dim):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([hm, wm])
            r = 3 + torch.rand(1, generator=g) * 8
            blobs.append(r - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt())
        feats.append(torch.stack(blobs))
    return cate, kernels, torch.stack(feats)


def test_point_nms_keeps_exactly_the_local_maxima():
    scores = torch.rand(2, 3, 7, 7)
    kept = point_nms(scores)
    for b in range(2):
        for c in range(3):
            for i in range(7):
                for j in range(7):
                    # The window: this cell and its neighbours above and to the left.
                    window = scores[b, c, max(i - 1, 0) : i + 1, max(j - 1, 0) : j + 1]
                    expected = scores[b, c, i, j] if scores[b, c, i, j] == window.max() else 0
                    assert kept[b, c, i, j] == expected


def test_boxes_are_the_tight_bounds_of_the_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 31, 47, generator=g) > 0.97
    masks[3] = False
    boxes = masks_to_boxes(masks)
    for m, box in zip(masks.numpy(), boxes.tolist()):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            expected = [0, 0, 0, 0]
        else:
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert box == expected
    assert masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


def test_batched_results_equal_per_image_results():
    sizes = [(128, 160), (100, 130), (61, 75)]
    outputs = [(120, 150), (200, 260), (61, 75)]
    cate, kernels, feats = _head_outputs(3)
    proc = _processor(score_thresh=0.2)
    batched = proc(cate, kernels, feats, sizes, outputs)
    assert sum(len(r) for r in batched) > 10
    for i in range(3):
        alone = proc(
            [c[i : i + 1] for c in cate], [k[i : i + 1] for k in kernels], feats[i : i + 1],
            [sizes[i]], [outputs[i]],
        )[0]
        ours = batched[i]
        assert ours.image_size == outputs[i] == alone.image_size
        torch.testing.assert_close(ours.scores, alone.scores)
        assert torch.equal(ours.pred_classes, alone.pred_classes)
        assert torch.equal(ours.pred_masks, alone.pred_masks)
        assert torch.equal(ours.pred_boxes.tensor, alone.pred_boxes.tensor)
        assert torch.equal(ours.pred_boxes.tensor, masks_to_boxes(ours.pred_masks))
        assert (ours.scores[:-1] >= ours.scores[1:]).all()
        assert ours.pred_masks.dtype == torch.bool and ours.pred_classes.dtype == torch.int64


def test_padding_outside_an_image_does_not_change_its_result():
    """An image padded by a larger neighbour gets the same detections as with its own padding,
    even where its masks would leak into the padding."""
    cate, kernels, feats = _head_outputs(1, padded=(128, 160))
    proc = _processor(score_thresh=0.2)
    small = proc(cate, kernels, feats, [(96, 120)], [(96, 120)])[0]
    bigger = F.pad(feats, (0, 8, 0, 8), value=5.0)  # strong activations in the extra padding
    padded = proc(cate, kernels, bigger, [(96, 120)], [(96, 120)])[0]
    assert len(small) > 0
    torch.testing.assert_close(small.scores, padded.scores)
    assert torch.equal(small.pred_masks, padded.pred_masks)


def _reference_paste(soft, image_size, output_size, stride=4, thresh=0.5):
    """The straightforward pasting: upsample the whole padded soft masks [N, Hm, Wm], crop the
    image, resize to the output size; also the bilinear values before thresholding."""
    up = F.interpolate(
        soft[None], scale_factor=stride, mode="bilinear", align_corners=False
    )[..., : image_size[0], : image_size[1]]
    if tuple(output_size) != tuple(image_size):
        up = F.interpolate(up, size=output_size, mode="bilinear", align_corners=False)
    return up[0] > thresh, up[0]


def _reference_postprocess(proc, cate_logits, kernels, mask_features, image_sizes, output_sizes):
    """SOLOv2PostProcessor's steps done the straightforward way: all soft masks of the top
    candidates at once, whole-map pasting, boxes from the full masks."""
    scores = flatten_levels([point_nms(x.sigmoid()) for x in cate_logits])
    kernels = flatten_levels(kernels)
    cell_strides = torch.cat(
        [torch.full((x.shape[2] * x.shape[3],), s) for x, s in zip(cate_logits, proc.strides)]
    )
    num_classes = scores.shape[2]
    k = min(proc.max_mask_candidates, scores.shape[1] * num_classes)
    cand_scores, flat_index = scores.flatten(1).topk(k, dim=1)
    cells, labels = flat_index // num_classes, flat_index % num_classes
    valid = cand_scores > proc.score_thresh
    cand_kernels = kernels.gather(1, cells[..., None].expand(-1, -1, kernels.shape[2]))
    soft = dynamic_mask_logits(mask_features, cand_kernels).sigmoid()
    inside = torch.zeros(soft.shape[0], 1, *soft.shape[2:], dtype=torch.bool)
    for i, (h, w) in enumerate(image_sizes):
        inside[i, :, : -(-h // 4), : -(-w // 4)] = True
    binary = (soft > proc.mask_thresh) & inside
    areas = binary.sum(dim=(2, 3))
    valid &= areas > cell_strides[cells]
    cand_scores = cand_scores * (soft * binary).sum(dim=(2, 3)) / areas.clamp(min=1)
    nms = batched_matrix_nms(
        binary, labels, cand_scores, valid, kernel=proc.nms_kernel, sigma=proc.nms_sigma,
        score_thresh=proc.update_thresh, pre_nms_topk=proc.pre_nms_topk,
        max_per_image=proc.max_per_image, mask_areas=areas,
    )
    results = []
    for i, n in enumerate(nms.valid.sum(dim=1).tolist()):
        masks = _reference_paste(soft[i, nms.keep[i, :n]], image_sizes[i], output_sizes[i])[0]
        results.append((masks, nms.scores[i, :n], nms.labels[i, :n], masks_to_boxes(masks)))
    return results


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_results_equal_the_straightforward_path(kernel):
    sizes = [(128, 160), (100, 130), (61, 75)]
    outputs = [(128, 160), (200, 260), (50, 61)]
    cate, kernels, feats = _head_outputs(3, seed=7)
    proc = _processor(score_thresh=0.2, nms_kernel=kernel, max_mask_candidates=300)
    ours = proc(cate, kernels, feats, sizes, outputs)
    reference = _reference_postprocess(proc, cate, kernels, feats, sizes, outputs)
    assert sum(len(r) for r in ours) > 30
    for r, (masks, scores, labels, boxes) in zip(ours, reference):
        torch.testing.assert_close(r.scores, scores)
        assert torch.equal(r.pred_classes, labels)
        assert torch.equal(r.pred_masks, masks)
        assert torch.equal(r.pred_boxes.tensor, boxes)


def test_channels_last_mask_features_give_the_same_results():
    cate, kernels, feats = _head_outputs(2, seed=2)
    proc = _processor(score_thresh=0.2)
    args = ([(128, 160), (97, 150)], [(128, 160), (97, 150)])
    a = proc(cate, kernels, feats, *args)
    b = proc(cate, kernels, feats.contiguous(memory_format=torch.channels_last), *args)
    assert sum(len(r) for r in a) > 10
    for x, y in zip(a, b):
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_masks, y.pred_masks)


def _random_soft_masks(num, height, width, seed):
    """Soft masks [num, H, W] of every size: discs of radii from below a pixel to larger than
    the map, anywhere including across the borders, with noise; plus empty and full masks."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    cy = torch.rand(num, generator=g) * (height + 8) - 4
    cx = torch.rand(num, generator=g) * (width + 8) - 4
    radius = torch.exp(torch.rand(num, generator=g) * math.log(2 * max(height, width) / 0.3))
    radius = radius * 0.3
    dist = ((ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2).sqrt()
    logits = (radius[:, None, None] - dist) / 2 + 0.3 * torch.randn(num, height, width, generator=g)
    logits[0] = -5  # empty
    logits[1] = 5  # everything
    return logits.sigmoid()


@pytest.mark.parametrize(
    "image_size,output_size",
    [
        ((128, 160), (128, 160)),  # no padding
        ((97, 131), (97, 131)),  # padding: the mask map is larger than the image
        ((61, 75), (300, 400)),  # upscaled output
        ((128, 160), (77, 93)),  # downscaled output
        ((100, 157), (100, 203)),  # only the width resized
    ],
)
def test_paste_equals_upsampling_the_whole_padded_map(image_size, output_size):
    proc = _processor()
    soft = _random_soft_masks(60, 32, 40, seed=sum(output_size))
    masks, boxes = proc._paste(soft, image_size, output_size)
    expected, values = _reference_paste(soft, image_size, output_size)
    assert masks.shape == expected.shape and masks.dtype == torch.bool
    differ = masks != expected
    if tuple(output_size) == tuple(image_size):
        assert not differ.any()  # the upsampling is F.interpolate's, bit for bit
    else:
        # The resizing is equal up to float rounding: only pixels at the threshold may differ.
        assert ((values[differ] - 0.5).abs() < 1e-5).all()
    assert torch.equal(boxes, masks_to_boxes(masks))
    assert 0 < masks.flatten(1).any(dim=1).sum() < len(masks)  # empty, partial and full masks


def test_masks_are_computed_only_for_the_top_candidates(monkeypatch):
    seen = []
    real = pp.candidate_masks

    def spy(features, kernels, *args):
        seen.append(kernels.shape)
        return real(features, kernels, *args)

    monkeypatch.setattr(pp, "candidate_masks", spy)
    cate, kernels, feats = _head_outputs(2)
    cate = [torch.full_like(c, 5.0) for c in cate]  # every (cell, class) above threshold
    _processor(max_mask_candidates=37)(cate, kernels, feats, [(128, 160)] * 2, [(128, 160)] * 2)
    assert seen == [torch.Size([2, 37, 16])]
    # Only candidates above the threshold: none computes no mask at all.
    cate = [torch.full_like(c, -5.0) for c in cate]
    cate[2][1, 3, 5, 7] = 5.0
    _processor()(cate, kernels, feats, [(128, 160)] * 2, [(128, 160)] * 2)
    assert seen[1] == torch.Size([2, 1, 16])
    cate[2][1, 3, 5, 7] = -5.0
    results = _processor()(cate, kernels, feats, [(128, 160)] * 2, [(128, 160)] * 2)
    assert len(seen) == 2 and [len(r) for r in results] == [0, 0]


def test_limits_and_thresholds():
    cate, kernels, feats = _head_outputs(2, seed=3)
    results = _processor(score_thresh=0.1, max_per_image=4)(
        cate, kernels, feats, [(128, 160)] * 2, [(128, 160)] * 2
    )
    assert all(len(r) == 4 for r in results)
    loose = _processor(score_thresh=0.1, update_thresh=0.3)(
        cate, kernels, feats, [(128, 160)] * 2, [(128, 160)] * 2
    )
    assert all((r.scores >= 0.3).all() for r in loose)


def test_empty_results_have_the_right_types():
    cate, kernels, feats = _head_outputs(2)
    cate = [torch.full_like(c, -20.0) for c in cate]
    results = _processor()(cate, kernels, feats, [(128, 160), (90, 100)], [(64, 80), (90, 100)])
    for r, size in zip(results, [(64, 80), (90, 100)]):
        assert len(r) == 0 and r.image_size == size
        assert r.pred_masks.shape == (0, *size) and r.pred_masks.dtype == torch.bool
        assert r.scores.dtype == torch.float32 and r.scores.shape == (0,)
        assert r.pred_classes.dtype == torch.int64
        assert r.pred_boxes.tensor.shape == (0, 4)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_small_masks_are_dropped_by_their_level_stride(kernel):
    cate, kernels, feats = _head_outputs(1, seed=5)
    results = _processor(score_thresh=0.1, nms_kernel=kernel)(
        cate, kernels, feats, [(128, 160)], [(128, 160)]
    )
    # Output masks are 4x upsampled: a kept mask had more than 8 pixels at stride 4.
    assert all(m.sum() > 8 * 16 * 0.5 for m in results[0].pred_masks)
