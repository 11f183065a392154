"""Pair-builder generation: batches of 16 records against one record at a time (records/s).

Each record is answered under the builder's three conditions (a, b, c) through
``pairs.build_pairs.answer_batch``, the builder's own path (image loading, x_v*, prompts, generation).
Policy: ``outputs/toy/policy`` if present, else an untrained policy of the same architecture
(``configs/toy/toy_policy.yaml``), which costs the same per token. Records are toy VQA
alignment questions with three retrieved reports of their domain each. Target: >= 4x.
Measured with torch's default threads and with one thread: on shared cores two threads of a tiny
model spin against each other and run several times slower than one.

A last row repeats the comparison with one new token per answer (prompt encoding only). Its
ratio shows how much of the work batching cannot share: the prompt pass costs the same FLOPs
per row in a batch of 16 as alone, so it bounds the speed-up of the full run.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from data.manifest import manifest_files
from data.readers import read_records
from pairs.build_pairs import Item, PairsConfig, answer_batch, batches, other_candidates
from policy.policy import load_policy
from policy.prompts import load_prompt_templates, prompts_for
from toy.make_toy import make_world

TOY_POLICY = Path("outputs/toy/policy")
TOY_POLICY_CONFIG = Path("configs/toy/toy_policy.yaml")
BATCH = 16


def _policy_dir(tmp: Path, world: Path) -> tuple[Path, str]:
    if (TOY_POLICY / "config.json").is_file():
        return TOY_POLICY, "toy policy"
    from common.config import load_config
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

    argv = [str(TOY_POLICY_CONFIG)] if TOY_POLICY_CONFIG.is_file() else []
    cfg = load_config(ToyPolicyConfig, argv)
    cfg.vision_pretrain_epochs = cfg.reading_steps = 0  # the architecture is what is timed, not what it learned
    return build_toy_policy(world_texts(world), tmp / "policy", cfg), "untrained policy of the toy architecture"


def _items(world: Path, n: int) -> list[Item]:
    """VQA alignment records with 3 reports of their domain as references (not their own)."""
    items = []
    for e in manifest_files(world, role="alignment_vqa"):
        corpus = [r.text for f in manifest_files(world, role="retriever_train", domain=e["domain"])
                  for r in read_records(f["path"])]
        for i, r in enumerate(read_records(e["path"])):
            refs = [corpus[(i + j) % len(corpus)] for j in range(3)]
            items.append(Item(key=f"{e['domain']}/{r.id}", id=r.id, task="vqa", domain=e["domain"],
                              question=r.question, truth=r.answer, references=refs, image=r.images[0],
                              record_root=None, default_root=e["image_root"], source=r.source, file=0))
    return items[:: max(1, len(items) // n)][:n]


def run(quick: bool = False) -> list[dict]:
    n = 16 if quick else 48
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = make_world(tmp / "world", size="tiny", progress=False)
        path, what = _policy_dir(tmp, world)
        policy = load_policy(path)
        items = _items(world, n)
        cfg = PairsConfig(out=str(tmp / "out"), max_new_tokens_vqa=32)
        templates = load_prompt_templates(prompts_for(path))
        pool = other_candidates(items)

        def timed(size: int, new_tokens: int = 32) -> tuple[float, list[dict]]:
            c = replace(cfg, batch_size=size, max_new_tokens_vqa=new_tokens)
            answers: list[dict] = []
            start = time.perf_counter()
            for b in batches(items, size):
                answers += answer_batch(policy, b, c, templates, pool, tmp / "out", None)
            return len(items) / (time.perf_counter() - start), answers

        default_threads = torch.get_num_threads()
        rows = []
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                answer_batch(policy, items[:2], cfg, templates, pool, tmp / "out", None)  # warm-up
                single, one_rows = timed(1)
                batched, batch_rows = timed(BATCH)
            same = sum(a == b for a, b in zip(one_rows, batch_rows))
            rows.append({
                "benchmark": f"pair builder generation (3 conditions/record), batch {BATCH} vs 1, {threads} thread(s)",
                "ours": batched,
                "anchor": single,
                "ratio": batched / single,
                "unit": "records/s",
                "note": f"higher is better; {what}, {n} toy VQA records, 3 references, max 32 new tokens; "
                        f"one record = a+b in one call, c in another; {same}/{n} records with identical "
                        "answers; target >= 4x",
            })
            if threads == 1:
                with torch.inference_mode():
                    single, batched = timed(1, new_tokens=1)[0], timed(BATCH, new_tokens=1)[0]
                rows.append({
                    "benchmark": f"pair builder prompt encoding only (1 new token), batch {BATCH} vs 1, 1 thread",
                    "ours": batched,
                    "anchor": single,
                    "ratio": batched / single,
                    "unit": "records/s",
                    "note": "the part of generation that batching cannot share (same FLOPs per row): "
                            "it bounds the ratio of the rows above",
                })
        torch.set_num_threads(default_threads)
    return rows


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
