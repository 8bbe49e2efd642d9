"""Boxes not widened by stray fragments (MODEL.SOLOV2.BOX_FROM "main_parts"): connected parts
of masks, all at once, on the CPU and the GPU; the boxes of the main parts."""
import cv2
import numpy as np
import pytest
import torch
from conftest import small_solov2_cfg
from devices import needs_cuda
from test_pipeline import _head_outputs, _processor, _run, path  # noqa: F401  (a fixture)

from solov2_d2.config import check_solov2_config
from solov2_d2.inference.masks import (
    connected_parts,
    main_part_boxes,
    masks_to_boxes,
    paste_masks,
)
from solov2_d2.inference.pipeline import SOLOv2PostProcessor


def _spiral(size=31):
    """A one-pixel-wide square spiral: one part whose far end is ~size^2 / 2 steps away."""
    m = np.zeros((size, size), np.uint8)
    y, x, dy, dx, length = size // 2, size // 2, 0, 1, 1
    m[y, x] = 1
    while True:
        for _ in range(2):
            for _ in range(length):
                y, x = y + dy, x + dx
                if not (0 <= y < size and 0 <= x < size):
                    return m
                m[y, x] = 1
            # Leave a gap of one pixel between the turns: the next turn starts 2 further.
            dy, dx = dx, -dy
        length += 2


def _random_masks(seed, n=6, shape=(23, 37)):
    rng = np.random.default_rng(seed)
    density = np.linspace(0.2, 0.7, n)[:, None, None]
    return torch.from_numpy(rng.random((n, *shape)) < density)


def _assert_parts_of_opencv(masks):
    labels = connected_parts(masks)
    assert labels.dtype == torch.int64 and labels.shape == masks.shape
    assert torch.equal(labels > 0, masks)
    for m, lab in zip(masks.numpy().astype(np.uint8), labels.numpy()):
        count, reference = cv2.connectedComponents(m, connectivity=8)
        pairs = {(a, b) for a, b in zip(lab[m > 0], reference[m > 0])}
        assert len(pairs) == count - 1 == len({a for a, _ in pairs}), "the same partition"
        flat = np.arange(m.size).reshape(m.shape) + 1
        for a, b in pairs:  # the label is 1 + the part's largest flat index
            assert a == flat[reference == b].max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_parts_are_opencvs_8_connected_components(seed):
    _assert_parts_of_opencv(_random_masks(seed))


def test_connected_parts_follow_a_long_spiral_and_leave_empty_masks_alone():
    spiral = torch.from_numpy(_spiral()).bool()
    assert spiral.sum() > 400
    masks = torch.stack([spiral, torch.zeros_like(spiral), spiral.flip(1), ~spiral])
    _assert_parts_of_opencv(masks)
    assert connected_parts(masks[:0]).shape == (0, 31, 31)


def _probs(*boxes, size=(20, 24)):
    """Mask probabilities [N, h_m, w_m]: 0.9 inside the boxes (x0, y0, x1, y1) of each mask."""
    out = []
    for parts in boxes:
        p = torch.full(size, 0.1)
        for x0, y0, x1, y1 in parts:
            p[y0:y1, x0:x1] = 0.9
        out.append(p)
    return torch.stack(out)


@pytest.mark.parametrize("output_size", [(80, 96), (120, 150), (50, 61)])
def test_a_fragment_does_not_widen_the_box(output_size):
    """Mask 0: a 6x5 blob and a 1-pixel fragment 8 pixels away (the box is the blob's);
    mask 1: the blob alone (tight box); mask 2: two parts of 12 and 10 pixels (both main at
    0.1: tight); mask 3: empty."""
    blob, fragment = (3, 4, 9, 9), (18, 15, 19, 16)
    probs = _probs([blob, fragment], [blob], [(2, 2, 6, 5), (10, 10, 12, 15)], [])
    image_size = (80, 96)  # the extent of 20 x 24 mask pixels at stride 4
    masks, tight = paste_masks(probs, image_size, output_size, 4, 0.5)
    boxes = main_part_boxes(masks, probs, 0.5, image_size, 4, 0.1)
    assert torch.equal(boxes[0], masks_to_boxes(masks[1:2])[0])
    assert not torch.equal(boxes[0], tight[0]), "the fragment widened the tight box"
    assert torch.equal(boxes[1:], tight[1:])
    assert boxes[3].tolist() == [0, 0, 0, 0]
    # The largest part is main whatever the fraction; fraction 0 keeps every part.
    assert torch.equal(main_part_boxes(masks, probs, 0.5, image_size, 4, 1.0)[:2], boxes[:2])
    assert torch.equal(main_part_boxes(masks, probs, 0.5, image_size, 4, 0.0), tight)


