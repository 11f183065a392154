"""Length-grouped against uniformly shuffled training batches: padded share and throughput.

The order is the trainers' own (``data.loader.StagedSampler``, as SFT and DPO build it with
``train.group_by_length`` on and off). The lengths are drawn from a stated distribution shaped
like the MMed-RAG release's training sequences, not from real data: 576 image tokens, a prompt
of 600-1,000 text tokens (uniform; k = 5 references), and an answer from a log-normal with a
median of 40 tokens and sigma 1.3, clipped to 1-750 (yes/no answers at the short end, MIMIC
reports in the tail).

- Padded share: every batch of one epoch right-padded to its longest sequence; the share of its
  tokens that are padding.
- Throughput: answer-and-prompt tokens (padding not counted) per second of a forward + backward
  of a tiny Llama (2 layers, width 64, SDPA attention, 1 thread) on 12 batches spread evenly over
  the epoch of each order. Attention is most of a tiny model's work at these lengths, the linear
  layers most of a 7B model's; both grow with the padded length.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.loader import StagedSampler

IMAGE_TOKENS = 576
SEED = 0


def draw_lengths(n: int, seed: int = SEED) -> np.ndarray:
    """Sequence lengths in tokens: image + prompt + answer, as stated in the module docstring."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(600, 1001, n)
    answer = np.clip(np.rint(rng.lognormal(np.log(40), 1.3, n)), 1, 750).astype(np.int64)
    return IMAGE_TOKENS + prompt + answer


def batches(order: list[int], lengths: np.ndarray, size: int) -> list[np.ndarray]:
    return [lengths[order[s:s + size]] for s in range(0, len(order) - size + 1, size)]


def padded_share(batch_lengths: list[np.ndarray]) -> float:
    total = sum(int(b.max()) * len(b) for b in batch_lengths)
    return 1 - sum(int(b.sum()) for b in batch_lengths) / total


def orders(lengths: np.ndarray, size: int) -> dict[str, list[int]]:
    """One epoch's order of each kind, as the trainers draw it (seed 0, epoch 0)."""
    everything = [list(range(len(lengths)))]
    return {"grouped": list(StagedSampler(everything, SEED, lengths=lengths, batch_size=size)),
            "random": list(StagedSampler(everything, SEED))}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def step_seconds(model: LlamaForCausalLM, batch_lengths: list[np.ndarray]) -> float:
    """Seconds of forward + backward over right-padded batches (padding masked out of attention and loss)."""
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for lens in batch_lengths:
        width = int(lens.max())
        mask = (torch.arange(width)[None, :] < torch.as_tensor(lens)[:, None]).long()
        ids = torch.randint(0, 1000, (len(lens), width), generator=gen) * mask
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    n = 2000 if quick else 20000
    lengths = draw_lengths(n)
    note = (f"lower is better; {n} synthetic sequences: 576 image + U(600, 1000) prompt + log-normal answer "
            f"(median 40, sigma 1.3, 1-750) tokens, mean {lengths.mean():.0f}, max {lengths.max()}; "
            "one epoch of the trainers' order (data.loader.StagedSampler); anchor: uniformly shuffled")
    rows = []
    for size in (4, 8, 16):
        got = {k: padded_share(batches(o, lengths, size)) for k, o in orders(lengths, size).items()}
        rows.append({"benchmark": f"padded share of batch tokens, length-grouped vs random, batch {size}",
                     "ours": got["grouped"], "anchor": got["random"], "ratio": got["grouped"] / got["random"],
                     "unit": "share", "note": note})

    size, picked = 8, 6 if quick else 12
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama()
    sampled = {}
    for kind, order in orders(lengths, size).items():
        every = batches(order, lengths, size)
        sampled[kind] = [every[i] for i in np.linspace(0, len(every) - 1, picked).astype(int)]
    step_seconds(model, [b[:2] for b in sampled["random"][:2]])  # warm-up
    best = {k: float("inf") for k in sampled}
    for _ in range(2):  # interleaved, best of 2: other jobs share the cores
        for kind, chosen in sampled.items():
            best[kind] = min(best[kind], step_seconds(model, chosen))
    torch.set_num_threads(threads)
    speed = {k: sum(int(b.sum()) for b in sampled[k]) / best[k] for k in sampled}
    rows.append({"benchmark": f"training throughput, length-grouped vs random batches, batch {size}",
                 "ours": speed["grouped"], "anchor": speed["random"], "ratio": speed["grouped"] / speed["random"],
                 "unit": "tokens/s", "note": f"higher is better; unpadded tokens per second of forward + backward of a "
                                             f"tiny Llama (2 layers, width 64, SDPA, 1 thread) on {picked} batches spread "
                                             f"over the epoch of each order, best of 2 interleaved; padded share of those "
                                             f"batches {padded_share(sampled['grouped']):.3f} vs "
                                             f"{padded_share(sampled['random']):.3f}; lengths as above; load average {load:.1f} "
                                             f"on {os.cpu_count()} cores at the start"})
    return rows


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
