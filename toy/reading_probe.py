"""Can the toy policy's language model learn to read its references? A text-only probe.

Why: with references whose majority answers 0.79 of val_vqa, the toy policy answers 0.61 with or
without them (docs/RESULTS.md). This separates reading from everything multimodal: the toy
policy's language model alone (its ``text_config``, from scratch), the prompt the policy sees
without the image, and a loss on the yes/no decision only, the densest signal reading can get.
If this cannot learn, no SFT mixture will make the policy read; if it can, the mixture is at fault.

The loss is a two-way cross-entropy between the "Yes" and "No" rows of the LM head at the last
prompt position (the first answer word decides a yes/no answer: data.answers.yes_no). Written by
hand: a classifier of a few minutes with no checkpoint or process group is not a stage.

Run: ``python -m toy.reading_probe --out outputs/toy/reading_probe.json [--steps 3000]
[--lm_steps 1500]`` (``--lm_steps``: first a next-token loss on the training references'
text, a stand-in for a language model pretrained on reports). Writes the validation curve with
95% Wilson intervals and the majority-answer baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from common.config import cli_main, doc, load_config
from common.io import InputError, atomic_write_json
from common.stats import wilson
from data.answers import yes_no
from data.readers import read_index, read_records
from data.records import VqaRecord
from policy.prompts import load_prompt_templates, prompts_for


@dataclass
class ReadingProbeConfig:
    retrieval_index: str = doc("outputs/toy/oracle_retrieval/index.json", "index.json of retrieval JSONL with references")
    train_roles: list[str] = doc(["policy_train"], "index roles to train on")
    val_roles: list[str] = doc(["val_vqa"], "index roles to measure on (never test)")
    policy: str = doc("outputs/toy/policy_init", "toy policy folder: its tokenizer and its language model's shape")
    prompts: str = doc("", "prompt templates (policy.prompts); empty: the policy folder's (policy.prompts.prompts_for)")
    references: bool = doc(True, "put the references in the prompt (false: the question alone, a floor)")
    steps: int = doc(3000, "optimizer steps of the yes/no loss")
    lm_steps: int = doc(0, "next-token steps on the training references' text first (0 = none)")
    batch_size: int = doc(32, "prompts per step")
    lr: float = doc(1e-3, "peak learning rate (one-cycle)")
    eval_every: int = doc(250, "measure on val_roles every N steps")
    seed: int = doc(0, "seed of the model's initialisation and the batches")
    out: str = doc("outputs/toy/reading_probe.json", "where the curve is written")


def read_prompts(index: str, roles: list[str], tokenizer, prompts: str | Path,
                 references: bool = True) -> tuple[list[list[int]], list[int]]:
    """Token ids of each yes/no question's prompt (no image) and its label (1 = yes)."""
    templates = load_prompt_templates(prompts)
    ids, labels = [], []
    for entry in read_index(index, roles):
        for rec in read_records(entry["path"]):
            answer = yes_no(rec.answer) if isinstance(rec, VqaRecord) else "other"
            if answer == "other":
                continue
            refs = rec.meta.get("reference_reports") if references else None
            text = templates.text(entry["domain"], "vqa", rec.question, refs)
            ids.append(tokenizer(f"USER: {text}\nASSISTANT:")["input_ids"])
            labels.append(int(answer == "yes"))
    if not ids:
        raise InputError(f"{index}: no yes/no questions under roles {roles}")
    return ids, labels


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so the last position of every row is its prompt's last token."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def accuracy(model, prompts: list[list[int]], labels: list[int], choice: torch.Tensor, pad: int) -> int:
    """Questions answered right by comparing the two answer rows at the last position."""
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            ids, mask = left_padded(prompts[i:i + 64], pad)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, choice]
            right += (logits.argmax(-1) == torch.tensor(labels[i:i + 64])).sum().item()
    model.train()
    return right


