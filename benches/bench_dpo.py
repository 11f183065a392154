"""DPO training speed and memory against TRL's DPOTrainer on the same tiny LLaVA and the same pairs.

Both train LoRA adapters (same rank, alpha and target layers, projector frozen) with the same
batch size, learning rate and number of steps, on pairs whose two sides see the same image
(TRL cannot put another image on the rejected side), in float32 (TRL's DPOConfig defaults to bf16
autocast: set off); gradient checkpointing is off in both for the speed rows (TRL's default is on)
and on in both for the memory step. Each run is a fresh single-threaded
subprocess that reports its steady speed (the intervals between step starts, the first one left
out as warm-up, which also holds the one-time reference caching) in steps per second of process
CPU time -- wall time is given too, but on a shared machine it measures the neighbours -- and its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the whole process).

Not the same work per pair: since both sides of a pair see the same image and prompt, ours runs
each pair as ONE row [prompt, chosen, rejected] (``DpoConfig.share_prompt``, on by default: the
prompt is computed once, the log-probs are those of two rows), while TRL 1.16 runs two rows,
prompt + chosen and prompt + rejected (its DPO collators concatenate them; it has no option to
share the prompt: ``padding_free`` is disabled in 1.16 and would pack rows without sharing, and its
prefix sharing lives only in the experimental async GRPO trainer's packing). D_cm pairs, whose
rejected side sees a noised image, take two rows in ours as well. Rows:

- ``dpo steps/s vs TRL``: ours (reference forward with the adapter disabled, each step) / TRL's;
- ``dpo peak RSS vs TRL``: ours / TRL's (lower is better);
- ``dpo cached reference``: ours with reference log-probs cached / ours computing them each step;
- ``dpo step peak memory at a 151,936-token vocabulary``: one DPO step (batch 2 pairs, prompt about
  1,200 tokens + answers of about 300) on the tiny LLaVA with Qwen2-VL's vocabulary, ours / TRL's:
  the rise of the process's RSS above its value as the step starts (VmHWM, reset through Linux's
  ``/proc/self/clear_refs`` as the first step starts, read as the second starts), and the step's CPU time.

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
LONG_VOCAB = 151_936  # Qwen2-VL's vocabulary
LONG_WORDS = (1_160, 300)  # prompt and answer words of the memory step: about 1,200 and 300 tokens
SPEED_KEYS = ("steps_per_cpu_s", "steps_per_s", "wall_s", "peak_rss_mb")


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


def make_long_data(root: Path, prompt_words: int, answer_words: int) -> tuple[Path, Path]:
    """4 pairs with long prompts and answers (words the tokenizer holds whole) and the tiny LLaVA
    of ``make_data`` with a LONG_VOCAB-token output head (a context of 2,048)."""
    from transformers import AutoModelForImageTextToText

    from toy.toy_policy import ToyPolicyConfig, build_toy_policy

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    words = "there is no nodule in the image".split()
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        question, chosen, rejected = (" ".join(rng.choice(words, n)) for n in (prompt_words, answer_words, answer_words))
        records.append({
            "id": str(i), "image": f"{i}.png", "rejected_noised": 0,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": chosen}],
            "rejected_conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                       {"from": "gpt", "value": rejected}],
        })
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(records))
    cfg = ToyPolicyConfig(vocab_size=400, image_size=32, patch_size=8, vision_width=128, vision_layers=3,
                          text_width=192, text_layers=3, max_positions=2048)
    policy = build_toy_policy((QUESTIONS + ANSWERS + [" ".join(words)]) * 20, root / "policy", cfg)
    model = AutoModelForImageTextToText.from_pretrained(policy)
    model.resize_token_embeddings(LONG_VOCAB, mean_resizing=False)
    model.save_pretrained(policy)
    return pairs, policy


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB


class StepClock:
    """Step start stamps, and the first step's peak memory: the RSS high-water mark is reset as
    the first step starts (Linux ``clear_refs``) and read as the second starts."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []
        self.rss_at_start = self.first_step_peak = float("nan")
        self.shape: list[int] = []  # input_ids of the first step

    def tick(self, input_ids: Any = None) -> None:
        if not self.starts:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_at_start = _status_mb("VmRSS")
        elif len(self.starts) == 1:
            self.first_step_peak = _status_mb("VmHWM") - self.rss_at_start
        if input_ids is not None and not self.shape:
            self.shape = list(input_ids.shape)
        self.starts.append(_stamp())


