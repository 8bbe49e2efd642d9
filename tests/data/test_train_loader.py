"""The resumable training loader: its batches depend on (seed, batch number) only, whatever the
start and the number of worker processes."""
import hashlib
import itertools

import pytest
from conftest import small_solov2_cfg

from solov2_d2.data import build_resumable_train_loader


def _cfg(num_workers=0):
    cfg = small_solov2_cfg()
    cfg.DATASETS.TRAIN = ("fruit_train",)
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.SOLVER.IMS_PER_BATCH = 2
    # Random size and flip, so that a restarted random state would show.
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (48, 64, 80), 120
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.SEED = 3
    return cfg


def _signature(batch):
    """What the model sees of a batch: file, image size and bytes, boxes, classes."""
    return [
        (
            d["file_name"],
            tuple(d["image"].shape),
            hashlib.sha1(d["image"].numpy().tobytes()).hexdigest(),
            d["instances"].gt_boxes.tensor.tolist(),
            d["instances"].gt_classes.tolist(),
        )
        for d in batch
    ]


def _batches(loader, start, count):
    loader.start_batch = start
    return [_signature(b) for b in itertools.islice(loader, count)]


def test_index_batches_from_any_start_continue_the_stream():
    """Aspect-ratio grouping holds images back in buckets; starting at batch k must still give
    batch k of the uninterrupted stream."""
    sizes = [(100, 50), (50, 100), (60, 60), (80, 40), (40, 80), (90, 30), (30, 90)]
    dataset = [{"width": w, "height": h} for w, h in sizes]
    loader = build_resumable_train_loader(
        dataset, mapper=None, seed=7, total_batch_size=3, aspect_ratio_grouping=True
    )
    full = list(itertools.islice(loader.index_batches(0), 30))
    for batch in full:  # one orientation per batch
        assert len({sizes[i][0] > sizes[i][1] for _, i in batch}) == 1
    for start in (1, 7, 29):
        assert list(itertools.islice(loader.index_batches(start), 30 - start)) == full[start:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_from_a_start_are_those_of_the_uninterrupted_stream(num_workers):
    full = _batches(build_resumable_train_loader(_cfg(0)), 0, 5)
    # The augmentation is random (a restarted random state would repeat its first draws).
    assert len({shape[1] for batch in full for _, shape, _, _, _ in batch}) > 1
    resumed = _batches(build_resumable_train_loader(_cfg(num_workers)), 3, 2)
    assert resumed == full[3:]


def test_the_seed_is_in_the_state_and_makes_the_stream():
    cfg = _cfg()
    cfg.SEED = -1  # a random seed, as detectron2 gives
    first, second = build_resumable_train_loader(cfg), build_resumable_train_loader(cfg)
    assert first.state_dict() != second.state_dict()
    second.load_state_dict(first.state_dict())
    assert _batches(second, 1, 2) == _batches(first, 1, 2)


@pytest.mark.parametrize(
    "sampler", ["TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler"]
)
def test_detectron2_samplers_give_a_stream_fixed_by_the_seed(sampler):
    cfg = _cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = sampler
    cfg.DATALOADER.RANDOM_SUBSET_RATIO = 0.5
    streams = [
        list(itertools.islice(build_resumable_train_loader(cfg).index_batches(), 20))
        for _ in range(2)
    ]
    assert streams[0] == streams[1]
    cfg.SEED = 4
    assert list(itertools.islice(build_resumable_train_loader(cfg).index_batches(), 20)) != (
        streams[0]
    )
    indices = {i for batch in streams[0] for _, i in batch}
    assert len(indices) == (7 if sampler == "RandomSubsetTrainingSampler" else 14)
