"""The training order (data.loader.StagedSampler): stages in order, reshuffled per epoch, and
length-grouped batches that pad less than random ones and shard and resume like them."""

from __future__ import annotations

import numpy as np

from data.loader import StagedSampler


def test_staged_sampler_keeps_stage_order_and_reshuffles_per_epoch():
    sampler = StagedSampler([[0, 1, 2, 3, 4], [5, 6, 7]], seed=0)
    first = list(sampler)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and sorted(first[5:]) == [5, 6, 7]
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    orders = {tuple(sampler)} | {tuple(first)}
    sampler.set_epoch(2)
    orders.add(tuple(sampler))
    assert len(orders) > 1
    assert list(StagedSampler([[0, 1, 2, 3, 4], [5, 6, 7]], seed=0)) == first


def padded_share(order: list[int], lengths: np.ndarray, batch: int) -> float:
    """Share of the tokens of right-padded batches of ``batch`` consecutive positions that are padding."""
    total = real = 0
    for s in range(0, len(order), batch):
        got = lengths[order[s:s + batch]]
        total += got.max() * len(got)
        real += got.sum()
    return 1 - real / total


def test_length_grouped_order_keeps_stages_and_pads_less():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.0, 1.2, 1000), 1, 750).astype(int)
    stages = [list(range(0, 600)), list(range(600, 1000))]
    grouped = StagedSampler(stages, seed=0, lengths=lengths, batch_size=8)
    order = list(grouped)
    assert sorted(order[:600]) == stages[0] and sorted(order[600:]) == stages[1]
    assert order == list(StagedSampler(stages, seed=0, lengths=lengths, batch_size=8))  # every process agrees
    assert lengths[order[0]] == lengths.max()  # the longest batch first: out of memory at once, if at all
    grouped.set_epoch(1)
    assert list(grouped) != order and sorted(grouped) == sorted(order)
    shuffled = list(StagedSampler(stages, seed=0))
    assert padded_share(order, lengths, 8) < 0.5 * padded_share(shuffled, lengths, 8)
