"""Our DPO loss against TRL's DPOTrainer (trl is a test dependency), through TRL's public API only.

A real DPOTrainer (public constructor, DPOConfig, ``evaluate()``) scores preference pairs with a tiny
random causal LM against a second one as reference; we sum the answer-token log-probs of the same
models ourselves and feed them to ``dpo_loss``. Nothing reaches into TRL's private methods or
attributes, so a TRL upgrade that keeps its public interface cannot break the test's set-up.
"""

import copy
from types import SimpleNamespace

import pytest
import tokenizers
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import math

from dpo.loss import anchored_loss, conditional_preference_loss, dpo_loss, mdpo_loss, sft_loss

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = [f"w{i}" for i in range(20)]
N_PAIRS = 6
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _tokenizer() -> PreTrainedTokenizerFast:
    """One token a word, no special tokens added: prompt and answer token boundaries are exact."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _lm(seed: int, vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer Llama; a wide init makes policy and reference disagree by a few nats an answer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _pairs() -> list[dict[str, str]]:
    """Prompts of 3-5 words; answers of 1-5 words plus EOS (given, so TRL adds none), of unequal lengths."""
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    return [{"prompt": text(3 + i % 3), "chosen": f" {text(1 + i % 4)} </s>",
             "rejected": f" {text(1 + 3 * i % 5)} </s>"} for i in range(N_PAIRS)]


@torch.no_grad()
def _answer_logp(model, tok, prompt: str, answer: str) -> tuple[float, int]:
    """Sum of the answer tokens' log-probs given the prompt (one unpadded sequence), and their count."""
    n_prompt = len(tok(prompt)["input_ids"])
    ids = torch.tensor(tok(prompt + answer)["input_ids"])
    logp = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    return logp[n_prompt - 1:].sum().item(), len(ids) - n_prompt


@pytest.fixture(scope="module")
def setting():
    """Tokenizer, policy, reference, pairs, and our [B] answer log-probs and lengths for each model and side."""
    tok = _tokenizer()
    # Reference seed 12: the pairs' log-ratio margins (11.5, 0.8, 6.3, -7.1, -9.9, -1.4) put some
    # hinge terms past the clip at both betas and some not, and half the pairs on each side of zero.
    policy, ref = _lm(0, len(tok)), _lm(12, len(tok))
    pairs = _pairs()
    logps, lengths = {}, {}
    for name, model in (("policy", policy), ("ref", ref)):
        for side in ("chosen", "rejected"):
            lp, n = zip(*(_answer_logp(model, tok, p["prompt"], p[side]) for p in pairs))
            logps[name, side], lengths[side] = torch.tensor(lp), torch.tensor(n, dtype=torch.float)
    return SimpleNamespace(tok=tok, policy=policy, ref=ref, pairs=pairs, logps=logps, lengths=lengths)


def _trl_eval(s, loss_type, beta, out_dir) -> dict[str, float]:
    """TRL's eval metrics for the pairs, in one batch so each metric is the plain mean over pairs."""
    args = trl.DPOConfig(output_dir=str(out_dir), loss_type=[loss_type], beta=beta,
                         per_device_eval_batch_size=N_PAIRS, max_length=None, bf16=False, use_cpu=True,
                         gradient_checkpointing=False, report_to="none", disable_tqdm=True)
    dataset = datasets.Dataset.from_list(s.pairs)
    # The trainer patches the forward of the models it is given: hand it copies.
    trainer = trl.DPOTrainer(model=copy.deepcopy(s.policy), ref_model=copy.deepcopy(s.ref), args=args,
                             train_dataset=dataset, eval_dataset=dataset, processing_class=copy.deepcopy(s.tok))
    return trainer.evaluate()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sft"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl(setting, loss_type, beta, tmp_path):
    trl_metrics = _trl_eval(setting, loss_type, beta, tmp_path)
    lp = setting.logps
    # Same tokens on both sides: TRL's mean answer log-probs are ours (else the comparison below is moot).
    for side in ("chosen", "rejected"):
        assert trl_metrics[f"eval_logps/{side}"] == pytest.approx(lp["policy", side].mean().item(), rel=1e-5), side
    ratio = {side: lp["policy", side] - lp["ref", side] for side in ("chosen", "rejected")}
    margin = beta * (ratio["chosen"] - ratio["rejected"])
    assert (margin > 1).any() and (margin < 1).any()  # the hinge is clipped for some pairs, not all

    ours = dpo_loss(lp["policy", "chosen"], lp["policy", "rejected"], lp["ref", "chosen"], lp["ref", "rejected"],
                    beta, loss_type, setting.lengths["chosen"], setting.lengths["rejected"])
    assert ours.losses.mean().item() == pytest.approx(trl_metrics["eval_loss"], rel=1e-5, abs=1e-6)
    m = ours.metrics()
    for key in REWARD_KEYS:
        assert m[key] == pytest.approx(trl_metrics[f"eval_{key}"], rel=1e-5, abs=1e-6), key


def test_loss_prefers_chosen():
    z = torch.zeros(2)
    good = dpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-5.0, -5.0]), z - 3, z - 3, beta=0.5)
    bad = dpo_loss(torch.tensor([-5.0, -5.0]), torch.tensor([-1.0, -1.0]), z - 3, z - 3, beta=0.5)
    assert good.losses.mean() < bad.losses.mean()
    assert good.metrics()["rewards/accuracies"] == 1.0 and bad.metrics()["rewards/margins"] < 0
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, loss_type="ipo")


