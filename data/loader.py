"""The one DataLoader factory: seeded, bad-sample aware, worker options set only where they apply.

Distributed runs: under accelerate (the project's way, with DeepSpeed), build the loader here
with ``distributed=None`` and pass it to ``accelerator.prepare``, which shards it across
processes itself (and seeds its sampler). For a plain ``torch.distributed`` run, pass
``distributed=(rank, world_size)``: a DistributedSampler shards it here; call
``loader.sampler.set_epoch(epoch)`` each epoch so that shuffling differs between epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from data.datasets import CollateSkip


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
    seed: int = 0,
    distributed: tuple[int, int] | None = None,
    prefetch_factor: int = 2,
    sampler: Sampler[int] | Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader whose batches carry their skipped samples (see data.datasets).

    ``collate_fn`` (default: torch's default_collate) is wrapped in CollateSkip. Pinned memory
    only when CUDA is present; persistent workers and prefetching only when there are workers.
    The order is reproducible from ``seed`` (workers are seeded from it by torch). ``sampler``
    gives the order itself (a staged sampler, a shard's positions) instead of ``shuffle``.
    """
    if sampler is not None and (shuffle or distributed is not None):
        raise ValueError("make_loader: give `sampler`, or `shuffle` / `distributed`, not both")
    collate = collate_fn or default_collate
    if not isinstance(collate, CollateSkip):
        collate = CollateSkip(collate)
    if distributed is not None:
        rank, world_size = distributed
        sampler = DistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
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
