"""DPO training speed and memory against TRL's DPOTrainer on the same tiny LLaVA and the same pairs.

Both train LoRA adapters (same rank, alpha and target layers, projector frozen) with the same
batch size, learning rate and number of steps, on pairs whose two sides see the same image
(TRL cannot put another image on the rejected side). Each run is a fresh single-threaded
subprocess that reports its steady speed (the intervals between step starts, the first one left
out as warm-up, which also holds the one-time reference caching) in steps per second of process
CPU time -- wall time is given too, but on a shared machine it measures the neighbours -- and its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the whole process). Rows:

- ``dpo steps/s vs TRL``: ours (reference forward with the adapter disabled, each step) / TRL's;
- ``dpo peak RSS vs TRL``: ours / TRL's (lower is better);
- ``dpo cached reference``: ours with reference log-probs cached / ours computing them each step.

Usage: python -m benches.bench_dpo [--quick]   (or through benches.bench)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["Is there a bright square in the image?", "Is the image dark?", "Is there a nodule?"]
ANSWERS = ["Yes, there is a bright square in the upper left.", "No, the image is not dark at all.",
           "No, there is no nodule.", "Yes, there is a small nodule in the centre of the image."]
LORA = {"r": 16, "alpha": 32}
LR = 1e-4


def make_data(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` preference pairs (released JSON format, no noised side) with PNGs, and a tiny LLaVA."""
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        q = QUESTIONS[i % len(QUESTIONS)]
        chosen, rejected = ANSWERS[i % 4], ANSWERS[(i + 1) % 4]
        records.append({
            "id": str(i), "image": f"{i}.png", "rejected_noised": 0,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": chosen}],
            "rejected_conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": rejected}],
        })
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(records))
    cfg = ToyPolicyConfig(vocab_size=400, image_size=32, patch_size=8, vision_width=128, vision_layers=3,
                          text_width=192, text_layers=3)
    policy = build_toy_policy((QUESTIONS + ANSWERS) * 20, root / "policy", cfg)
    return pairs, policy


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _result(starts: list[tuple[float, float]], t0: float) -> dict[str, float]:
    """Steps per CPU second and per wall second from step start stamps (first interval left
    out: warm-up), the whole run's wall time and the process's peak RSS."""
    (w0, c0), (w1, c1) = starts[1], starts[-1]
    n = len(starts) - 2
    return {"steps_per_cpu_s": n / (c1 - c0), "steps_per_s": n / (w1 - w0), "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def worker_ours(pairs: Path, policy: Path, out: Path, steps: int, batch: int, cached: bool) -> dict[str, float]:
    from common.engine import EngineConfig, LoraConfig
    from dpo.train_dpo import DpoConfig, DpoTrainer, run
    from policy.policy import PolicySpec

    starts: list[tuple[float, float]] = []
    loss = DpoTrainer.loss

    def timed(self, model, b):
        starts.append(_stamp())
        return loss(self, model, b)

    DpoTrainer.loss = timed
    t0 = time.perf_counter()
    run(DpoConfig(
        pairs=[str(pairs)], image_root=str(pairs.parent / "images"), policy=PolicySpec(path=str(policy)),
        heldout_fraction=0.0,
        cache_reference=cached, lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0),
        train=EngineConfig(output_dir=str(out), batch_size=batch, max_steps=steps, lr=LR, warmup_ratio=0.0,
                           log_every=1, progress=False, save_every=10**9),
    ))
    return _result(starts, t0)


def worker_trl(pairs: Path, policy: Path, out: Path, steps: int, batch: int) -> dict[str, float]:
    import peft
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from common.engine import language_linear_names

    records = json.loads(pairs.read_text())
    rows = {
        "images": [[str(pairs.parent / "images" / r["image"])] for r in records],
        "prompt": [[{"role": "user", "content": r["conversations"][0]["value"].removeprefix("<image>\n")}] for r in records],
        "chosen": [[{"role": "assistant", "content": r["conversations"][1]["value"]}] for r in records],
        "rejected": [[{"role": "assistant", "content": r["rejected_conversations"][1]["value"]}] for r in records],
    }
    turn = [{"role": Value("string"), "content": Value("string")}]
    features = Features({"images": [ImageFeature()], "prompt": turn, "chosen": turn, "rejected": turn})
    dataset = Dataset.from_dict(rows, features=features)
    model = AutoModelForImageTextToText.from_pretrained(policy)
    processor = AutoProcessor.from_pretrained(policy)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=language_linear_names(model, ["all-linear"]))
    starts: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(_stamp())

    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR, warmup_steps=0,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", max_length=None,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    t0 = time.perf_counter()
    DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora,
               callbacks=[Clock()]).train()
    return _result(starts, t0)


def measure(kind: str, pairs: Path, policy: Path, steps: int, batch: int) -> dict[str, float]:
    """One run of ``kind`` (ours | cached | trl) in a fresh subprocess."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benches.bench_dpo", "--worker", kind, "--pairs", str(pairs),
               "--policy", str(policy), "--out", out, "--steps", str(steps), "--batch", str(batch)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict[str, Any]]:
    steps, batch, repeats = (8, 4, 1) if quick else (30, 8, 2)
    with tempfile.TemporaryDirectory() as tmp:
        pairs, policy = make_data(Path(tmp), n=steps * batch + 8)  # one epoch: no end-of-epoch work timed
        best: dict[str, dict[str, float]] = {}
        for _ in range(repeats):  # interleaved, best of: the machine may be shared
            for kind in ("trl", "ours", "cached"):
                got = measure(kind, pairs, policy, steps, batch)
                prev = best.setdefault(kind, got)
                for key in got:  # speeds: highest; times and memory: lowest
                    prev[key] = (max if key.startswith("steps") else min)(prev[key], got[key])
    ours, trl, cached = best["ours"], best["trl"], best["cached"]
    setup = f"tiny LLaVA, LoRA r{LORA['r']}, batch {batch}, {steps} steps, CPU 1 thread, best of {repeats}"
    wall = f"wall-clock steps/s {ours['steps_per_s']:.3g} vs {trl['steps_per_s']:.3g}"
    return [
        {"benchmark": "dpo speed vs TRL DPOTrainer", "ours": ours["steps_per_cpu_s"], "anchor": trl["steps_per_cpu_s"],
         "ratio": ours["steps_per_cpu_s"] / trl["steps_per_cpu_s"], "unit": "steps/CPU-s",
         "note": f"higher is better; {setup}; reference forward each step in both; {wall}"},
        {"benchmark": "dpo peak RSS vs TRL DPOTrainer", "ours": ours["peak_rss_mb"], "anchor": trl["peak_rss_mb"],
         "ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"], "unit": "MB",
         "note": f"lower is better; whole process; {setup}"},
        {"benchmark": "dpo cached reference vs on-the-fly", "ours": cached["steps_per_cpu_s"],
         "anchor": ours["steps_per_cpu_s"], "ratio": cached["steps_per_cpu_s"] / ours["steps_per_cpu_s"],
         "unit": "steps/CPU-s",
         "note": f"higher is better; whole run {cached['wall_s']:.1f} s cached vs {ours['wall_s']:.1f} s wall "
                 f"(caching is one pass over the pairs before the first step); {setup}"},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["ours", "cached", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--policy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "trl":
        result = worker_trl(args.pairs, args.policy, args.out, args.steps, args.batch)
    elif args.worker:
        result = worker_ours(args.pairs, args.policy, args.out, args.steps, args.batch, args.worker == "cached")
    else:
        for row in run(args.quick):
            print(row)
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