def _result(clock: StepClock, t0: float) -> dict[str, Any]:
    """Steps per CPU second and per wall second from step start stamps (first interval left
    out: warm-up; with two steps, the first), the whole run's wall time, the process's peak RSS,
    the first step's CPU time and its memory rise."""
    starts = clock.starts
    (w0, c0), (w1, c1) = starts[1] if len(starts) > 2 else starts[0], starts[-1]
    n = max(len(starts) - 2, 1)
    return {"steps_per_cpu_s": n / (c1 - c0), "steps_per_s": n / (w1 - w0), "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "first_step_cpu_s": starts[1][1] - starts[0][1], "first_step_peak_mb": clock.first_step_peak,
            "rss_at_start_mb": clock.rss_at_start, "shape": clock.shape}


def worker_ours(pairs: Path, policy: Path, out: Path, steps: int, batch: int, cached: bool,
                checkpointing: bool) -> dict[str, Any]:
    from common.engine import EngineConfig, LoraConfig
    from dpo.train_dpo import DpoConfig, DpoTrainer, run
    from policy.policy import PolicySpec

    clock = StepClock()
    loss = DpoTrainer.loss

    def timed(self, model, b):
        clock.tick(b["inputs"]["input_ids"])
        return loss(self, model, b)

    DpoTrainer.loss = timed
    t0 = time.perf_counter()
    run(DpoConfig(
        pairs=[str(pairs)], image_root=str(pairs.parent / "images"), policy=PolicySpec(path=str(policy)),
        heldout_fraction=0.0, max_length=2048,
        cache_reference=cached, lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0),
        train=EngineConfig(output_dir=str(out), batch_size=batch, max_steps=steps, lr=LR, warmup_ratio=0.0,
                           gradient_checkpointing=checkpointing,
                           log_every=1, progress=False, save_every=10**9),
    ))
    return _result(clock, t0)


def worker_trl(pairs: Path, policy: Path, out: Path, steps: int, batch: int, checkpointing: bool) -> dict[str, Any]:
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
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.tick()

    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR, warmup_steps=0,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", max_length=None,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
        bf16=False,  # TRL's default is bf16 autocast; float32 as ours
    )
    t0 = time.perf_counter()
    compute_loss = DPOTrainer.compute_loss

    def shaped(self, model, inputs, *a, **kw):
        clock.shape = clock.shape or list(inputs["input_ids"].shape)
        return compute_loss(self, model, inputs, *a, **kw)

    DPOTrainer.compute_loss = shaped
    DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora,
               callbacks=[Clock()]).train()
    return _result(clock, t0)


