import json
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED
from devices import HostSyncCounter, needs_cuda

from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from solov2_d2.modeling.targets import _row_and_column_counts, assign_targets, downsample_masks

FRUIT = SHARED / "data" / "fruit"
DEFAULT_GRIDS = [40, 36, 24, 16, 12]
DEFAULT_RANGES = [(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)]


def _instances(masks, classes, boxes=None):
    """Instances of bool masks [M, H, W]; boxes default to the masks' tight boxes."""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    inst = Instances(tuple(masks.shape[1:]))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    inst.gt_boxes = Boxes(
        torch.as_tensor(boxes, dtype=torch.float32).view(-1, 4)
        if boxes is not None
        else BitMasks(masks).get_bounding_boxes().tensor
    )
    return inst


def _cells(matched_row, grid, offset=0):
    """Positive (row, col) cells of one level of one image."""
    level = matched_row[offset : offset + grid * grid].view(grid, grid)
    return {tuple(rc) for rc in (level >= 0).nonzero().tolist()}


def test_centre_of_mass_not_box_centre():
    # An L shape: its centre of mass (69.9, 69.9) lies in cell (2, 2) of an 8 x 8 grid over
    # 256 x 256 while its box centre (96, 96) lies in cell (3, 3).
    mask = np.zeros((256, 256), bool)
    mask[0:64, 0:192] = True
    mask[64:192, 0:64] = True
    t = assign_targets(
        [_instances(mask[None], [5], [[0, 0, 192, 192]])], (256, 256), [8], [(1, 1000)], 0.2, 9, 4
    )
    # Half-extents 0.1 * 192 = 19.2 px: rows/cols floor((69.9 -+ 19.2) / 32) = 1..2.
    assert _cells(t.matched[0], 8) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert set(t.labels[0].unique().tolist()) == {5, 9}
    assert (t.labels[0] == 5).sum() == 4


