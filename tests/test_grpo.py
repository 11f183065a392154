"""GRPO's group advantages against the paper's formula and TRL's computation; the yes/no and copy rewards."""

import math

import pytest
import torch

from dpo.grpo import copy_penalty, group_advantages, yes_no_reward

trl_utils = pytest.importorskip("trl.trainer.utils")


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
