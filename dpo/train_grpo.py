"""GRPO on the chain's yes/no VQA questions with retrieval in the prompt, LoRA on the policy (docs/DESIGN.md).

    bash scripts/train_grpo.sh [CONFIG.yaml] [--key value ...]     (default configs/toy/grpo.yaml)

The questions are the alignment split's VQA records the pair builder answered, each with the
prompt its answer a saw (the question and the references it fitted to the token budget) and its
stored x_v*, read with the pair builder's own readers from its run folder (``pairs_dir``). Each
step samples G answers per question from the current policy with the real image, scores them with
the verifiable yes/no reward (dpo.grpo.yes_no_reward) and, with ``copy_penalty`` > 0, samples G
more with x_v* (same prompt, references included) and pairs them i to i: answer i loses
``copy_penalty`` when noised answer i says the same yes/no (dpo.grpo.copy_penalty). Advantages are
group-relative (dpo.grpo.group_advantages); the loss is TRL's clipped objective with a k3 KL to the
reference, the same model with its LoRA disabled as in DPO (dpo.grpo.grpo_loss). Only the
real-image answers get gradients. The loop, checkpoints and exact resume are common.engine.

Our engine, not TRL's GRPOTrainer: TRL's reward functions see only the completions and dataset
columns (``_calculate_rewards``), so the copy penalty's second generation with x_v* would run
outside TRL's loop, and TRL trains in transformers' Trainer, a second training loop beside the
repo's one (common.engine: checkpoints, exact resume, DeepSpeed as SFT and DPO have them).

Outputs in ``train.output_dir``: ``adapter/`` (PEFT) + processor; ``metrics.jsonl`` and
``tensorboard/`` per logged step: reward (and its parts), reward_std, copy_rate (with a penalty),
kl (with beta), clip_ratio/region_mean, completions/mean_length, loss; ``checkpoints/``,
``run_config.yaml``, ``bad_records.json`` (questions skipped), ``bad_images.json``,
``run_summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from common.config import ConfigError, cli_main, doc, load_config
from common.engine import EngineConfig, LoraConfig, save_model, train
from common.io import InputError, atomic_write_json, run_lock
from data.answers import yes_no
from data.images import BadImageError, BadImageLog, load_image
from data.loader import make_loader
from data.readers import bad_records_summary
from dpo.grpo import Scale, by_answer, copy_penalty, group_advantages, grpo_loss, nanstd, yes_no_reward
from dpo.train_dpo import reference_mode, start_run
from pairs.build_pairs import GENERATIONS, PairsConfig, find_inputs, read_generations, read_items
from policy.budget import PromptParts
from policy.policy import Policy, PolicySpec, Prompt, prompt_sharing_blocker, token_logps, unwrap_parallel


@dataclass
class GrpoConfig:
    policy: PolicySpec = doc(PolicySpec(), "the policy to tune (the reference is it with the LoRA off); the prompts "
                                           "are the pair builder's, read from its run")
    pairs_dir: str = doc("outputs/toy/pairs", "the pair builder's run folder: its run_config.yaml names the alignment "
                                              "questions, its generations.jsonl the references each prompt held and x_v*")
    group_size: int = doc(4, "G: answers sampled per question, each scored against its group")
    temperature: float = doc(1.0, "sampling temperature of the G answers (whole vocabulary, as TRL)")
    max_new_tokens: int = doc(16, "longest sampled answer (at most the pair builder's max_new_tokens_vqa, which "
                                  "its prompts were fitted for)")
    iterations: int = doc(1, "optimizer steps on each batch of sampled answers (TRL's num_iterations); from the "
                             "second, the ratio to the sampling policy is clipped")
    beta: float = doc(0.04, "weight of the KL to the reference (0 = no reference forward)")
    epsilon: float = doc(0.2, "clip range of the ratio to the sampling policy: [1 - epsilon, 1 + epsilon]")
    advantage_scale: Scale = doc("group", "advantages divided by the group's reward std (group), the batch's "
                                          "(batch) or not at all (none)")
    copy_penalty: float = doc(0.0, "reward lost by an answer whose yes/no survives x_v* (its i-th noised-image "
                                   "sample says the same); 0 = plain GRPO, no noised sampling")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image or x_v*: skip the question (counted) or stop")
    bad_record: Literal["skip", "error"] = doc("skip", "a question record that cannot be used: skip it (named in "
                                                       "bad_records.json) or stop")
    lora: LoraConfig = doc(LoraConfig(), "what trains: LoRA on the language model (+ projector with lora.train_projector)")
    train: EngineConfig = doc(EngineConfig(output_dir="outputs/toy/grpo"), "questions per step (batch_size), "
                                                                           "optimizer, schedule, checkpoints (common.engine)")


def check(cfg: GrpoConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    if cfg.group_size < 2:
        raise ConfigError(f"group_size: GRPO scores each answer against its group; needs >= 2, got {cfg.group_size}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature: the G answers must be sampled; needs > 0, got {cfg.temperature}")
    if cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {cfg.max_new_tokens}")
    if cfg.iterations < 1:
        raise ConfigError(f"iterations: must be >= 1, got {cfg.iterations}")
    if cfg.iterations > 1 and cfg.train.grad_accum > 1:
        raise ConfigError("iterations: > 1 reuses a batch's answers over optimizer steps; with train.grad_accum > 1 "
                          "the repeats would fall in one step")
    if cfg.beta < 0:
        raise ConfigError(f"beta: must be >= 0, got {cfg.beta}")
    if not 0 < cfg.epsilon < 1:
        raise ConfigError(f"epsilon: must be in (0, 1), got {cfg.epsilon}")
    if cfg.copy_penalty < 0:
        raise ConfigError(f"copy_penalty: a penalty is >= 0 (0 = plain GRPO), got {cfg.copy_penalty}")
    if not cfg.lora.enabled:
        raise ConfigError("lora.enabled: GRPO here trains a LoRA (the reference is the model with its adapter disabled)")
    if not Path(cfg.policy.path).is_dir():
        raise ConfigError(f"policy.path: {cfg.policy.path}: checkpoint folder does not exist")
    if not (Path(cfg.pairs_dir) / "run_config.yaml").is_file():
        raise ConfigError(f"pairs_dir: {cfg.pairs_dir}: no pair builder run here (scripts/build_pairs.sh writes its "
                          "run_config.yaml)")


# ---------------------------------------------------------------- the questions


@dataclass(frozen=True)
class Question:
    """One yes/no question as the pair builder asked it with retrieval (its answer a)."""

    key: str
    prompt: Prompt  # the question with the references the pair builder fitted
    answer: str  # the gold answer
    image: str  # x_v
    noised_image: str  # x_v*, as the pair builder stored it


def read_questions(pairs_dir: Path, max_new_tokens: int, skipped: list[str], bad_record: str = "skip") -> list[Question]:
    """The VQA questions of the pair builder's run in ``pairs_dir``, in its record order: its own
    readers (``read_items`` on the inputs its run_config.yaml names) and, per record, the references
    and x_v* of its generations.jsonl. Records it skipped, and gold answers without a yes/no, go to
    ``skipped`` (``bad_record`` error: stop at the first)."""
    run_config = pairs_dir / "run_config.yaml"
    pairs = load_config(PairsConfig, [str(run_config)])
    if max_new_tokens > pairs.max_new_tokens_vqa:
        raise InputError(f"{run_config}: its prompts were fitted for {pairs.max_new_tokens_vqa} new tokens; "
                         f"max_new_tokens {max_new_tokens} may not fit")
    templates = pairs.policy.templates()
    rows = {row["key"]: row for row in read_generations(pairs_dir / GENERATIONS)}
    questions = []
    for item in read_items(find_inputs(pairs), pairs, skipped):
        if item.task != "vqa":
            continue
        row = rows.get(item.key)
        if row is None:
            raise InputError(f"{pairs_dir / GENERATIONS}: no answers for {item.key}; rerun the pair builder to finish")
        why = (f"the pair builder skipped it ({row['skipped']['reason']})" if "skipped" in row
               else "its gold answer has no yes or no" if yes_no(item.truth) == "other" else "")
        if why:
            if bad_record == "error":
                raise InputError(f"{item.source}: {why}")
            skipped.append(f"{item.source}: {why}")
            continue
        parts = PromptParts(item.domain, item.task, item.question, tuple(row["references"]), options=item.options)
        questions.append(Question(item.key, parts.prompt(templates), item.truth, str(item.image_path()),
                                  str(pairs_dir / row["rejected_image"])))
    if not questions:
        raise InputError(f"{pairs_dir}: no yes/no VQA question to train on")
    return questions


class RepeatedBatches(torch.utils.data.Sampler[int]):
    """Each epoch: the question positions shuffled by (seed, epoch) and cut into whole batches; each
    window of ``processes`` batches (one per process, as accelerate deals them) is given ``repeat``
    times in a row (TRL's RepeatSampler), so each process's ``repeat`` steps on its batch reuse one
    sampling. The order depends on (seed, epoch) alone, so a resumed run continues it."""

    def __init__(self, n: int, batch_size: int, repeat: int, seed: int, processes: int = 1):
        window = batch_size * processes
        if n < window:
            raise InputError(f"{n} questions, fewer than train.batch_size {batch_size} x {processes} process(es)")
        self.used, self.window, self.repeat, self.seed, self.epoch = n - n % window, window, repeat, seed, 0
        self.n = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.used * self.repeat

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[: self.used]
        for start in range(0, self.used, self.window):
            for _ in range(self.repeat):
                yield from order[start:start + self.window].tolist()


def collate_positions(positions: list[int]) -> dict[str, list[int]]:
    """A batch of question positions; the images are read in the main process (``GrpoTrainer.take``)."""
    return {"index": positions}


# ---------------------------------------------------------------- the trainer


@dataclass
class Rollout:
    """One batch's sampled answers and what the loss needs of them, kept for ``iterations`` steps."""

    index: list[int]
    inputs: dict[str, torch.Tensor]
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    old_logps: torch.Tensor | None = None  # the sampling policy's, from the first step's forward
    steps: int = 0


class GrpoTrainer:
    """The GRPO pieces the engine calls: ``take(batch)`` (images) and ``loss(model, batch)``."""

    def __init__(self, cfg: GrpoConfig, accelerator: Accelerator, policy: Policy):
        self.cfg = cfg
        self.accelerator = accelerator
        self.processor = policy.processor
        self.bad_records: list[str] = []
        self.questions = read_questions(Path(cfg.pairs_dir), cfg.max_new_tokens, self.bad_records, cfg.bad_record)
        self.bad_log = BadImageLog()
        sampler = RepeatedBatches(len(self.questions), cfg.train.batch_size, cfg.iterations, cfg.train.seed,
                                  accelerator.num_processes)
        self.loader = make_loader(list(range(len(self.questions))), cfg.train.batch_size,
                                  collate_fn=collate_positions, seed=cfg.train.seed, sampler=sampler)
        blocker = prompt_sharing_blocker(policy.model)
        if blocker:
            accelerator.print(f"each answer takes its own row ({blocker})")
        self.share_prompt = blocker is None
        self.rollout: Rollout | None = None

    def take(self, batch: Any) -> dict[str, Any] | None:
        """The batch with x_v and x_v* of each question; a question whose image cannot be read is
        dropped and counted (``bad_images.json``); None when none is left."""
        batch = self.bad_log.take(batch)
        if batch is None:
            return None
        kept: dict[str, list] = {"index": [], "image": [], "noised_image": []}
        for i in batch["index"]:
            q = self.questions[i]
            try:
                images = load_image(q.image), load_image(q.noised_image)
            except BadImageError as e:
                if self.cfg.bad_image == "error":
                    raise
                self.bad_log.record(e.path, e.reason, e.detail)
                continue
            for key, value in zip(kept, (i, *images)):
                kept[key].append(value)
        return kept if kept["index"] else None

    def sample(self, model: Any, batch: dict[str, Any]) -> Rollout:
        """G answers per question with x_v (and with x_v* for the copy penalty), their rewards and
        advantages, the training batch that scores them and the reference's log-probs."""
        cfg, g = self.cfg, self.cfg.group_size
        questions = [self.questions[i] for i in batch["index"]]
        policy = Policy(unwrap_parallel(model), self.processor)
        prompts = [q.prompt for q in questions for _ in range(g)]

        def answers(images: list[Image.Image]) -> tuple[list[str], list[list[int]]]:
            return policy.generate([im for im in images for _ in range(g)], prompts, cfg.max_new_tokens,
                                   batch_size=len(prompts), temperature=cfg.temperature, return_tokens=True)

        real, real_tokens = answers(batch["image"])  # the tokens are scored, the texts rewarded
        correct = torch.tensor([float("nan") if r is None else r
                                for r in yes_no_reward(real, [q.answer for q in questions for _ in range(g)])])
        rewards = correct
        metrics = {"rewards/yes_no_reward/mean": correct.nanmean().item()}
        if cfg.copy_penalty > 0:
            penalty = torch.tensor(copy_penalty(real, answers(batch["noised_image"])[0], cfg.copy_penalty))
            rewards = correct + penalty
            metrics.update({"rewards/copy_penalty/mean": penalty.mean().item(),
                            "copy_rate": (penalty != 0).float().mean().item()})
        group_std = nanstd(rewards.view(-1, g), dim=1)
        metrics.update({"reward": rewards.nanmean().item(), "reward_std": group_std.nanmean().item(),
                        "frac_reward_zero_std": (group_std == 0).float().mean().item()})
        if self.share_prompt:  # one row per question: [prompt, answer 1, ..., answer G]
            inputs = policy.encode_for_training([q.prompt for q in questions],
                                                [tuple(real[k * g:(k + 1) * g]) for k in range(len(questions))],
                                                batch["image"], answer_tokens=real_tokens)
        else:
            inputs = policy.encode_for_training(prompts, real, [im for im in batch["image"] for _ in range(g)],
                                                answer_tokens=real_tokens)
        ref = None
        if cfg.beta > 0:
            with reference_mode(self.accelerator, model) as ref_model:
                ref = by_answer(*token_logps(ref_model, inputs), len(real))[0]
        advantages = group_advantages(rewards, g, cfg.advantage_scale).to(self.accelerator.device)
        return Rollout(list(batch["index"]), inputs, advantages, ref, metrics)

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.rollout
        if r is None or r.index != batch["index"] or r.steps == self.cfg.iterations:
            r = self.rollout = self.sample(model, batch)
        logps, mask = by_answer(*token_logps(model, r.inputs), len(r.advantages))
        if r.old_logps is None:  # the first step on these answers: the policy is the one that sampled them
            r.old_logps = logps.detach()
        r.steps += 1
        loss, metrics = grpo_loss(logps, r.old_logps, r.ref_logps, r.advantages, mask, self.cfg.beta, self.cfg.epsilon)
        return loss, {**r.metrics, **metrics, "completions/mean_length": mask.sum(1).mean().item()}


# ---------------------------------------------------------------- outputs


def run(cfg: GrpoConfig) -> dict[str, Any]:
    """Train; returns the step reached, the adapter path and the number of questions."""
    check(cfg)
    out, accelerator, policy, model, trainer = start_run(cfg, GrpoTrainer)
    accelerator.print(f"questions: {len(trainer.questions)} ({len(trainer.bad_records)} skipped), "
                      f"G {cfg.group_size}, copy penalty {cfg.copy_penalty}; {accelerator.num_processes} process(es)")
    result = train(cfg.train, accelerator, model, trainer.loader, trainer.loss, processor=policy.processor,
                   take_batch=trainer.take)
    adapter = save_model(accelerator, result.model, out / "adapter", policy.processor)
    trainer.bad_log.write(accelerator, out / "bad_images.json")
    if accelerator.is_main_process:
        atomic_write_json(out / "bad_records.json", {"bad_records": bad_records_summary(trainer.bad_records)})
        atomic_write_json(out / "run_summary.json", {"step": result.step, "questions": len(trainer.questions),
                                                     "skipped_questions": len(trainer.bad_records)})
    return {"step": result.step, "adapter": adapter, "questions": len(trainer.questions)}


def main() -> None:
    cfg = load_config(GrpoConfig, description=__doc__)
    with run_lock(cfg.train.output_dir):
        summary = run(cfg)
    print(f"adapter: {summary['adapter']} ({summary['step']} steps on {summary['questions']} questions)")


if __name__ == "__main__":
    cli_main(main)
