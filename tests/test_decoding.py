"""VCD on given logits (the contrast and the plausibility cut by hand) and on a tiny toy policy."""

import pytest
import torch

from data.noise import NoiseConfig, make_x_v_star
from policy.decoding import VcdLogitsProcessor, vcd_generate, vcd_logits
from policy.policy import load_policy
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


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    cfg = ToyPolicyConfig(vocab_size=400, vision_width=64, vision_layers=2, text_width=64, text_layers=2)
    pol = load_policy(build_toy_policy(_texts(), tmp_path_factory.mktemp("toy") / "policy", cfg))
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: answers then depend strongly on the image
        for p in pol.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return pol


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
