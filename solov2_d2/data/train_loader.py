"""
A training data loader whose stream of batches is a function of (seed, batch number) only, so
that a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have.

Detectron2's ``build_detection_train_loader`` restarts its sampler and its augmentation random
states when a run resumes, so a resumed run trains on other batches. Here:

* the sampler (detectron2's, by ``DATALOADER.SAMPLER_TRAIN``) is built with the seed
  (``SEED``, or a random one saved in the checkpoints), so this process's index stream is
  fixed;
* batches are formed from indices, by aspect ratio if ``DATALOADER.ASPECT_RATIO_GROUPING``
  (like detectron2's ``AspectRatioGroupedDataset``, from the dataset dicts' width and height),
  so batch ``b`` is known without loading an image, and starting at batch ``b`` skips the
  first ``b`` batches of indices;
* the ``k``-th sample of the stream is mapped with Python's, NumPy's and torch's global random
  states seeded from (seed, rank, k), whatever process maps it; a mapper that pastes instances
  of a second image (``mapper.copy_paste``, :mod:`solov2_d2.data.copy_paste`) gets that image's
  dataset dict too, chosen by a generator seeded from the same per-sample seed;
* worker ``w`` of ``DATALOADER.NUM_WORKERS`` maps batches ``w, w + N, ...``, which the
  DataLoader returns in order.
"""
import contextlib
import functools
import logging
import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.config import configurable
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm

from .copy_paste import COPY_PASTE_SOURCE
from .mapper import SOLOv2DatasetMapper

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


def _random_subset_sampler(size: int, ratio: float, *, seed: int):
    return RandomSubsetTrainingSampler(size, ratio, seed_shuffle=seed, seed_subset=seed)


