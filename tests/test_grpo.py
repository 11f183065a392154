"""GRPO's group advantages and loss against the paper's formulas and TRL's computation; the yes/no
and copy rewards; the trainer (dpo.train_grpo) on a tiny chain: questions, settings, a short run."""

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.config import ConfigError
from common.engine import EngineConfig, LoraConfig
from dpo.grpo import by_answer, copy_penalty, group_advantages, grpo_loss, nanstd, yes_no_reward
from common.engine import apply_lora, build_accelerator
from dpo.train_grpo import GrpoConfig, GrpoTrainer, RepeatedBatches, check, read_questions, run
from pairs.build_pairs import PairsConfig
from pairs.build_pairs import run as build_pairs
from policy.policy import IGNORE, Policy, PolicySpec, load_policy, token_logps
from tests.test_train_dpo import fresh_accelerate  # noqa: F401 (autouse: each run builds its own Accelerator)

trl_utils = pytest.importorskip("trl.trainer.utils")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's lines, copied from trl/trainer/grpo_trainer.py (GRPOTrainer._generate_and_score_completions,
    lines 2763-2787 and 2810, multi_objective_aggregation="sum_then_normalize"), with its own nanstd."""
    nanstd = trl_utils.nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def test_nanstd_is_trls_with_unscored_answers_left_out():
    r = torch.tensor([[1.0, float("nan"), 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [float("nan"), 1.0, float("nan"), float("nan")]])
    torch.testing.assert_close(nanstd(r, dim=1), trl_utils.nanstd(r, dim=1), equal_nan=True)
    assert nanstd(r, dim=1)[0].item() == pytest.approx(math.sqrt(1 / 3)) and math.isnan(nanstd(r, dim=1)[2].item())
    torch.testing.assert_close(nanstd(r), trl_utils.nanstd(r))


def test_group_advantages_are_the_papers_formula_on_hand_made_rewards():
    # Two questions, G = 4. Group 1: rewards (1, 0, 0, 1): mean 0.5, unbiased std sqrt(1/3).
    # Group 2: all right (1, 1, 1, 1): std 0, so every advantage is 0.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # batch: the group's mean, the batch's std (mean 0.75 over 8, unbiased var = 8 * 0.1875 / 7)
    b = 1 / (math.sqrt(8 * 0.1875 / 7) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor([0.5 * b, -0.5 * b, -0.5 * b, 0.5 * b,
                                                                               0, 0, 0, 0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 3, 4])
def test_group_advantages_match_trl(scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (12,), generator=g).float() - 0.5 * torch.rand(12, generator=g)
    rewards[5] = float("nan")  # an unscorable answer: out of the mean and std, advantage 0
    rewards[8:8 + group_size] = 1.0  # a group (or more) that all scored the same
    ours = group_advantages(rewards, group_size, scale)
    torch.testing.assert_close(ours, _trl_advantages(rewards, group_size, scale), rtol=1e-6, atol=1e-6)
    assert ours[5] == 0 and torch.isfinite(ours).all()


def test_group_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="G = 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "rank")  # type: ignore[arg-type]


def test_yes_no_reward_reads_the_leading_yes_or_no():
    completions = ["Yes, there is an effusion.", "no", "There is no effusion.", "No.", "yes"]
    gold = ["yes", "Yes.", "no", "No, none.", "Cardiomegaly."]
    assert yes_no_reward(completions, gold) == [1.0, 0.0, 0.0, 1.0, None]
    assert yes_no_reward(completions=["yes"], answer=["yes"], prompts=["p"], trainer_state=None) == [1.0]  # TRL's call


def test_copy_penalty_punishes_an_answer_that_survives_the_noised_image():
    real = ["Yes.", "No, none.", "yes", "Maybe.", "no"]
    noised = ["yes, there is", "Yes.", "Yes", "Maybe.", "I cannot tell"]
    assert copy_penalty(real, noised, penalty=0.3) == [-0.3, 0.0, -0.3, 0.0, 0.0]
    with pytest.raises(ValueError):
        copy_penalty(real, noised[:2])


def _trl_loss(logps, old, ref, advantages, mask, beta, epsilon):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` with its defaults (loss_type dapo, token-level
    ratios, use_bias_correction_kl) on the given per-token log-probs, one process, no accumulation;
    ``self`` is a stand-in holding the attributes it reads, the model forward returns ``logps``."""
    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1)
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type="dapo", epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=accelerator,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_is_trls_on_the_same_numbers(beta):
    """Value, gradient and the logged KL and clip share of TRL's computation, on ratios inside and
    outside the clip range, positive and negative advantages, answers of different lengths."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g) * 3
    logps = (old + 0.4 * torch.randn(4, 5, generator=g)).requires_grad_()  # ratios from ~0.5 to ~2
    ref = old + 0.3 * torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    advantages = torch.tensor([1.2, -0.7, 0.5, -1.5])
    want, metrics = _trl_loss(logps, old, ref, advantages, mask, beta, 0.2)
    (want_grad,) = torch.autograd.grad(want, logps)
    got, ours = grpo_loss(logps, old, ref if beta else None, advantages, mask, beta, 0.2)
    (got_grad,) = torch.autograd.grad(got, logps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    assert ours["clip_ratio/region_mean"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-7)
    assert ours["clip_ratio/region_mean"] > 0
    assert ("kl" in ours) == bool(beta) and ours.get("kl", 0.0) == pytest.approx(metrics.get("kl", [0.0])[0], abs=1e-7)


def test_grpo_loss_by_hand_on_the_policy_that_sampled():
    """At ratio 1 (the first step on fresh answers) nothing is clipped; the loss is -mean A over the
    tokens plus beta x the k3 KL, and its gradient per token is -A / tokens (+ the KL's)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([0.6, -0.9])
    loss, metrics = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1 at the one token where they differ
    assert loss.item() == pytest.approx((-(0.6 + 0.6 - 0.9) + 0.1 * k3) / 3, abs=1e-6)
    assert metrics == {"kl": pytest.approx(k3 / 3, abs=1e-6), "clip_ratio/region_mean": 0.0}
    loss.backward()
    # d/dlogp of [ratio (k3)] at ratio 1 = k3 + (1 - exp(ref - logp)) = exp(-0.5) - 0.5 + ... at token (0, 0)
    kl_grad = 0.1 * ((math.exp(-0.5) + 0.5 - 1) + (1 - math.exp(-0.5))) / 3
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.2 + kl_grad, -0.2], [0.3, 0.0]]), rtol=0, atol=1e-6)


