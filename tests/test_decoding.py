"""VCD and DoLa on given logits (the contrast, DoLa's choice of layer and the plausibility cut by hand)
and on a tiny toy policy."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from data.noise import NoiseConfig, make_x_v_star
from policy.decoding import (DolaLogitsProcessor, VcdLogitsProcessor, dola_candidate_layers, dola_generate,
                             dola_logits, final_norm_and_head, js_divergence, vcd_generate, vcd_logits)
from policy.policy import load_policy
from policy.prompts import DEFAULT_PROMPTS
from tests.test_policy import _images, _prompts, _texts
from toy.toy_policy import ToyPolicyConfig, build_toy_policy

INF = float("inf")


def test_contrast_and_cut_on_hand_made_logits():
    real = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    distorted = torch.tensor([[2.5, 0.0, 0.0, -5.0]])
    # p_real ~ (0.66, 0.24, 0.09, 0.003); beta 0.1 cuts where logit < log(0.1) + 2 = -0.303: only token 3.
    # alpha 1: 2 * real - distorted = (1.5, 2.0, 0.0, -1.0) -> token 3 to -inf; token 1 now wins.
    torch.testing.assert_close(vcd_logits(real, distorted, alpha=1.0, beta=0.1), torch.tensor([[1.5, 2.0, 0.0, -INF]]))
    # beta 0.2: cutoff log(0.2) + 2 = 0.391 also removes token 2 (p 0.09 < 0.2 * 0.66)
    torch.testing.assert_close(vcd_logits(real, distorted, alpha=1.0, beta=0.2), torch.tensor([[1.5, 2.0, -INF, -INF]]))
    # alpha 0: the real logits, cut
    torch.testing.assert_close(vcd_logits(real, distorted, alpha=0.0, beta=0.1), torch.tensor([[2.0, 1.0, 0.0, -INF]]))
    # alpha 0.5: 1.5 * real - 0.5 * distorted
    torch.testing.assert_close(vcd_logits(real, distorted, alpha=0.5, beta=0.1), torch.tensor([[1.75, 1.5, 0.0, -INF]]))


def test_cut_is_on_probabilities_under_the_real_image():
    real = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    beta = 0.05
    kept = torch.isfinite(vcd_logits(real, torch.zeros_like(real), alpha=1.0, beta=beta))
    p = real.softmax(-1)
    assert torch.equal(kept, p >= beta * p.max(-1, keepdim=True).values)
    assert kept.gather(1, real.argmax(-1, keepdim=True)).all()  # the real image's top token always survives
    assert 0 < kept.sum() < kept.numel()


def test_dola_contrast_on_hand_made_logits():
    """Two rows, one final-layer distribution p = (0.6, 0.35, 0.05), two candidate layers; logits are
    log-probabilities shifted by a constant (softmax ignores it)."""
    log = lambda *probs: torch.tensor(probs).log()  # noqa: E731
    final = torch.stack([log(0.6, 0.35, 0.05), log(0.6, 0.35, 0.05)]) + 1.0
    premature = torch.stack([torch.stack([log(0.7, 0.1, 0.2), log(0.5, 0.3, 0.2)]),     # layer a
                             torch.stack([log(0.3, 0.6, 0.1), log(0.3, 0.6, 0.1)])]) - 2.0  # layer b
    # JSD(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2:
    # row 0, a = (0.7, 0.1, 0.2): m = (0.65, 0.225, 0.125)
    #   KL(p || m) = 0.6 ln(0.6/0.65) + 0.35 ln(0.35/0.225) + 0.05 ln(0.05/0.125) = -0.0480 + 0.1546 - 0.0458 = 0.0608
    #   KL(a || m) = 0.7 ln(0.7/0.65) + 0.1 ln(0.1/0.225) + 0.2 ln(0.2/0.125)    =  0.0519 - 0.0811 + 0.0940 = 0.0648
    #   JSD = 0.0628
    # b = (0.3, 0.6, 0.1) (both rows): m = (0.45, 0.475, 0.075)
    #   KL(p || m) = 0.6 ln(0.6/0.45) + 0.35 ln(0.35/0.475) + 0.05 ln(0.05/0.075) = 0.1726 - 0.1069 - 0.0203 = 0.0454
    #   KL(b || m) = 0.3 ln(0.3/0.45) + 0.6 ln(0.6/0.475) + 0.1 ln(0.1/0.075)    = -0.1216 + 0.1402 + 0.0288 = 0.0473
    #   JSD = 0.0464
    # row 1, a = (0.5, 0.3, 0.2): m = (0.55, 0.325, 0.125)
    #   KL(p || m) = 0.6 ln(0.6/0.55) + 0.35 ln(0.35/0.325) + 0.05 ln(0.05/0.125) = 0.0522 + 0.0259 - 0.0458 = 0.0323
    #   KL(a || m) = 0.5 ln(0.5/0.55) + 0.3 ln(0.3/0.325) + 0.2 ln(0.2/0.125)    = -0.0477 - 0.0240 + 0.0940 = 0.0223
    #   JSD = 0.0273
    torch.testing.assert_close(js_divergence(final, premature), torch.tensor([[0.0628, 0.0273], [0.0464, 0.0464]]),
                               atol=1e-4, rtol=0)
    # Row 0 takes layer a (0.0628 > 0.0464), row 1 layer b (0.0464 > 0.0273). (The batch mean transformers
    # used, a 0.0450 < b 0.0464, would have given row 0 layer b too.)
    # Contrast ln p - ln q: row 0 (ln 0.6/0.7, ln 0.35/0.1, ln 0.05/0.2) = (-0.154, 1.253, -1.386);
    # row 1 (ln 0.6/0.3, ln 0.35/0.6, ln 0.05/0.1) = (0.693, -0.539, -0.693).
    # The cut at 0.1 * 0.6 = 0.06 removes token 2 (p 0.05) in both rows; in row 0 token 1 now wins.
    expected = torch.tensor([[math.log(0.6 / 0.7), math.log(0.35 / 0.1), -INF],
                             [math.log(0.6 / 0.3), math.log(0.35 / 0.6), -INF]])
    torch.testing.assert_close(dola_logits(final, premature, relative_top=0.1), expected)
    # relative_top 0.6: the cut at 0.36 also removes token 1 (p 0.35); the top token stays
    expected[:, 1] = -INF
    torch.testing.assert_close(dola_logits(final, premature, relative_top=0.6), expected)


def test_dola_candidate_layers_follow_transformers_rule():
    # N <= 40: low = range(0, N // 2, 2), high = range(N // 2, N, 2); hidden state 0 is the embedding output
    assert dola_candidate_layers(32, "low") == [0, 2, 4, 6, 8, 10, 12, 14]
    assert dola_candidate_layers(32, "high") == [16, 18, 20, 22, 24, 26, 28, 30]
    # N > 40: low = range(0, 20, 2), high = range(N - 20, N, 2)
    assert dola_candidate_layers(48, "low") == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert dola_candidate_layers(48, "high") == [28, 30, 32, 34, 36, 38, 40, 42, 44, 46]
    # the toy's 3 layers: low = range(0, 1, 2) (the embeddings only), high = range(1, 3, 2)
    assert dola_candidate_layers(3, "low") == [0] and dola_candidate_layers(3, "high") == [1]
    assert dola_candidate_layers(2, "low") == [0] and dola_candidate_layers(2, "high") == [1]
    # one layer: range(0, 0, 2) is empty; transformers then took [start layer] = [0]
    assert dola_candidate_layers(1, "low") == [0] and dola_candidate_layers(1, "high") == [0]
    assert dola_candidate_layers(32, [4, 8]) == [4, 8]
    for bad in ([0, 32], [], "middle"):
        with pytest.raises(ValueError, match="DoLa layers"):
            dola_candidate_layers(32, bad)


def test_a_layout_without_a_final_norm_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))  # ln_f, not norm
    with pytest.raises(ValueError, match="no final norm"):
        final_norm_and_head(gpt2)


def _toy(tmp_path_factory, text_layers: int):
    cfg = ToyPolicyConfig(vocab_size=400, vision_width=64, vision_layers=2, text_width=64, text_layers=text_layers,
                          prompts=str(DEFAULT_PROMPTS))  # the wording _prompts writes
    pol = load_policy(build_toy_policy(_texts(), tmp_path_factory.mktemp("toy") / "policy", cfg))
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: answers then depend strongly on the image
        for p in pol.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return pol


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return _toy(tmp_path_factory, text_layers=2)


@pytest.fixture(scope="module")
def policy3(tmp_path_factory):
    """The toy's 3 text layers: DoLa then has 3 candidate layers (0, 1, 2) to choose from."""
    return _toy(tmp_path_factory, text_layers=3)