def measure(kind: str, pairs: Path, policy: Path, steps: int, batch: int, checkpointing: bool = False) -> dict[str, Any]:
    """One run of ``kind`` (ours | cached | trl) in a fresh subprocess."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benches.bench_dpo", "--worker", kind, "--pairs", str(pairs),
               "--policy", str(policy), "--out", out, "--steps", str(steps), "--batch", str(batch),
               *(["--checkpointing"] if checkpointing else [])]
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
                for key in SPEED_KEYS:  # speeds: highest; times and memory: lowest
                    prev[key] = (max if key.startswith("steps") else min)(prev[key], got[key])
        long_pairs, long_policy = make_long_data(Path(tmp) / "long", *LONG_WORDS)
        mem = {kind: measure(kind, long_pairs, long_policy, 2, 2, checkpointing=True) for kind in ("trl", "ours")}
    ours, trl, cached = best["ours"], best["trl"], best["cached"]
    setup = f"tiny LLaVA, LoRA r{LORA['r']}, batch {batch}, {steps} steps, CPU 1 thread, best of {repeats}"
    wall = f"wall-clock steps/s {ours['steps_per_s']:.3g} vs {trl['steps_per_s']:.3g}"
    return [
        {"benchmark": "dpo speed vs TRL DPOTrainer", "ours": ours["steps_per_cpu_s"], "anchor": trl["steps_per_cpu_s"],
         "ratio": ours["steps_per_cpu_s"] / trl["steps_per_cpu_s"], "unit": "steps/CPU-s",
         "note": f"higher is better; {setup}; reference forward each step in both; float32 and gradient checkpointing "
                 f"off in both (TRL's DPOConfig defaults, bf16 autocast and checkpointing, set off: the same work as "
                 f"ours); ours runs each pair as one [prompt, chosen, rejected] row (share_prompt), TRL as two rows "
                 f"(it has no prompt sharing), input_ids {ours['shape']} ours vs {trl['shape']} TRL; {wall}"},
        {"benchmark": "dpo peak RSS vs TRL DPOTrainer", "ours": ours["peak_rss_mb"], "anchor": trl["peak_rss_mb"],
         "ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"], "unit": "MB",
         "note": f"lower is better; whole process; {setup}"},
        {"benchmark": "dpo cached reference vs on-the-fly", "ours": cached["steps_per_cpu_s"],
         "anchor": ours["steps_per_cpu_s"], "ratio": cached["steps_per_cpu_s"] / ours["steps_per_cpu_s"],
         "unit": "steps/CPU-s",
         "note": f"higher is better; whole run {cached['wall_s']:.1f} s cached vs {ours['wall_s']:.1f} s wall "
                 f"(caching is one pass over the pairs before the first step); {setup}"},
        *memory_rows(mem["ours"], mem["trl"]),
    ]


def memory_rows(ours: dict[str, Any], trl: dict[str, Any]) -> list[dict[str, Any]]:
    """The step-peak and step-time rows of the 151,936-token-vocabulary DPO step."""
    setup = (f"one DPO step, tiny LLaVA with a {LONG_VOCAB:,}-token head, 2 pairs, input_ids {ours['shape']} ours vs "
             f"{trl['shape']} TRL (ours one [prompt, chosen, rejected] row per pair, TRL chosen + rejected rows), LoRA r{LORA['r']}, reference forward in both, float32 in both, "
             "CPU 1 thread; TRL 1.16 at its lowest-memory setting: gradient checkpointing (its default; on in ours too) and "
             "its fused chunked LM head (always on in 1.16; padding_free is disabled in 1.16 and "
             "precompute_ref_log_probs refused for image data), which on CPU scores every position in 4096 x 32768 "
             "tiles (only completion positions on Triton GPUs)")
    return [
        {"benchmark": "dpo step peak memory at a 151,936-token vocabulary vs TRL DPOTrainer",
         "ours": ours["first_step_peak_mb"], "anchor": trl["first_step_peak_mb"],
         "ratio": ours["first_step_peak_mb"] / trl["first_step_peak_mb"], "unit": "MB",
         "note": f"lower is better, target <= 0.5; RSS rise above the step's start (VmHWM, reset as the step starts); "
                 f"RSS at the step's start {ours['rss_at_start_mb']:.0f} vs {trl['rss_at_start_mb']:.0f} MB; {setup}"},
        {"benchmark": "dpo step time at a 151,936-token vocabulary vs TRL DPOTrainer",
         "ours": ours["first_step_cpu_s"], "anchor": trl["first_step_cpu_s"],
         "ratio": trl["first_step_cpu_s"] / ours["first_step_cpu_s"], "unit": "CPU-s",
         "note": f"ratio = TRL / ours (higher is better, target >= 1); the same step as the row above"},
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
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "trl":
        result = worker_trl(args.pairs, args.policy, args.out, args.steps, args.batch, args.checkpointing)
    elif args.worker:
        result = worker_ours(args.pairs, args.policy, args.out, args.steps, args.batch, args.worker == "cached",
                             args.checkpointing)
    else:
        for row in run(args.quick):
            print(row)
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