def answer_rows(tokenizer, where: str) -> torch.Tensor:
    """The LM head rows of "No" and "Yes": the first answer word decides a yes/no answer."""
    choice = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in ("No", "Yes")])
    if tokenizer.unk_token_id in choice.tolist():
        raise InputError(f"{where}: the tokenizer has no single token for 'No' or 'Yes'")
    return choice


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle rate with a 5% warm-up of at least two steps (OneCycleLR divides by zero when
    its warm-up rounds to none)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=min(0.9, max(0.05, 2 / steps)))


def train_reading(model, prompts: list[list[int]], labels: list[int], choice: torch.Tensor, pad: int,
                  steps: int, batch_size: int, lr: float, seed: int, desc: str = "yes/no",
                  on_eval: Callable[[int, float], bool | None] | None = None, eval_every: int = 0) -> None:
    """Train ``model`` (a causal LM, or a LLaVA given text only) on the two-way cross-entropy
    between the "No" and "Yes" rows at each prompt's last position, AdamW with a one-cycle rate;
    ``on_eval(step, loss)`` every ``eval_every`` steps and at the end, and training stops when it
    returns True."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = one_cycle(opt, lr, steps)
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc):
        batch = rng.sample(range(len(prompts)), batch_size)
        ids, mask = left_padded([prompts[i] for i in batch], pad)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, choice]
        loss = F.cross_entropy(logits, torch.tensor([labels[i] for i in batch]))
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        if on_eval and ((eval_every and step % eval_every == 0) or step == steps) and on_eval(step, loss.item()):
            break


def probe(cfg: ReadingProbeConfig) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    pad = tokenizer.pad_token_id
    prompts = prompts_for(cfg.policy, cfg.prompts)
    train_x, train_y = read_prompts(cfg.retrieval_index, cfg.train_roles, tokenizer, prompts, cfg.references)
    val_x, val_y = read_prompts(cfg.retrieval_index, cfg.val_roles, tokenizer, prompts, cfg.references)
    choice = answer_rows(tokenizer, cfg.policy)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(cfg.policy).get_text_config())
    if cfg.lm_steps:
        texts = sorted({r for e in read_index(cfg.retrieval_index, cfg.train_roles)
                        for rec in read_records(e["path"]) for r in rec.meta.get("reference_reports", [])})
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        sched = one_cycle(opt, cfg.lr, cfg.lm_steps)
        for _ in tqdm(range(cfg.lm_steps), desc="next-token"):
            ids, mask = left_padded([tokenizer(t)["input_ids"] for t in rng.sample(texts, cfg.batch_size)], pad)
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            opt.step(), sched.step(), opt.zero_grad()
    curve, n = [], len(val_y)

    def measure(step: int, loss: float) -> None:
        right = accuracy(model, val_x, val_y, choice, pad)
        low, high = wilson(right, n)
        curve.append({"step": step, "train_loss": loss, "val_accuracy": right / n, "low": low, "high": high})
        tqdm.write(f"step {step}: loss {loss:.3f}, val accuracy {right / n:.3f} [{low:.3f}, {high:.3f}]")

    train_reading(model, train_x, train_y, choice, pad, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed,
                  on_eval=measure, eval_every=cfg.eval_every)
    majority = max(sum(val_y), n - sum(val_y)) / n
    return {"n_val": n, "n_train": len(train_y), "majority_answer_accuracy": majority, "curve": curve}


def main() -> None:
    cfg = load_config(ReadingProbeConfig, description=__doc__)
    result = probe(cfg)
    atomic_write_json(Path(cfg.out), {"config": cfg.__dict__, **result})
    last = result["curve"][-1]
    print(f"val accuracy {last['val_accuracy']:.3f} [{last['low']:.3f}, {last['high']:.3f}] (n {result['n_val']}); "
          f"majority answer {result['majority_answer_accuracy']:.3f}; written {cfg.out}")


if __name__ == "__main__":
    cli_main(main)