def test_by_answer_lays_flat_tokens_out_per_answer():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    slot = torch.tensor([0, 0, 2, 2, 2, 1])  # answer 1's token comes last (another row)
    grid, mask = by_answer(values, slot, 3)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 2.0, 0.0], [6.0, 0.0, 0.0], [3.0, 4.0, 5.0]]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))


def test_copy_penalty_paired_i_to_i_is_the_noised_probability_in_expectation():
    """Answer i's penalty compares it with noised sample i, drawn from P_noised: over the noised
    draws, the reward of an answer a is r(a) - penalty x P_noised(yes/no of a), a different value
    per answer, so it reorders the group. A penalty that is one constant per question (e.g. "the
    greedy answers with x_v and x_v* agree") changes no advantage under group scaling: it shifts
    the group's mean and leaves its std."""
    real, gold = ["Yes.", "yes, there is", "No.", "No, none."], ["yes"] * 4
    p_noised = {"Yes.": 0.7, "No.": 0.3}
    expected = torch.zeros(4)
    for draw in itertools.product(p_noised, repeat=4):
        weight = math.prod(p_noised[d] for d in draw)
        rewards = torch.tensor(yes_no_reward(real, gold)) + torch.tensor(copy_penalty(real, list(draw), 0.5))
        expected += weight * rewards
    torch.testing.assert_close(expected, torch.tensor([1 - 0.5 * 0.7, 1 - 0.5 * 0.7, -0.5 * 0.3, -0.5 * 0.3]))
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    constant = torch.tensor([-0.5] * 4 + [0.0] * 4)
    for scale in ("group", "none"):
        torch.testing.assert_close(group_advantages(rewards + constant, 4, scale), group_advantages(rewards, 4, scale))
    # paired i to i: the copied right answers now score below the right answer that looked
    paired = torch.tensor([1.0, 1.0, 0.0, 0.0]) + torch.tensor(copy_penalty(real[:2] + ["No.", "No."],
                                                                            ["yes", "no", "yes", "no"], 0.5))
    assert paired.tolist() == [0.5, 1.0, 0.0, -0.5]
    assert group_advantages(paired, 4)[1] > group_advantages(paired, 4)[0]


