"""Instance copy-paste (INPUT.COPY_PASTE): pasted pixels and masks, covered instances cut or
dropped, images without instances, and a source image fixed by the loader's seed."""
import numpy as np
import pytest
import torch
from conftest import copy_fruit, small_solov2_cfg
from test_train_loader import _batches

from detectron2.data import DatasetCatalog, MetadataCatalog

from solov2_d2.data import (
    SOLOv2DatasetMapper,
    build_resumable_train_loader,
    register_labelme_instances,
)
from solov2_d2.data.copy_paste import COPY_PASTE_SOURCE, paste_instances, random_subset
from solov2_d2.data.datasets import FRUIT_CLASSES


def _boxes(*boxes, size=(10, 12)):
    masks = torch.zeros((len(boxes), *size), dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    return masks


def test_paste_cuts_covered_masks_drops_hidden_ones_and_puts_pasted_last():
    image = np.zeros((10, 12, 3), np.uint8)
    # 0: half covered; 1: 24 of 25 pixels covered; 2: fully covered; 3: untouched.
    masks = _boxes((0, 0, 4, 4), (5, 0, 10, 5), (6, 2, 8, 4), (10, 8, 12, 10))
    classes = torch.tensor([0, 1, 2, 1])
    source = np.full((6, 11, 3), 200, np.uint8)  # smaller than the target
    source_masks = _boxes((2, 0, 10, 6), (6, 4, 9, 6), size=(6, 11))
    source_masks[0, 0, 9] = False  # leaves pixel (0, 9) of instance 1 visible
    out, out_masks, out_classes = paste_instances(
        image, masks, classes, source, source_masks, torch.tensor([2, 0]), 0.1
    )
    covered = source_masks.any(dim=0)
    assert (out[:6, :11][covered.numpy()] == 200).all()
    assert (out[:6, :11][~covered.numpy()] == 0).all() and (out[6:] == 0).all()
    assert out_classes.tolist() == [0, 1, 2, 0]  # instances 1 (1/25 < 0.1) and 2 dropped
    expected = masks[0].clone()
    expected[:6, :11] &= ~covered
    assert torch.equal(out_masks[0], expected) and expected.sum() == 8
    assert torch.equal(out_masks[1], masks[3])
    assert torch.equal(out_masks[2:, :6, :11], source_masks) and not out_masks[2:, 6:].any()
    # A threshold of 0 keeps any instance with a pixel left.
    _, _, kept = paste_instances(image, masks, classes, source, source_masks, classes[:2], 0.0)
    assert kept.tolist() == [0, 1, 1, 0, 1]
    assert image.max() == 0, "the target array is not written to"


def test_paste_cuts_a_larger_source_and_handles_images_without_instances():
    image = np.zeros((10, 12, 3), np.uint8)
    none = torch.zeros((0, 10, 12), dtype=torch.bool)
    source = np.full((20, 20, 3), 7, np.uint8)
    source_masks = _boxes((10, 5, 15, 15), (14, 14, 18, 18), size=(20, 20))  # 2nd: outside
    out, masks, classes = paste_instances(
        image, none, torch.zeros(0, dtype=torch.int64), source, source_masks,
        torch.tensor([1, 2]), 0.05,
    )  # fmt: skip
    assert classes.tolist() == [1] and masks.shape == (1, 10, 12)
    assert masks[0].sum() == 2 * 5 and out[5:10, 10:12].min() == 7 and out.sum() == 7 * 30
    # No instance to paste: the target as it is.
    same = paste_instances(
        image, none, torch.zeros(0, dtype=torch.int64), source, source_masks[:0],
        torch.zeros(0, dtype=torch.int64), 0.05,
    )  # fmt: skip
    assert same[0] is image and same[1].shape == (0, 10, 12)


def test_random_subset_is_never_empty_and_reaches_every_size():
    np.random.seed(0)
    subsets = [random_subset(4) for _ in range(200)]
    assert all(s.any() for s in subsets)
    assert {int(s.sum()) for s in subsets} == {1, 2, 3, 4}
    assert not random_subset(0).numel()


def _cfg(*opts):
    cfg = small_solov2_cfg()
    cfg.DATASETS.TRAIN = ("fruit_train",)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SEED = 5
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list(["INPUT.COPY_PASTE.ENABLED", "True", "INPUT.COPY_PASTE.PROB", "1.0"])
    cfg.merge_from_list(list(opts))
    return cfg


def test_mapper_pastes_instances_with_lsj_and_prob_zero_pastes_nothing():
    mapper = SOLOv2DatasetMapper(_cfg("INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "128"), True)
    records = DatasetCatalog.get("fruit_train")
    counts = []
    for seed in range(4):
        np.random.seed(seed)
        out = mapper({**records[0], COPY_PASTE_SOURCE: records[5]})
        masks = out["instances"].gt_masks.tensor
        assert out["image"].shape == (3, 128, 128) and masks.shape[1:] == (128, 128)
        assert masks.flatten(1).any(dim=1).all()
        counts.append(len(masks))
    assert len(set(counts)) > 1
    alone = SOLOv2DatasetMapper(_cfg("INPUT.COPY_PASTE.PROB", "0.0"), True)
    for seed in range(4):
        np.random.seed(seed)
        plain = alone({**records[0], COPY_PASTE_SOURCE: records[5]})
        assert len(plain["instances"]) == len(records[0]["annotations"])


def test_pasted_masks_hide_what_they_cover():
    """Without LSJ (both photos are 800x600): the pasted masks' pixels belong to no earlier
    instance, and the image shows the source there."""
    cfg = _cfg("INPUT.RANDOM_FLIP", "none")
    mapper = SOLOv2DatasetMapper(cfg, True)
    records = DatasetCatalog.get("fruit_train")
    # The resize has one size and no flip: the source maps alone as it maps for the paste.
    alone = _cfg("INPUT.RANDOM_FLIP", "none", "INPUT.COPY_PASTE.PROB", "0.0")
    source_only = SOLOv2DatasetMapper(alone, True)
    np.random.seed(1)
    out = mapper({**records[0], COPY_PASTE_SOURCE: records[5]})
    np.random.seed(1)
    source = source_only({**records[5], COPY_PASTE_SOURCE: records[0]})
    masks, classes = out["instances"].gt_masks.tensor, out["instances"].gt_classes
    # The source's instances that were pasted are a subset of its instances, in order, last.
    source_masks = source["instances"].gt_masks.tensor
    matches = [i for i, m in enumerate(source_masks) if any(torch.equal(m, p) for p in masks)]
    assert matches, "some source instances are pasted unchanged"
    k = len(matches)
    assert torch.equal(masks[-k:], source_masks[matches])
    assert classes[-k:].tolist() == source["instances"].gt_classes[matches].tolist()
    covered = masks[-k:].any(dim=0)
    assert not (masks[:-k] & covered).any()
    assert torch.equal(out["image"][:, covered], source["image"][:, covered])


@pytest.fixture
def fruit_with_empty(tmp_path):
    """Photos 0 and 1 of fruit, photo 1 without instances."""
    folder = copy_fruit(tmp_path / "fruit", ["0", "1"], without_shapes=["1"])
    register_labelme_instances("fruit_cp_empty", str(folder), FRUIT_CLASSES)
    yield DatasetCatalog.get("fruit_cp_empty")
    DatasetCatalog.remove("fruit_cp_empty")
    MetadataCatalog.remove("fruit_cp_empty")


def test_images_without_instances_work_as_source_and_target(fruit_with_empty):
    full, empty = sorted(fruit_with_empty, key=lambda r: -len(r["annotations"]))
    assert not empty["annotations"]
    mapper = SOLOv2DatasetMapper(_cfg(), True)
    np.random.seed(0)
    onto_empty = mapper({**empty, COPY_PASTE_SOURCE: full})["instances"]
    assert 1 <= len(onto_empty) <= len(full["annotations"])
    np.random.seed(0)
    from_empty = mapper({**full, COPY_PASTE_SOURCE: empty})["instances"]
    assert len(from_empty) == len(full["annotations"])
    np.random.seed(0)
    both = mapper({**empty, COPY_PASTE_SOURCE: dict(empty)})
    assert len(both["instances"]) == 0 and both["instances"].gt_masks.tensor.shape[0] == 0


def test_a_mapper_without_source_is_refused_naming_the_key():
    mapper = SOLOv2DatasetMapper(_cfg(), True)
    with pytest.raises(RuntimeError, match="INPUT.COPY_PASTE.ENABLED needs a source image"):
        mapper(DatasetCatalog.get("fruit_train")[0])
    # Evaluation does not paste.
    assert not SOLOv2DatasetMapper(_cfg(), False).copy_paste


def test_the_loader_draws_other_images_as_sources_from_the_sample_seed():
    loader = build_resumable_train_loader(_cfg())
    n = len(loader.dataset)
    sources = [loader.paste_source(seed, i) for seed in range(300) for i in (0, 3)]
    assert set(sources[0::2]) == set(range(1, n)) and set(sources[1::2]) == set(range(n)) - {3}
    assert sources == [loader.paste_source(seed, i) for seed in range(300) for i in (0, 3)]


def test_the_loader_gives_a_copy_paste_mapper_another_image():
    seen = []

    def mapper(d):
        seen.append((d["file_name"], d[COPY_PASTE_SOURCE]["file_name"]))
        return d

    mapper.copy_paste = True
    loader = build_resumable_train_loader(
        DatasetCatalog.get("fruit_train"), mapper=mapper, seed=1, total_batch_size=2
    )
    next(iter(loader))
    assert len(seen) == 2 and all(a != b for a, b in seen)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_with_the_recipe_on_depend_only_on_seed_and_batch(num_workers):
    """LSJ, colour jitter and copy-paste on: batch k is the same from a fresh start, from a
    start at k, and with worker processes."""
    opts = ["INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "96"]
    opts += ["INPUT.COLOR_JITTER.ENABLED", "True"]
    full = _batches(build_resumable_train_loader(_cfg(*opts)), 0, 4)
    cfg = _cfg(*opts, "DATALOADER.NUM_WORKERS", str(num_workers))
    assert _batches(build_resumable_train_loader(cfg), 2, 2) == full[2:]
    assert len({len(s[3]) for b in full for s in b}) > 1
    other_seed = _cfg(*opts, "SEED", "6")
    assert _batches(build_resumable_train_loader(other_seed), 0, 4) != full