def test_sft_is_the_token_mean_nll_of_the_chosen_answers():
    chosen, lengths = torch.tensor([-2.0, -6.0, -1.0]), torch.tensor([2.0, 4.0, 1.0])
    assert sft_loss(chosen, lengths).item() == pytest.approx(9.0 / 7.0)  # pooled tokens, not a mean of means
    rejected = torch.tensor([-0.5, -9.0, -3.0])
    ref_c, ref_r = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-4.0, -4.0, -4.0])
    out = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, loss_type="sft", chosen_lengths=lengths)
    torch.testing.assert_close(out.losses, torch.full((3,), 9.0 / 7.0))  # one value on every pair, as TRL
    other = dpo_loss(chosen, rejected - 5, ref_c + 3, ref_r - 2, beta=0.5, loss_type="sft", chosen_lengths=lengths)
    torch.testing.assert_close(other.losses, out.losses)  # no rejected side, no reference in the loss
    torch.testing.assert_close(out.chosen_rewards, 0.5 * (chosen - ref_c))  # rewards still measured
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(chosen, rejected, ref_c, ref_r, loss_type="sft")


def _nls(x: float) -> float:
    """-log sigmoid(x), written out: log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_mdpo_terms_are_the_papers_formulas_on_hand_made_numbers():
    # mDPO (Wang et al., EMNLP 2024), beta = 0.5, two pairs:
    #   L_DPO   = -log sig(beta*[(log pi(y_w|m_w) - log ref(y_w|m_w)) - (log pi(y_l|m_w) - log ref(y_l|m_w))])
    #   L_CoPO  = -log sig(beta*[(log pi(y_w|m_w) - log ref(y_w|m_w)) - (log pi(y_w|m_l) - log ref(y_w|m_l))])
    #   L_AncPO = -log sig(beta*(log pi(y_w|m_w) - log ref(y_w|m_w)) - delta)
    c, r, i = torch.tensor([-2.0, -6.0]), torch.tensor([-5.0, -4.0]), torch.tensor([-4.0, -5.0])
    ref_c, ref_r, ref_i = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([-3.5, -5.5])
    # chosen ratios (1, -1), rejected ratios (-1, 0.5), corrupted ratios (-0.5, 0.5)
    copo = [_nls(0.5 * (1 - -0.5)), _nls(0.5 * (-1 - 0.5))]
    anc = [_nls(0.5 * 1), _nls(0.5 * -1)]
    dpo = [_nls(0.5 * (1 - -1)), _nls(0.5 * (-1 - 0.5))]
    torch.testing.assert_close(conditional_preference_loss(c, i, ref_c, ref_i, beta=0.5), torch.tensor(copo))
    torch.testing.assert_close(anchored_loss(c, ref_c, beta=0.5), torch.tensor(anc))
    torch.testing.assert_close(anchored_loss(c, ref_c, beta=0.5, delta=1.0), torch.tensor([_nls(-0.5), _nls(-1.5)]))
    out = mdpo_loss(c, r, i, ref_c, ref_r, ref_i, beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([d + p + a for d, p, a in zip(dpo, copo, anc)]))
    m = out.metrics()
    assert m["rewards/corrupted"] == pytest.approx(0.0)  # 0.5 * mean(-0.5, 0.5)
    # chosen rewards (0.5, -0.5) against corrupted (-0.25, 0.25): margins (0.75, -0.75)
    assert m["rewards/corrupted_accuracies"] == 0.5 and m["rewards/corrupted_margins"] == pytest.approx(0.0)
    assert m["rewards/accuracies"] == 0.5  # the DPO metrics are still there


def test_conditional_term_asks_for_the_real_image_and_anchor_for_a_rising_chosen_answer():
    z = torch.zeros(1)
    looks = conditional_preference_loss(z, z - 4, z, z)  # the chosen answer lost likelihood under x_v*
    blind = conditional_preference_loss(z, z, z, z)  # same likelihood with either image
    assert looks < blind
    assert anchored_loss(z + 2, z) < anchored_loss(z - 2, z)


def test_mdpo_pieces_match_trl_where_trl_has_them(setting, tmp_path):
    """TRL 1.16 has no mDPO loss type (and no rpo_alpha any more; ``use_weighting`` is WPO). The
    anchored term at delta = 0 is the chosen half of its ``bco_pair`` loss,
        -log sig(beta * chosen_ratio) - log sig(-beta * rejected_ratio),
    and the conditional term is its ``sigmoid`` loss on (y_w | x_v) vs (y_w | x_v*), which
    test_matches_trl covers through dpo_loss."""
    beta = 0.5
    trl_metrics = _trl_eval(setting, "bco_pair", beta, tmp_path)
    lp = setting.logps
    ours = (anchored_loss(lp["policy", "chosen"], lp["ref", "chosen"], beta)
            - torch.nn.functional.logsigmoid(-beta * (lp["policy", "rejected"] - lp["ref", "rejected"])))
    assert ours.mean().item() == pytest.approx(trl_metrics["eval_loss"], rel=1e-5, abs=1e-6)