def test_region_clipped_to_3x3_around_centre_cell():
    mask = np.zeros((256, 256), bool)
    mask[10:250, 20:240] = True
    # sigma 1: the centre region covers the whole box, far more than 3 x 3 cells of 16 x 16.
    t = assign_targets([_instances(mask[None], [0])], (256, 256), [16], [(1, 1000)], 1.0, 3, 4)
    cy, cx = (10 + 249) / 2, (20 + 239) / 2
    row, col = int(cy // 16), int(cx // 16)
    expected = {(r, c) for r in range(row - 1, row + 2) for c in range(col - 1, col + 2)}
    assert _cells(t.matched[0], 16) == expected


def test_instance_positive_on_two_levels_and_tiny_and_huge():
    masks = np.zeros((3, 1024, 1024), bool)
    masks[0, 100:164, 100:164] = True  # sqrt area 64: in (1, 96) and (48, 192)
    masks[1, 300:302, 400:402] = True  # sqrt area 2: only level 0, exactly its centre cell
    masks[2, :, :] = True  # sqrt area 1024: only (384, 2048)
    t = assign_targets(
        [_instances(masks, [0, 1, 2])], (1024, 1024), DEFAULT_GRIDS, DEFAULT_RANGES, 0.2, 80, 4
    )
    offsets = np.cumsum([0] + [g * g for g in DEFAULT_GRIDS])
    levels_of = {k: [] for k in range(3)}
    for level, grid in enumerate(DEFAULT_GRIDS):
        block = t.matched[0, offsets[level] : offsets[level + 1]]
        for k in block[block >= 0].unique().tolist():
            levels_of[k].append(level)
    assert levels_of == {0: [0, 1], 1: [0], 2: [4]}
    tiny = _cells(t.matched[0], 40)
    tiny = {rc for rc in tiny if t.matched[0, rc[0] * 40 + rc[1]] == 1}
    # Centre of mass (300.5, 400.5): cell floor(300.5 / 25.6), floor(400.5 / 25.6).
    assert tiny == {(11, 15)}
    huge = _cells(t.matched[0], 12, offsets[4])
    assert huge == {(r, c) for r in (4, 5, 6) for c in (4, 5, 6)}


def test_later_instance_wins_a_shared_cell_and_images_do_not_mix():
    mask = np.zeros((2, 128, 128), bool)
    mask[:, 40:80, 40:80] = True
    first = _instances(mask, [1, 2])
    second = _instances(mask[:1], [3])
    t = assign_targets([first, second], (128, 128), [8], [(1, 1000)], 0.2, 4, 4)
    assert set(t.labels[0][t.matched[0] >= 0].tolist()) == {2}
    assert set(t.matched[0][t.matched[0] >= 0].tolist()) == {1}
    assert set(t.matched[1][t.matched[1] >= 0].tolist()) == {2}  # batch-global index
    assert set(t.labels[1][t.matched[1] >= 0].tolist()) == {3}


def test_shared_cells_pair_with_every_claiming_instance():
    """Two instances of image 0 whose centre regions overlap: a shared cell's label is the
    later instance's, and the cell is paired with both; image 1 reuses the first mask alone.
    On an 8 x 8 grid over 128 x 128 (16 px cells), sigma 0.2 (half-extents 8 px): A (rows and
    columns 24..103, centre 63.5) claims cells 3..4 x 3..4; B (rows 40..119, columns 32..111,
    centre (79.5, 71.5)) claims 4..5 x 3..4. They share (4, 3) and (4, 4)."""
    mask = np.zeros((2, 128, 128), bool)
    mask[0, 24:104, 24:104] = True
    mask[1, 40:120, 32:112] = True
    t = assign_targets(
        [_instances(mask, [1, 2]), _instances(mask[:1], [3])], (128, 128), [8], [(1, 1000)],
        0.2, 4, 4,
    )  # fmt: skip
    a = {(r, c) for r in (3, 4) for c in (3, 4)}
    b = {(r, c) for r in (4, 5) for c in (3, 4)}
    assert a & b == {(4, 3), (4, 4)}
    assert _cells(t.matched[0], 8) == a | b
    labels = t.labels[0].view(8, 8)
    assert all(labels[rc] == 2 for rc in b) and all(labels[rc] == 1 for rc in a - b)
    cell = lambda r, c: r * 8 + c  # noqa: E731
    assert _pairs(t, 0) == [(0, cell(*rc)) for rc in sorted(a)] + [
        (1, cell(*rc)) for rc in sorted(b)
    ]
    assert _pairs(t, 1) == [(2, cell(*rc)) for rc in sorted(a)]  # batch-global index
    # Rows of 2 instances x 9 cells (the centre cell's neighbourhood; -1 where not claimed);
    # image 1's is padded.
    assert t.pair_cells.shape == t.pair_instances.shape == (2, 2 * 9)
    assert (t.pair_instances[1, 9:] == -1).all() and (t.pair_cells[1, 9:] == -1).all()
    # The loss's view of them.
    assert t.mask_pairs() == (t.pair_instances, t.pair_cells)
    assert t.mask_pairs("last_owner") == (t.matched, None)
    with pytest.raises(ValueError, match="'last_owner'"):
        t.mask_pairs("first_owner")


def test_empty_images_and_empty_masks():
    empty = _instances(np.zeros((0, 64, 64), bool), [])
    blank = _instances(np.zeros((1, 64, 64), bool), [0], [[0, 0, 10, 10]])
    t = assign_targets([empty, blank], (64, 64), [4, 2], [(1, 100), (50, 200)], 0.2, 2, 4)
    assert t.labels.shape == (2, 20) and (t.labels == 2).all()
    assert (t.matched == -1).all()
    assert t.masks.shape == (1, 16, 16)
    assert t.pair_cells.shape == (2, 18) and (t.pair_cells == -1).all()
    assert (t.pair_instances == -1).all()
    none = assign_targets([empty], (64, 64), [4, 2], [(1, 100), (50, 200)], 0.2, 2, 4)
    assert none.pair_cells.shape == none.pair_instances.shape == (1, 0)


def test_polygons_and_bitmasks_give_the_same_targets():
    polygons = [[np.array([10, 10, 90, 12, 80, 70, 15, 60], dtype=np.float64)]]
    inst_poly = Instances((100, 120))
    inst_poly.gt_masks = PolygonMasks(polygons)
    inst_poly.gt_classes = torch.tensor([4])
    inst_poly.gt_boxes = inst_poly.gt_masks.get_bounding_boxes()
    inst_bit = Instances((100, 120))
    inst_bit.gt_masks = BitMasks.from_polygon_masks(polygons, 100, 120)
    inst_bit.gt_classes = torch.tensor([4])
    inst_bit.gt_boxes = inst_poly.gt_boxes
    args = ((128, 128), DEFAULT_GRIDS, DEFAULT_RANGES, 0.2, 80, 4)
    a = assign_targets([inst_poly], *args)
    b = assign_targets([inst_bit], *args)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.matched, b.matched)
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.pair_cells, b.pair_cells)
    assert torch.equal(a.pair_instances, b.pair_instances)
    assert (a.matched >= 0).any()


