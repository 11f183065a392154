"""Our DPO loss against TRL's own computation on the same log-probs (trl is a test dependency).

TRL keeps its loss inside DPOTrainer._compute_loss, so we run that method on a minimal stand-in
trainer whose model returns per-token log-probs we choose; their sums are our log-probs.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo.loss import dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl(policy_tok, ref_logps, mask, beta, loss_type):
    """Run TRL's _compute_loss; policy_tok: [2B, T] per-token log-probs (chosen rows first)."""
    n, t = policy_tok.shape
    out = SimpleNamespace(
        log_probs=policy_tok,
        entropy=torch.zeros(n, t),
        mean_logits=torch.zeros(n, t),
        is_top1=torch.zeros(n, t, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    stub = SimpleNamespace(
        model=model, accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, t + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, t + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(n, 1, dtype=torch.long), mask], dim=1),
        "ref_chosen_logps": ref_logps[0],
        "ref_rejected_logps": ref_logps[1],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 9
    mask = (torch.rand(2 * b, t, generator=g) > 0.3).long()
    tok = -torch.rand(2 * b, t, generator=g) * 3 * mask  # zero outside the answer
    ref = (-torch.rand(b, generator=g) * 10, -torch.rand(b, generator=g) * 10)
    trl_loss, trl_metrics = _trl(tok, ref, mask, beta, loss_type)

    logps = tok.sum(1)
    lengths = mask.sum(1).float()
    ours = dpo_loss(logps[:b], logps[b:], ref[0], ref[1], beta, loss_type, lengths[:b], lengths[b:])
    torch.testing.assert_close(ours.losses.mean(), trl_loss, atol=1e-6, rtol=0)
    m = ours.metrics()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert m[key] == pytest.approx(trl_metrics[key], abs=1e-6), key


def test_loss_prefers_chosen():
    z = torch.zeros(2)
    good = dpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-5.0, -5.0]), z - 3, z - 3, beta=0.5)
    bad = dpo_loss(torch.tensor([-5.0, -5.0]), torch.tensor([-1.0, -1.0]), z - 3, z - 3, beta=0.5)
    assert good.losses.mean() < bad.losses.mean()
    assert good.metrics()["rewards/accuracies"] == 1.0 and bad.metrics()["rewards/margins"] < 0
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, loss_type="ipo")
