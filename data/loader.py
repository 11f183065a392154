"""The one DataLoader factory: seeded, bad-sample aware, worker options set only where they apply.

Distributed runs: build the loader here and pass it to ``accelerator.prepare`` (accelerate,
with DeepSpeed), which shards it across processes itself and seeds its sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from transformers.trainer_pt_utils import get_length_grouped_indices

from data.datasets import CollateSkip


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
    seed: int = 0,
    prefetch_factor: int = 2,
    sampler: Sampler[int] | Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader whose batches carry their skipped samples (see data.datasets).

    ``collate_fn`` (default: torch's default_collate) is wrapped in CollateSkip. Pinned memory
    only when CUDA is present; persistent workers and prefetching only when there are workers.
    The order is reproducible from ``seed`` (workers are seeded from it by torch). ``sampler``
    gives the order itself (a staged sampler, a shard's positions) instead of ``shuffle``.
    """
    if sampler is not None and shuffle:
        raise ValueError("make_loader: give `sampler` or `shuffle`, not both")
    collate = collate_fn or default_collate
    if not isinstance(collate, CollateSkip):
        collate = CollateSkip(collate)
    workers: dict[str, Any] = {}
    if num_workers > 0:
        workers = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )


class StagedSampler(Sampler[int]):
    """Each epoch: the stages in order, each shuffled by (seed, epoch, stage).

    With ``lengths`` (one per dataset position), a stage's order is transformers' length-grouped
    one instead (``get_length_grouped_indices``: shuffled, cut into mega-batches of 50 batches,
    each sorted by length, the longest batch first), so each batch of ``batch_size`` consecutive
    positions holds samples of similar length and little padding. The order depends only on
    (seed, epoch, stage), so every process agrees on it (accelerate shards the batches) and a
    resumed run (accelerate skips the batches already seen) continues exactly. ``set_epoch`` is
    called by accelerate's prepared loader.
    """

    def __init__(self, stages: Sequence[Sequence[int]], seed: int, shuffle: bool = True,
                 lengths: Sequence[int] | None = None, batch_size: int = 1):
        self.stages = [np.asarray(s, dtype=np.int64) for s in stages]
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(s) for s in self.stages)

    def __iter__(self) -> Iterator[int]:
        for k, stage in enumerate(self.stages):
            if self.lengths is not None and len(stage):
                seed = int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])
                order = get_length_grouped_indices(self.lengths[stage].tolist(), self.batch_size,
                                                   generator=torch.Generator().manual_seed(seed))
                stage = stage[order]
            elif self.shuffle:
                stage = stage[np.random.default_rng([self.seed, self.epoch, k]).permutation(len(stage))]
            yield from stage.tolist()
