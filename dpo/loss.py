"""DPO losses as plain functions of summed answer log-probs (policy and reference).

Matches TRL's DPOTrainer (sigmoid, hinge, IPO; IPO on per-token-averaged log-ratios as TRL does,
which keeps beta comparable across answer lengths) and is tested against its DPOTrainer to a relative 1e-5. Written out
here because TRL keeps the loss inside its trainer's forward, which we replace: our forward puts
a different image on the rejected side.

``sft`` is TRL's loss type of that name: the token-mean NLL of the chosen answers over the batch,
with no rejected side and no reference. It is the control that tells what the preference does
beyond supervised tuning on the same chosen answers.

mDPO's two extra terms (``conditional_preference_loss``, ``anchored_loss``; ``mdpo_loss`` sums
them with sigmoid DPO) are functions of the same summed log-probs plus the chosen answer's under
a corrupted image. TRL has no mDPO: its nearest pieces are the sigmoid loss (which the conditional
term is, with the corrupted-image chosen answer as the rejected side) and the chosen half of
``bco_pair`` (the anchored term at delta = 0); tests/test_dpo_loss.py checks both against TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft")


@dataclass
class DpoOutput:
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] beta * (log pi - log ref) on the chosen answer, detached
    rejected_rewards: torch.Tensor  # [B] same on the rejected answer, detached

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The per-step numbers TRL logs: rewards/chosen|rejected|accuracies|margins."""
        c, r = self.chosen_rewards, self.rejected_rewards
        return {
            f"{prefix}rewards/chosen": c.mean().item(),
            f"{prefix}rewards/rejected": r.mean().item(),
            f"{prefix}rewards/accuracies": (c > r).float().mean().item(),
            f"{prefix}rewards/margins": (c - r).mean().item(),
        }


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of the chosen answers, pooled over the batch (TRL: every answer token weighs
    the same, so a long answer counts more than a short one)."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DpoOutput:
    """Per-pair loss. ``*_lengths`` (answer token counts) are needed for IPO and SFT; SFT's loss
    is the batch's one value on every pair (as TRL), and its rewards still say how far the policy
    moved from the reference on each side."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths")
        ipo_delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "sft":
        if chosen_lengths is None:
            raise ValueError("sft needs chosen_lengths")
        losses = sft_loss(chosen_logps, chosen_lengths).expand_as(chosen_logps)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    return DpoOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def anchored_loss(chosen_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, beta: float = 0.1,
                  delta: float = 0.0) -> torch.Tensor:
    """mDPO's anchored preference term (Wang et al., EMNLP 2024), per pair:

        L_AncPO = -log sigmoid(beta * (log pi(y_w|m_w, x) - log ref(y_w|m_w, x)) - delta)

    It keeps the chosen answer's reward above ``delta`` (0 in the paper and its code), so the
    preference cannot be won by lowering the chosen answer's likelihood along with the rejected one.
    """
    return -F.logsigmoid(beta * (chosen_logps - ref_chosen_logps) - delta)


def conditional_preference_loss(chosen_logps: torch.Tensor, corrupted_chosen_logps: torch.Tensor,
                                ref_chosen_logps: torch.Tensor, ref_corrupted_chosen_logps: torch.Tensor,
                                beta: float = 0.1) -> torch.Tensor:
    """mDPO's conditional preference term (Wang et al., EMNLP 2024), per pair:

        L_CoPO = -log sigmoid(beta * log [pi(y_w|m_w, x) / ref(y_w|m_w, x)]
                              - beta * log [pi(y_w|m_l, x) / ref(y_w|m_l, x)])

    The same chosen answer y_w on both sides; the preferred image m_w is the real one and the
    dispreferred m_l a corrupted one (train_dpo: seeded pure noise), so only the image can decide the preference.
    It is the sigmoid DPO loss with the corrupted-image chosen answer as the rejected side.
    """
    return dpo_loss(chosen_logps, corrupted_chosen_logps, ref_chosen_logps, ref_corrupted_chosen_logps,
                    beta, "sigmoid").losses


@dataclass
class MdpoOutput(DpoOutput):
    corrupted_rewards: torch.Tensor  # [B] beta * (log pi - log ref) on the chosen answer with m_l, detached

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """TRL's reward metrics plus the image-conditional ones the mDPO code logs."""
        c, i = self.chosen_rewards, self.corrupted_rewards
        return {**super().metrics(prefix), f"{prefix}rewards/corrupted": i.mean().item(),
                f"{prefix}rewards/corrupted_accuracies": (c > i).float().mean().item(),
                f"{prefix}rewards/corrupted_margins": (c - i).mean().item()}


def mdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    corrupted_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    ref_corrupted_chosen_logps: torch.Tensor,
    beta: float = 0.1,
    delta: float = 0.0,
) -> MdpoOutput:
    """mDPO's objective (Wang et al., EMNLP 2024), per pair, unweighted as in the paper and its code:

        L_mDPO = L_DPO (sigmoid) + L_CoPO + L_AncPO

    ``corrupted_chosen_logps``: the chosen answer's summed log-probs with the corrupted image m_l.
    """
    dpo = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, "sigmoid")
    losses = (dpo.losses
              + conditional_preference_loss(chosen_logps, corrupted_chosen_logps, ref_chosen_logps,
                                            ref_corrupted_chosen_logps, beta)
              + anchored_loss(chosen_logps, ref_chosen_logps, beta, delta))
    return MdpoOutput(losses, dpo.chosen_rewards, dpo.rejected_rewards,
                      beta * (corrupted_chosen_logps - ref_corrupted_chosen_logps).detach())