def test_downsampled_masks_equal_opencv_bilinear_resize():
    """Tolerance: none. OpenCV's INTER_LINEAR on uint8 0/1 masks rounds a mean of 0.5 up, which
    our 2 x 2 vote reproduces exactly."""
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 96, 160), np.uint8)
    for m in masks:
        for _ in range(4):
            cx, cy = rng.integers(0, 160), rng.integers(0, 96)
            axes = (int(rng.integers(2, 40)), int(rng.integers(2, 30)))
            cv2.ellipse(m, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    for stride in (2, 4, 8):
        ours = downsample_masks(torch.from_numpy(masks).bool(), stride).numpy()
        size = (160 // stride, 96 // stride)
        ref = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in masks])
        np.testing.assert_array_equal(ours, ref)
        # And the float bilinear resize of the same masks, binarised at 0.5, agrees too.
        ref_float = np.stack(
            [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) for m in masks]
        )
        np.testing.assert_array_equal(ours, ref_float >= 0.5)


def test_downsample_rejects_sizes_it_cannot_handle():
    with pytest.raises(ValueError, match="stride 4"):
        downsample_masks(torch.zeros(1, 30, 32, dtype=torch.bool), 4)


def _loop_reference(masks, boxes, classes, padded, grids, ranges, sigma, num_classes):
    """A plain per-instance, per-level loop over Python numbers, as the references do it: the
    cells' labels and last claiming instance, and every (instance, cell) pair claimed."""
    hp, wp = padded
    labels, matched, pairs, offset = [], [], [], 0
    for grid, (low, high) in zip(grids, ranges):
        lab = np.full((grid, grid), num_classes)
        own = np.full((grid, grid), -1)
        for k in range(len(masks)):
            x1, y1, x2, y2 = boxes[k]
            scale = math.sqrt((x2 - x1) * (y2 - y1))
            if not (low <= scale <= high) or masks[k].sum() == 0:
                continue
            ys, xs = np.nonzero(masks[k])
            cy, cx = ys.mean(), xs.mean()
            half_h, half_w = 0.5 * sigma * (y2 - y1), 0.5 * sigma * (x2 - x1)
            ch, cw = hp / grid, wp / grid
            row, col = math.floor(cy / ch), math.floor(cx / cw)
            top = max(max(0, math.floor((cy - half_h) / ch)), row - 1)
            bottom = min(min(grid - 1, math.floor((cy + half_h) / ch)), row + 1)
            left = max(max(0, math.floor((cx - half_w) / cw)), col - 1)
            right = min(min(grid - 1, math.floor((cx + half_w) / cw)), col + 1)
            lab[top : bottom + 1, left : right + 1] = classes[k]
            own[top : bottom + 1, left : right + 1] = k
            for r in range(top, bottom + 1):
                for c in range(left, right + 1):
                    pairs.append((k, offset + r * grid + c))
        labels.append(lab.ravel())
        matched.append(own.ravel())
        offset += grid * grid
    return np.concatenate(labels), np.concatenate(matched), pairs