def _sampler_builder(cfg, dataset_dicts) -> Callable[..., torchdata.Sampler]:
    """``build(seed=...)`` for detectron2's training sampler named by
    ``DATALOADER.SAMPLER_TRAIN``; it holds sizes and repeat factors, not the dataset dicts
    (which each DataLoader worker would otherwise copy)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return functools.partial(TrainingSampler, len(dataset_dicts))
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return functools.partial(RepeatFactorTrainingSampler, factors)
    if name == "RandomSubsetTrainingSampler":
        return functools.partial(
            _random_subset_sampler, len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO
        )
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN = {name!r}; expected 'TrainingSampler', "
        "'RepeatFactorTrainingSampler' or 'RandomSubsetTrainingSampler'."
    )


def _loader_from_config(cfg, mapper=None):
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    # A negative SEED asks for a random one; the trainer saves it in its checkpoints.
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return {
        "dataset": dataset,
        "build_sampler": _sampler_builder(cfg, dataset),
        "mapper": SOLOv2DatasetMapper(cfg, True) if mapper is None else mapper,
        "seed": seed,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
    }


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Seed Python's, NumPy's and torch's (CPU) global random states, which detectron2's
    augmentations draw from, and restore them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class _BatchStream(torchdata.IterableDataset):
    """The mapped batches from batch `start` on; in a DataLoader worker, only its share."""

    def __init__(self, loader: "ResumableTrainLoader", start: int):
        self.loader = loader
        self.start = start

    def __iter__(self):
        worker = torchdata.get_worker_info()
        step, offset = (1, 0) if worker is None else (worker.num_workers, worker.id)
        batches = self.loader.index_batches(self.start)
        for number, batch in enumerate(batches):
            if number % step == offset:
                yield [self.loader.map_sample(position, index) for position, index in batch]


class ResumableTrainLoader:
    """
    An infinite iterable of training batches (lists of mapped dicts, ``total_batch_size /
    world size`` of them) that starts at batch :attr:`start_batch`, set before iterating. Its
    batches depend only on the dataset, the mapper, the seed, this process's rank and the batch
    number: not on the number of workers, nor on where a run was interrupted.
    """

    def __init__(
        self,
        dataset: List[dict],
        mapper,
        build_sampler: Callable[..., torchdata.Sampler],
        seed: int,
        batch_size: int,
        aspect_ratio_grouping: bool,
        num_workers: int,
    ):
        """
        Args:
            dataset: dataset dicts; with aspect ratio grouping they need "width" and "height".
            mapper: maps a dataset dict to the model's input dict (e.g. DatasetMapper).
            build_sampler: ``build_sampler(seed=seed)`` gives a sampler that yields this
                process's indices into `dataset`, infinitely and the same way for the same
                seed (e.g. detectron2's training samplers).
            seed: the seed of the sampler, also the base of each sample's random state.
            batch_size: images per batch in this process.
            aspect_ratio_grouping: batch images with width > height apart from the others.
            num_workers: DataLoader worker processes mapping the batches (0: this process).
        """
        self.dataset = DatasetFromList(dataset, copy=False)
        self.mapper = mapper
        self.build_sampler = build_sampler
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.start_batch = 0
        if aspect_ratio_grouping:
            self.groups = [int(d["width"] > d["height"]) for d in dataset]
        else:
            self.groups = [0] * len(dataset)
        self.rank = comm.get_rank()

    def index_batches(self, start: int = 0) -> Iterator[List[Tuple[int, int]]]:
        """The batches from batch `start` on, as lists of (position of the sample in this
        process's stream, index into the dataset). Cheap: nothing is loaded."""
        buckets = [[], []]
        number = 0
        for position, index in enumerate(self.build_sampler(seed=self.seed)):
            bucket = buckets[self.groups[index]]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                if number >= start:
                    yield bucket[:]
                number += 1
                del bucket[:]

    def paste_source(self, sample_seed: int, index: int) -> int:
        """The index of the image whose instances are pasted onto image `index` (copy-paste),
        drawn uniformly among the others (itself in a dataset of one image) by a generator
        seeded from the sample's seed."""
        if len(self.dataset) == 1:
            return index
        other = int(np.random.default_rng([sample_seed, 1]).integers(len(self.dataset) - 1))
        return other + int(other >= index)

    def map_sample(self, position: int, index: int) -> dict:
        """The mapped dataset dict `index`, at `position` in the stream, with random states
        that depend on the seed, the rank and the position only."""
        sample_seed = np.random.SeedSequence([self.seed, self.rank, position]).generate_state(1)
        sample_seed = int(sample_seed[0])
        dataset_dict = self.dataset[index]
        if getattr(self.mapper, "copy_paste", False):
            source = self.dataset[self.paste_source(sample_seed, index)]
            dataset_dict = {**dataset_dict, COPY_PASTE_SOURCE: source}
        with _seeded_global_rng(sample_seed):
            mapped = self.mapper(dataset_dict)
        if mapped is None:
            raise ValueError(
                f"The mapper returned None for {self.dataset[index].get('file_name')}: this "
                "loader keeps every sample (a skipped one would shift the rest of the stream)."
            )
        return mapped

    def __iter__(self):
        # A generator: the DataLoader (and its workers) starts at the first batch asked for,
        # so `start_batch` may still be set after iter() (detectron2's SimpleTrainer calls it
        # when it is built, before a checkpoint is loaded).
        loader = torchdata.DataLoader(
            _BatchStream(self, self.start_batch),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
        )
        yield from loader

    def state_dict(self) -> dict:
        """What a checkpoint needs besides the iteration: the seed (it may have been random)."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            logger.info(f"Training data seed {state['seed']} from the checkpoint, not {self.seed}.")
        self.seed = state["seed"]


@configurable(from_config=_loader_from_config)
def build_resumable_train_loader(
    dataset: List[dict],
    *,
    mapper,
    build_sampler: Optional[Callable[..., torchdata.Sampler]] = None,
    seed: int,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
) -> ResumableTrainLoader:
    """
    Like detectron2's ``build_detection_train_loader`` (same config keys), but the batches are
    a function of (seed, batch number): see :class:`ResumableTrainLoader`.

    Args:
        dataset: dataset dicts (e.g. from ``get_detection_dataset_dicts``).
        mapper: e.g. :class:`SOLOv2DatasetMapper` (the default from a config).
        build_sampler: ``build_sampler(seed=seed)`` gives a sampler of this process's indices;
            default: detectron2's ``TrainingSampler``.
        seed: seed of the sampler and of each sample's augmentation.
        total_batch_size: images per iteration over all processes.
        aspect_ratio_grouping, num_workers: as in ``build_detection_train_loader``.
    """
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total_batch_size} must be a positive multiple of the "
            f"number of processes ({world_size})."
        )
    if build_sampler is None:
        build_sampler = functools.partial(TrainingSampler, len(dataset))
    return ResumableTrainLoader(
        dataset,
        mapper,
        build_sampler,
        seed,
        total_batch_size // world_size,
        aspect_ratio_grouping,
        num_workers,
    )
