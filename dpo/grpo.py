"""GRPO's pieces for yes/no VQA with retrieval: group-relative advantages, two rewards and the loss.

GRPO (Shao et al. 2024, DeepSeekMath) samples G answers per question and scores each against
its own group instead of a learned value function. TRL's GRPOTrainer computes the advantages
inline (``GRPOTrainer._generate_and_score_completions``, trl 1.16), not as a function we could
call, and trl is a test-only dependency here, so ``group_advantages`` is written out to match it
line for line (tests/test_grpo.py compares them on the same numbers).

The rewards follow TRL's reward-function convention (keyword lists, ``**kwargs`` ignored, None
for an answer that cannot be scored), so they can be handed to GRPOTrainer as they are:
- ``yes_no_reward``: the verifiable reward of Med-R1 / MedVLM-R1 style tuning, 1 when the
  answer's leading yes/no is the gold one (``data.answers.yes_no``, the project's one parser);
- ``copy_penalty``: ours, the copy signal of the pair builder's D_cm as a reward: minus
  ``penalty`` when the answer with the noised image x_v* and the same references says the same
  yes/no as the answer with the real image (the answer did not need the image).

``grpo_loss`` is TRL's per-token objective with TRL 1.16's defaults, a function of per-token
log-probs (tests/test_grpo.py runs TRL's own ``GRPOTrainer._compute_loss`` on the same numbers);
``by_answer`` lays the scorer's flat answer tokens out as TRL's [answers, tokens] grid.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from data.answers import yes_no

Scale = Literal["group", "batch", "none"]
EPS = 1e-4  # TRL's: advantages = (r - group mean) / (std + 1e-4)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs, NaN below two values (trl.trainer.utils.nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Scale = "group") -> torch.Tensor:
    """Group-relative advantages of GRPO (DeepSeekMath, outcome supervision), as TRL computes them:

        A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)

    ``rewards``: [B * G], the G answers of each question adjacent. ``scale``: ``group`` divides by
    the group's std (unbiased), ``batch`` by the whole batch's std (PPO-Lite), ``none`` not at all
    (Dr. GRPO); the mean is always the group's. A NaN reward (an answer no reward could score) is
    left out of the mean and std and gets advantage 0. A group whose answers all score the same
    gets advantage 0: it says nothing about which answer is better.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * G] with G = {group_size}; got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        std = (nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1
               else torch.zeros_like(rewards))
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; choose group, batch or none")
    if scale != "none":
        advantages = advantages / (std + EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def yes_no_reward(completions: Sequence[str], answer: Sequence[str], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's leading yes/no equals the gold answer's, else 0.0 (an answer
    without a yes or no is wrong); None when the gold answer itself has no yes/no."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions for {len(answer)} gold answers")
    out: list[float | None] = []
    for text, gold in zip(completions, answer):
        g = yes_no(gold)
        out.append(None if g == "other" else float(yes_no(text) == g))
    return out


def copy_penalty(completions: Sequence[str], noised_completions: Sequence[str], penalty: float = 0.5,
                 **kwargs: Any) -> list[float]:
    """-``penalty`` for each answer whose yes/no is unchanged when the image is replaced by x_v*
    (``noised_completions[i]``: the answer to the same prompt, references included, with x_v*), else 0.

    Only a yes or no on both sides counts as copied, as the case gallery's copy test reads it;
    an answer without one is the yes/no reward's to punish.
    """
    if len(completions) != len(noised_completions):
        raise ValueError(f"{len(completions)} completions for {len(noised_completions)} noised-image answers")
    out = []
    for real, noised in zip(completions, noised_completions):
        label = yes_no(real)
        out.append(-penalty if label != "other" and label == yes_no(noised) else 0.0)
    return out


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.0,
    epsilon: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped objective, as TRL 1.16's GRPOTrainer computes it with its defaults
    (``loss_type`` dapo, token-level ratios, ``use_bias_correction_kl``, one epsilon both sides):

        ratio_t = exp(logp_t - old_logp_t)
        loss_t  = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A) + beta ratio_t KL_t
        KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator, >= 0)
        loss    = sum of loss_t over every answer token / number of answer tokens   (DAPO)

    ``logps``, ``old_logps`` (the policy that sampled the answers), ``ref_logps`` (None with
    ``beta`` 0), ``mask``: [answers, tokens]; ``advantages``: [answers]. DAPO's mean over the
    batch's tokens, not per answer first, so a long answer does not weigh less per token.
    Metrics as TRL logs them: ``kl`` (with beta: the mean of ratio_t KL_t, 1 x KL_t on fresh
    answers) and ``clip_ratio/region_mean``, the share of tokens whose ratio the clip holds (low
    side with A < 0, high side with A > 0).
    """
    mask = mask.to(logps.dtype)
    tokens = mask.sum().clamp(min=1.0)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        delta = ref_logps - logps
        kl = ratio * (torch.exp(delta) - delta - 1)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).item()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    metrics["clip_ratio/region_mean"] = ((clipped * mask).sum() / tokens).item()
    return (per_token * mask).sum() / tokens, metrics


def by_answer(values: torch.Tensor, slot: torch.Tensor, answers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of several answers (``policy.policy.token_logps``: value, answer slot) as a
    zero-padded [answers, tokens] grid, each answer's tokens in order, and its 0/1 mask."""
    order = torch.argsort(slot, stable=True)
    counts = torch.bincount(slot, minlength=answers).tolist()
    grid = pad_sequence(list(values[order].split(counts)), batch_first=True)
    mask = pad_sequence([torch.ones(n, device=values.device) for n in counts], batch_first=True)
    return grid, mask