def _pairs(t, image):
    """The (instance, cell) pairs of one image's targets, in their order."""
    valid = t.pair_instances[image] >= 0
    assert torch.equal(valid, t.pair_cells[image] >= 0)
    return list(zip(t.pair_instances[image][valid].tolist(), t.pair_cells[image][valid].tolist()))


@pytest.mark.parametrize("stem", ["0", "7", "15"])
# Even grids as published, and odd ones whose cells are not a whole number of pixels (as
# tools/dataset_stats.py may suggest).
@pytest.mark.parametrize("grids", [[40, 36, 24, 16, 12], [43, 37, 25, 17, 13]])
def test_matches_a_per_instance_loop_on_real_fruit_masks(stem, grids):
    ann = json.loads((FRUIT / f"{stem}.json").read_text())
    h, w = ann["imageHeight"], ann["imageWidth"]
    classes = {"date": 0, "fig": 1, "hazelnut": 2}
    polygons, labels = [], []
    for shape in ann["shapes"]:
        polygons.append([np.asarray(shape["points"], dtype=np.float64).ravel()])
        labels.append(classes[shape["label"]])
    inst = Instances((h, w))
    inst.gt_masks = PolygonMasks(polygons)
    inst.gt_classes = torch.tensor(labels)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    padded = (608, 800)
    # Ranges scaled to the fruit (objects of 40..120 px) so that several levels and
    # neighbouring instances compete for cells.
    ranges = [(1, 48), (24, 96), (48, 192), (96, 384), (192, 2048)]
    t = assign_targets([inst], padded, grids, ranges, 0.2, 3, 4)
    masks = BitMasks.from_polygon_masks(polygons, *padded).tensor.numpy()
    ref_labels, ref_matched, ref_pairs = _loop_reference(
        masks, inst.gt_boxes.tensor.double().numpy(), labels, padded, grids, ranges, 0.2, 3
    )
    np.testing.assert_array_equal(t.labels[0].numpy(), ref_labels)
    np.testing.assert_array_equal(t.matched[0].numpy(), ref_matched)
    assert (ref_matched >= 0).sum() > 2 * len(labels)
    # Every (instance, cell) pair once, instance by instance (then level, then row-major).
    assert _pairs(t, 0) == sorted(ref_pairs)


# COCO photos whose instances share cells at the short side 800 of the references' training:
# val 397133 (19 instances: 83 pairs on 80 cells), train 488571 (21 instances: 163 on 136).
COCO = SHARED / "data" / "coco_mini"


