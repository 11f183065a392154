"""The one DataLoader factory: seeded, bad-sample aware, worker options set only where they apply.

Distributed runs: build the loader here and pass it to ``accelerator.prepare`` (accelerate,
with DeepSpeed), which shards it across processes itself and seeds its sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

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