# ---------------------------------------------------------------- the trainer on a tiny chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny world, oracle retrieval of its alignment questions, a tiny random policy and the pair
    builder's run on them, one image broken first (the pair builder skips its record); the prompts
    the pair builder's answer a saw are recorded."""
    from data.manifest import manifest_files
    from data.readers import read_records
    from toy.make_toy import make_world
    from toy.oracle_retrieval import ToyRetrievalConfig, write_oracle_retrieval
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

    root = tmp_path_factory.mktemp("grpo")
    world = make_world(root / "world", size="tiny", progress=False)
    index = write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(root / "retrieval"),
                                                      roles=["alignment_vqa"]))
    first = read_records(manifest_files(world, role="alignment_vqa", domain="pathology")[0]["path"])[0]
    broken = world / "pathology" / "images" / first.images[0]
    broken.write_bytes(broken.read_bytes()[:40])
    cfg = ToyPolicyConfig(vocab_size=500, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                          text_heads=2, vision_heads=2)
    policy = build_toy_policy(world_texts(world), root / "policy", cfg)
    seen: list = []
    generate = Policy.generate

    def recording(self, images, prompts, *args, **kw):
        seen.extend(prompts)
        return generate(self, images, prompts, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Policy, "generate", recording)
        build_pairs(PairsConfig(policy=PolicySpec(path=str(policy)), retrieval_index=str(index), roles=["alignment_vqa"],
                                out=str(root / "pairs"), limit=3, batch_size=4, max_new_tokens_vqa=4, progress=False))
    return {"root": root, "policy": policy, "pairs": root / "pairs", "seen": seen}


def _config(chain, out: Path, **over) -> GrpoConfig:
    engine = dict(output_dir=str(out), batch_size=4, lr=1e-3, warmup_ratio=0.0, max_steps=3, log_every=1,
                  progress=False, seed=0)
    engine.update(over.pop("train", {}))
    base = dict(policy=PolicySpec(path=str(chain["policy"])), pairs_dir=str(chain["pairs"]), max_new_tokens=4,
                lora=LoraConfig(r=4, alpha=8, dropout=0.0), train=EngineConfig(**engine))
    return GrpoConfig(**{**base, **over})


def test_questions_are_the_pair_builders_rag_prompts(chain):
    """Every answered VQA record, with the very prompt its answer a was generated from (the
    pair builder asks a and b with one prompt, c without references); the skipped one is named."""
    skipped: list[str] = []
    questions = read_questions(chain["pairs"], 4, skipped)
    rows = [json.loads(line) for line in (chain["pairs"] / "generations.jsonl").read_text().splitlines()]
    broken = [r for r in rows if "skipped" in r]  # the broken image's study: its questions
    assert len(questions) == len(rows) - len(broken) and broken
    assert len(skipped) == len(broken) and all("skipped it (unreadable)" in s for s in skipped)
    for q, row in zip(questions, (r for r in rows if "skipped" not in r)):
        assert q.key == row["key"] and q.noised_image == str(chain["pairs"] / row["rejected_image"])
        assert q.prompt in chain["seen"] and row["references"]
        assert all(ref in q.prompt[0]["content"][1]["text"] for ref in row["references"])
    with pytest.raises(Exception, match="fitted for 4 new tokens"):
        read_questions(chain["pairs"], 5, [])


def test_repeated_batches_give_each_window_its_repeats():
    order = list(RepeatedBatches(10, 2, 3, seed=0, processes=2))
    assert len(order) == 8 * 3 and order[:4] == order[4:8] == order[8:12] and order[:4] != order[12:16]
    assert sorted(set(order)) == sorted(set(order[:4]) | set(order[12:16]))