def test_only_parts_below_the_fraction_are_fragments():
    """Parts of 30 and 4 mask pixels: a fragment at 0.2 (4 < 0.2 * 34), main at 0.1."""
    probs = _probs([(3, 4, 9, 9), (18, 15, 20, 17)])
    masks, tight = paste_masks(probs, (80, 96), (80, 96), 4, 0.5)
    assert not torch.equal(main_part_boxes(masks, probs, 0.5, (80, 96), 4, 0.2), tight)
    assert torch.equal(main_part_boxes(masks, probs, 0.5, (80, 96), 4, 0.1), tight)


def test_the_post_processor_boxes_main_parts_within_the_tight_boxes(path):  # noqa: F811
    """Same masks with either option; "main_parts" boxes lie within the tight ones and differ
    only for masks with a fragment."""
    cate, kernels, feats = _head_outputs(2, seed=3)
    sizes = [(120, 150), (100, 160)]
    tight = _run(_processor(), cate, kernels, feats, sizes, [(240, 300), (100, 160)])
    main = _run(_processor(box_from="main_parts", min_part_fraction=0.2), cate, kernels, feats,
                sizes, [(240, 300), (100, 160)])  # fmt: skip
    changed = 0
    for a, b in zip(tight, main):
        assert len(a) and torch.equal(a.pred_masks, b.pred_masks)
        t, m = a.pred_boxes.tensor, b.pred_boxes.tensor
        assert (m[:, :2] >= t[:, :2]).all() and (m[:, 2:] <= t[:, 2:]).all()
        changed += int((m != t).any(dim=1).sum())
    assert changed > 0, "some random masks have fragments"


def test_box_from_is_read_from_the_config_and_checked_naming_the_key():
    cfg = small_solov2_cfg()
    assert cfg.MODEL.SOLOV2.BOX_FROM == "tight"
    assert SOLOv2PostProcessor(cfg, mask_stride=4).box_from == "tight"
    cfg.MODEL.SOLOV2.BOX_FROM = "main_parts"
    cfg.MODEL.SOLOV2.BOX_MIN_PART_FRACTION = 0.25
    proc = SOLOv2PostProcessor(cfg, mask_stride=4)
    assert (proc.box_from, proc.min_part_fraction) == ("main_parts", 0.25)
    cfg.MODEL.SOLOV2.BOX_FROM = "largest"
    with pytest.raises(ValueError, match="MODEL.SOLOV2.BOX_FROM = 'largest'"):
        check_solov2_config(cfg)
    with pytest.raises(ValueError, match="MODEL.SOLOV2.BOX_FROM = 'largest'"):
        SOLOv2PostProcessor(cfg, mask_stride=4)
    cfg.MODEL.SOLOV2.BOX_FROM = "main_parts"
    cfg.MODEL.SOLOV2.BOX_MIN_PART_FRACTION = 1.5
    with pytest.raises(ValueError, match="MODEL.SOLOV2.BOX_MIN_PART_FRACTION = 1.5"):
        check_solov2_config(cfg)


@needs_cuda
def test_parts_and_boxes_on_the_gpu_equal_the_cpus():
    masks = torch.cat([_random_masks(s) for s in range(3)])
    assert torch.equal(connected_parts(masks.cuda()).cpu(), connected_parts(masks))
    probs = _probs([(3, 4, 9, 9), (18, 15, 19, 16)], [(1, 1, 3, 3), (5, 5, 20, 18)])
    masks, _ = paste_masks(probs, (80, 96), (160, 192), 4, 0.5)
    expected = main_part_boxes(masks, probs, 0.5, (80, 96), 4, 0.1)
    found = main_part_boxes(masks.cuda(), probs.cuda(), 0.5, (80, 96), 4, 0.1)
    assert torch.equal(found.cpu(), expected)