@torch.no_grad()
def _naive_vcd(policy, image, distorted, prompt, max_new_tokens, alpha, beta) -> str:
    """VCD by hand for one prompt: two full forward passes per step (no cache), argmax, append."""
    text = [policy.render(prompt)]
    real = policy.processor(images=[image], text=text, return_tensors="pt")
    dist = policy.processor(images=[distorted], text=text, return_tensors="pt")
    ids, eos = real["input_ids"], policy.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        lr = policy.model(input_ids=ids, pixel_values=real["pixel_values"]).logits[:, -1]
        ld = policy.model(input_ids=ids, pixel_values=dist["pixel_values"]).logits[:, -1]
        nxt = vcd_logits(lr, ld, alpha, beta).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    return policy.tokenizer.decode(ids[0, real["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_alpha_zero_is_plain_greedy(policy):
    images, prompts = _images(5), _prompts(5)
    greedy = policy.generate(images, prompts, max_new_tokens=8)
    assert vcd_generate(policy, images, _images(5, seed=7), prompts, max_new_tokens=8, alpha=0.0, batch_size=3) == greedy


def test_batched_vcd_equals_vcd_by_hand(policy):
    """The distorted branch's cache and left-padded positions: a batch of prompts of different
    lengths, with x_v* as the project makes it, gives row by row what two uncached forward passes per step give."""
    images, prompts = _images(4), _prompts(4)
    pool = {f"img{i}.png": im for i, im in enumerate(images + _images(4, seed=5))}  # the domain's images
    distorted = [make_x_v_star(f"img{i}.png", im, NoiseConfig(), pool, lambda x: x) for i, im in enumerate(images)]
    ours = vcd_generate(policy, images, distorted, prompts, max_new_tokens=8, alpha=1.0, beta=0.1, batch_size=4)
    by_hand = [_naive_vcd(policy, i, d, p, 8, 1.0, 0.1) for i, d, p in zip(images, distorted, prompts)]
    assert ours == by_hand
    assert ours != policy.generate(images, prompts, max_new_tokens=8)  # the contrast changed some answer


def test_a_distorted_encoding_of_other_tokens_is_refused(policy):
    enc = policy.processor(images=_images(2), text=[policy.render(p) for p in _prompts(2)], return_tensors="pt",
                           padding=True, padding_side="left")
    other = {**enc, "input_ids": enc["input_ids"].flip(0)}
    vcd = VcdLogitsProcessor(policy.model, other)
    with pytest.raises(ValueError, match="tokens differ"):
        vcd(enc["input_ids"], torch.zeros(2, len(policy.tokenizer)))


@torch.no_grad()
def _naive_dola(policy, image, prompt, max_new_tokens, layers, relative_top, penalty) -> tuple[str, list[int]]:
    """DoLa by hand for one prompt: a full forward pass per step (no cache) with every hidden state,
    the candidate layers read through the Llama text model's norm and the LM head, the repetition
    penalty on the contrast, argmax, append. Also the layer chosen at each step."""
    real = policy.processor(images=[image], text=[policy.render(prompt)], return_tensors="pt")
    norm, head = policy.model.model.language_model.norm, policy.model.lm_head
    ids, eos, chosen = real["input_ids"], policy.tokenizer.eos_token_id, []
    for _ in range(max_new_tokens):
        out = policy.model(input_ids=ids, pixel_values=real["pixel_values"], output_hidden_states=True)
        premature = torch.stack([head(norm(out.hidden_states[i][:, -1])) for i in layers])
        chosen.append(layers[js_divergence(out.logits[:, -1], premature).argmax().item()])
        scores = dola_logits(out.logits[:, -1], premature, relative_top)
        seen = scores[0, ids[0]]
        scores[0, ids[0]] = torch.where(seen < 0, seen * penalty, seen / penalty)
        nxt = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    text = policy.tokenizer.decode(ids[0, real["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, chosen


def test_batched_dola_equals_dola_by_hand(policy3):
    """The branch's cache, left-padded positions and hidden states, the layer chosen per row and the
    repetition penalty: a batch of prompts of different lengths gives row by row what uncached
    forward passes give by hand."""
    images, prompts = _images(6), _prompts(6)
    ours = dola_generate(policy3, images, prompts, max_new_tokens=8, layers=[0, 1, 2], batch_size=6)
    by_hand, chosen = zip(*[_naive_dola(policy3, i, p, 8, [0, 1, 2], 0.1, 1.2) for i, p in zip(images, prompts)])
    assert ours == list(by_hand)
    assert ours != policy3.generate(images, prompts, max_new_tokens=8)  # the contrast changed some answer
    first = min(map(len, chosen))
    assert any(len({c[step] for c in chosen}) > 1 for step in range(first))  # rows chose different layers at a step


def test_dola_layers_by_name_on_the_toy(policy):
    enc = dict(policy.process(_images(1), [policy.render(p) for p in _prompts(1)], "left"))
    assert DolaLogitsProcessor(policy.model, enc, "high").layers == [1]  # 2 text layers: range(1, 2, 2)
    assert DolaLogitsProcessor(policy.model, enc, "low").layers == [0]