@pytest.mark.parametrize("setting, message", [
    ({"group_size": 1}, "group_size"), ({"temperature": 0.0}, "temperature"), ({"beta": -0.1}, "beta"),
    ({"epsilon": 0.0}, "epsilon"), ({"copy_penalty": -1.0}, "copy_penalty"), ({"iterations": 0}, "iterations"),
    ({"iterations": 2, "train": {"grad_accum": 2}}, "grad_accum"), ({"lora": LoraConfig(enabled=False)}, "lora"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"pairs_dir": "/nonexistent"}, "pairs_dir"),
])
def test_bad_settings_are_refused(chain, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        check(_config(chain, tmp_path, **setting))


def test_grpo_with_copy_penalty_trains_an_adapter_and_logs_its_rewards(chain, tmp_path):
    """Three steps (the second reusing the first's answers, iterations 2), one stored x_v* removed:
    an adapter, the rewards, copy rate, KL and clip share per step, the bad image and record counted."""
    (chain["pairs"] / json.loads((chain["pairs"] / "generations.jsonl").read_text().splitlines()[0])["rejected_image"]
     ).rename(chain["root"] / "moved.png")
    try:
        summary = run(_config(chain, tmp_path / "run", copy_penalty=0.5, iterations=2))
    finally:
        (chain["root"] / "moved.png").rename(chain["pairs"] / json.loads(
            (chain["pairs"] / "generations.jsonl").read_text().splitlines()[0])["rejected_image"])
    out = tmp_path / "run"
    assert summary["step"] == 3 and (out / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "reward", "reward_std", "rewards/yes_no_reward/mean", "rewards/copy_penalty/mean", "copy_rate",
            "kl", "clip_ratio/region_mean", "completions/mean_length"}
    assert len(rows) == 3 and all(keys <= set(r) for r in rows)
    assert rows[0]["reward"] == rows[1]["reward"] and rows[0]["kl"] == 0.0  # one sampling, two steps; LoRA B starts at 0
    assert json.loads((out / "bad_records.json").read_text())["bad_records"]["count"] == 3  # the broken study
    assert json.loads((out / "bad_images.json").read_text())["skipped"] >= 1


def test_trainer_loss_is_grpo_loss_of_the_answers_scored_alone(chain, tmp_path, monkeypatch):
    """Sampling stubbed with fixed answers: the step's loss and metrics are ``grpo_loss`` of each
    real-image answer scored in a row of its own (the trainer puts a question's G answers in one
    row), its reward the yes/no one minus the penalty of its i-th x_v* answer, the reference the
    model with its adapter disabled."""
    real = ["Yes.", "No.", "No, none.", "yes there is"]
    noised = ["yes", "yes", "No", "maybe"]
    calls = []

    def fake_generate(self, images, prompts, *args, temperature=0.0, return_tokens=False, **kw):
        calls.append(temperature)
        texts = (real if len(calls) % 2 else noised) * (len(prompts) // 4)
        return (texts, self.answer_ids(texts)) if return_tokens else texts

    monkeypatch.setattr(Policy, "generate", fake_generate)
    cfg = _config(chain, tmp_path, copy_penalty=0.5, beta=0.1, temperature=0.7)
    policy = load_policy(chain["policy"])
    trainer = GrpoTrainer(cfg, build_accelerator(cfg.train), policy)
    model = apply_lora(policy.model, cfg.lora).train()
    with torch.no_grad():  # a LoRA that is not zero: the policy and the reference differ
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    batch = trainer.take({"index": [0, 1]})
    loss, metrics = trainer.loss(model, batch)
    assert calls == [0.7, 0.7] and trainer.share_prompt

    questions = [trainer.questions[i] for i in batch["index"]]
    rows = [policy.encode_for_training([q.prompt], [a], [im]) for q, im in zip(questions, batch["image"]) for a in real]
    with torch.no_grad():
        pol = [token_logps(model, r)[0] for r in rows]
        with model.disable_adapter():
            ref = [token_logps(model, r)[0] for r in rows]
    pad = torch.nn.utils.rnn.pad_sequence
    logps, ref_logps = pad(pol, batch_first=True), pad(ref, batch_first=True)
    mask = pad([torch.ones(len(x)) for x in pol], batch_first=True)
    gold = [q.answer for q in questions for _ in real]
    rewards = torch.tensor(yes_no_reward(real * 2, gold)) + torch.tensor(copy_penalty(real * 2, noised * 2, 0.5))
    advantages = group_advantages(rewards, 4)
    assert advantages.abs().min() > 0.1  # every answer moves
    want, want_metrics = grpo_loss(logps, logps, ref_logps, advantages, mask, 0.1, 0.2)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert metrics["kl"] == pytest.approx(want_metrics["kl"], rel=1e-4) and metrics["kl"] > 0
    assert metrics["copy_rate"] == 0.5 and metrics["reward"] == pytest.approx(rewards.mean().item())


def test_the_trainer_scores_the_tokens_it_sampled_not_their_text_tokenized_again(chain, tmp_path, monkeypatch):
    """A sampled answer whose tokens its decoded text would not give back (a word spelt in single
    bytes, an answer cut before EOS): the rollout's labels are those tokens, as sampled."""
    policy = load_policy(chain["policy"])
    tok = policy.tokenizer
    spelt = [tok.convert_tokens_to_ids(c) for c in "Yes"] + [tok.eos_token_id]  # "Y", "e", "s": not how "Yes" tokenizes
    cut = tok("No, there is", add_special_tokens=False).input_ids  # max_new_tokens reached: no EOS
    assert spelt[:-1] != tok("Yes", add_special_tokens=False).input_ids and tok.unk_token_id not in spelt
    sampled = [spelt, cut, spelt, cut]

    def fake_generate(self, images, prompts, *args, return_tokens=False, **kw):
        tokens = sampled * (len(prompts) // 4)
        texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        return (texts, tokens) if return_tokens else texts

    monkeypatch.setattr(Policy, "generate", fake_generate)
    cfg = _config(chain, tmp_path, group_size=4)
    trainer = GrpoTrainer(cfg, build_accelerator(cfg.train), policy)
    rollout = trainer.sample(apply_lora(policy.model, cfg.lora), trainer.take({"index": [0, 1]}))
    labels = rollout.inputs["labels"]
    index = rollout.inputs.get("answer_index")
    scored = ([labels[index == k].tolist() for k in range(8)] if index is not None
              else [row[row != IGNORE].tolist() for row in labels])
    assert scored == sampled * 2