@pytest.mark.parametrize("split, image_id", [("val2017", 397133), ("train2017", 488571)])
def test_matches_a_per_instance_loop_on_coco_photos_with_shared_cells(split, image_id):
    data = json.loads((COCO / "annotations" / f"instances_{split}.json").read_text())
    image = next(x for x in data["images"] if x["id"] == image_id)
    anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    size = (image["height"], image["width"])
    scale = min(800 / min(size), 1333 / max(size))
    h, w = (round(x * scale) for x in size)
    polygons = [[np.asarray(p, np.float64) * scale for p in a["segmentation"]] for a in anns]
    inst = Instances((h, w))
    inst.gt_masks = PolygonMasks(polygons)
    inst.gt_classes = torch.tensor([a["category_id"] % 80 for a in anns])
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    padded = (-(-h // 32) * 32, -(-w // 32) * 32)
    t = assign_targets([inst], padded, DEFAULT_GRIDS, DEFAULT_RANGES, 0.2, 80, 4)
    masks = BitMasks.from_polygon_masks(polygons, *padded).tensor.numpy()
    ref_labels, ref_matched, ref_pairs = _loop_reference(
        masks, inst.gt_boxes.tensor.double().numpy(), inst.gt_classes.tolist(), padded,
        DEFAULT_GRIDS, DEFAULT_RANGES, 0.2, 80,
    )  # fmt: skip
    np.testing.assert_array_equal(t.labels[0].numpy(), ref_labels)
    np.testing.assert_array_equal(t.matched[0].numpy(), ref_matched)
    assert _pairs(t, 0) == sorted(ref_pairs)
    expected = {397133: (83, 80), 488571: (163, 136)}[image_id]
    assert (len(ref_pairs), (ref_matched >= 0).sum()) == expected


@pytest.mark.parametrize("shape", [(3, 40, 64), (2, 600, 2100), (1, 7, 13), (0, 8, 8)])
def test_row_and_column_counts_are_exact(shape):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(shape, generator=g) > 0.3
    masks[:, :, -1] = True  # full last column: the largest count a lane must hold
    rows, cols = _row_and_column_counts(masks)
    assert torch.equal(rows, masks.sum(dim=2).int())
    assert torch.equal(cols, masks.sum(dim=1).int())


def _fruit_batch(stems=("0", "7"), polygons=True):
    """Instances of fruit photos (labelme polygons), one image per stem, plus an empty image."""
    batch = []
    for stem in stems:
        ann = json.loads((FRUIT / f"{stem}.json").read_text())
        h, w = ann["imageHeight"], ann["imageWidth"]
        shapes = [[np.asarray(s["points"], dtype=np.float64).ravel()] for s in ann["shapes"]]
        inst = Instances((h, w))
        poly = PolygonMasks(shapes)
        inst.gt_masks = poly if polygons else BitMasks.from_polygon_masks(poly, h, w)
        inst.gt_classes = torch.arange(len(shapes)) % 3
        inst.gt_boxes = poly.get_bounding_boxes()
        batch.append(inst)
    batch.append(_instances(np.zeros((0, 600, 800), bool), []))
    return batch


FRUIT_ARGS = ((608, 800), DEFAULT_GRIDS, [(1, 48), (24, 96), (48, 192), (96, 384), (192, 2048)])


def test_host_sync_counter_sees_what_a_gpu_would_wait_for():
    """The counter used below finds each kind of synchronisation the former code had."""
    x = torch.arange(6)
    with HostSyncCounter() as counter:
        counts = torch.tensor([2, 1])  # host data to the device
        torch.repeat_interleave(torch.arange(2), counts)  # output size read from the device
        int(x.max())
        x[x > 2]
        x.tolist()
        torch.repeat_interleave(torch.arange(2), counts, output_size=3)  # none
    assert counter.syncs == ["lift_fresh", "repeat_interleave", "_local_scalar_dense", "index"] + [
        "tolist"
    ]


def test_target_assignment_never_waits_for_the_device():
    """Bitmasks on the device, as DatasetMapper's "bitmask" format gives them. (Polygons are
    rasterised on the host, whose tensors this CPU count cannot tell from device ones; the CUDA
    test below covers them.)"""
    batch = _fruit_batch(polygons=False)
    with HostSyncCounter() as counter:
        t = assign_targets(batch, *FRUIT_ARGS, 0.2, 3, 4)
    assert counter.syncs == []
    assert (t.matched[:2] >= 0).sum(dim=1).min() > 10 and (t.matched[2] == -1).all()
    assert t.masks.dtype == torch.bool and t.masks.shape == (sum(map(len, batch)), 152, 200)


@needs_cuda
@pytest.mark.parametrize("polygons", [False, True])
def test_cuda_targets_equal_the_cpu_ones_without_synchronising(polygons):
    """Exact: integer counts and float64 centres, no matrix product (TF32 does not apply)."""
    batch = _fruit_batch(polygons=polygons)
    cpu = assign_targets(batch, *FRUIT_ARGS, 0.2, 3, 4)
    on_gpu = [x.to("cuda") for x in batch]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = assign_targets(on_gpu, *FRUIT_ARGS, 0.2, 3, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("labels", "matched", "masks", "pair_cells", "pair_instances"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
