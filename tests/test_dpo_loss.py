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

from dpo.loss import dpo_loss, sft_loss

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
