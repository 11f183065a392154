"""Contrastive decoding for the policy, greedy: VCD (Leng et al., CVPR 2024) and DoLa (Chuang et al., ICLR 2024).

VCD: at each step the next-token logits with the real image are contrasted with those with a
distorted image, so tokens the model would say without really seeing the image lose weight;
an adaptive plausibility cut keeps the contrast from promoting tokens the real image makes
implausible. Our distortion is the project's x_v* (``data.noise.make_x_v_star``, made by the
caller): the same image the copy test and the D_cm pairs use.

DoLa: at each step the final layer's next-token distribution is contrasted with that of an
earlier ("premature") layer read through the same final norm and LM head, the candidate layer
whose distribution is furthest from the final one (Jensen-Shannon), so what the later layers add
gains weight; the same kind of plausibility cut, on the final layer's probabilities.

Hand-written: neither transformers 5.23 nor TRL has contrastive decoding between two images, and
transformers 5.23 no longer ships DoLa (``generate(dola_layers=...)`` wants remote code from the
hub, which this project keeps off; docs/DESIGN.md). transformers' nearest piece to VCD,
``UnbatchedClassifierFreeGuidanceLogitsProcessor``, runs its second branch on token ids alone (no
image inputs, positions from the cache rather than the padding); ``Branch`` is the same idea with
image inputs and left padding, and both methods run theirs beside ``generate``. Tested on the
LLaVA layout (the toy policy); a layout whose positions are not 1-D (Qwen2-VL's M-RoPE) is not
supported by the branch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from policy.policy import Policy, Prompt, causal_lm

TOKEN_KEYS = ("input_ids", "attention_mask")


def vcd_logits(logits_real: torch.Tensor, logits_distorted: torch.Tensor, alpha: float = 1.0,
               beta: float = 0.1) -> torch.Tensor:
    """VCD's contrasted logits (Leng et al., CVPR 2024):

        (1 + alpha) * logit(y | x_v, x) - alpha * logit(y | x_v*, x),
        set to -inf where p(y | x_v, x) < beta * max_w p(w | x_v, x)

    The cut compares logits: p_y < beta * p_max  <=>  logit_y < log(beta) + max logit (one softmax
    normaliser), so the most likely token under the real image always survives it.
    """
    contrast = (1 + alpha) * logits_real - alpha * logits_distorted
    return _plausible(contrast, logits_real, beta)


def _plausible(contrast: torch.Tensor, logits: torch.Tensor, cut: float) -> torch.Tensor:
    """``contrast`` with -inf where p(y) < cut * max_w p(w) under ``logits`` (the adaptive
    plausibility constraint VCD and DoLa share), compared as logits; the top token always survives."""
    cutoff = math.log(cut) + logits.max(dim=-1, keepdim=True).values
    return contrast.masked_fill(logits < cutoff, float("-inf"))


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between softmax(logits_p) and softmax(logits_q) over the
    last dimension, broadcast over the others: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2.
    Logits must be finite (a model's are)."""
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def dola_logits(final: torch.Tensor, premature: torch.Tensor, relative_top: float = 0.1) -> torch.Tensor:
    """DoLa's contrasted logits (Chuang et al., ICLR 2024) for a batch of next-token logits.

    ``final`` [B, V]: the final layer's; ``premature`` [L, B, V]: the L candidate layers'. Each row
    takes as premature layer its candidate of largest ``js_divergence`` from the final layer, and
    returns log p_final - log p_premature, set to -inf where p_final < relative_top * max p_final.

    The layer is chosen per row, as the paper defines it: transformers (<= 4.52) averaged the
    divergence over the batch and chose one layer for all rows, so a batched answer could differ
    from the one-at-a-time answer; it also computed 0.5 (KL(m || p) + KL(m || q)), kl_div's
    argument order, which is not the Jensen-Shannon divergence the paper names.
    """
    chosen = js_divergence(final, premature).argmax(0)  # [B]
    base = premature[chosen, torch.arange(final.shape[0], device=final.device)]
    contrast = final.float().log_softmax(-1) - base.float().log_softmax(-1)
    return _plausible(contrast, final.float(), relative_top)


def dola_candidate_layers(n_layers: int, layers: str | Sequence[int]) -> list[int]:
    """The candidate premature layers of a text model of N = ``n_layers`` layers, by transformers'
    (<= 4.52) rule, hidden state 0 being the embedding output and hidden state i layer i's output:

        "low":  range(0, N // 2, 2), or range(0, 20, 2) when N > 40; [0] when that is empty (N = 1)
        "high": range(N // 2, N, 2), or range(N - 20, N, 2) when N > 40

    so the final layer N is never one. transformers started "low" at layer 2 when word embeddings
    are tied (an early exit from the embeddings is then near the identity); the policies here are
    untied, so it starts at 0. An explicit list must name layers below N (transformers dropped the others).
    """
    if layers == "low":
        return list(range(0, min(n_layers // 2, 20), 2)) or [0]
    if layers == "high":
        return list(range(max(n_layers // 2, n_layers - 20), n_layers, 2))
    if isinstance(layers, str) or not layers or not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"DoLa layers {layers!r}: 'low', 'high' or a list of layers in [0, {n_layers})")
    return list(layers)


def final_norm_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The text model's final norm and the LM head: what turns the final hidden state into logits,
    and so reads an early layer's hidden state as next-token logits."""
    lm = causal_lm(model)
    head, text_model = lm.get_output_embeddings(), lm.get_decoder()
    norm = getattr(text_model, "norm", None)
    if head is None or not isinstance(norm, torch.nn.Module):
        raise ValueError(f"{type(lm).__name__}: no LM head (get_output_embeddings()) or no final norm "
                         f"(get_decoder().norm, in its {type(text_model).__name__}) to read early layers with")
    return norm, head


class Branch:
    """The model run again beside ``generate``, with its own KV cache, on the tokens generate has so far.

    ``encoded``: the processor's encoding of generate's batch, padded like it (same ``input_ids``
    and ``attention_mask``; the image inputs may differ, as VCD's x_v*). Positions come from the mask
    as generate derives them, so a left-padded row computes what it would alone.
    """

    def __init__(self, model: Any, encoded: dict[str, torch.Tensor]):
        self.model = model
        self.prompt_ids, self.prompt_mask = encoded["input_ids"], encoded["attention_mask"]
        self.image_inputs = {k: v for k, v in encoded.items() if k not in TOKEN_KEYS}
        self.cache: Any = None
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, **forward: Any) -> Any:
        """The forward on the tokens generate added since the last call (at the first, the prompt with
        the image inputs), logits of the last position only; ``forward``: more arguments to the model."""
        n_prompt = self.prompt_ids.shape[1]
        if self.cache is None and not torch.equal(input_ids[:, :n_prompt], self.prompt_ids):
            raise ValueError("the branch's prompt tokens differ from generate's "
                             "(give it the same prompts and padding, and images of the same sizes)")
        new = input_ids.shape[1] - n_prompt
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.shape[0], new)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate's, under left padding
        step = input_ids[:, self.seen:]
        out = self.model(input_ids=step, attention_mask=mask, position_ids=positions[:, -step.shape[1]:],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1, **forward,
                         **(self.image_inputs if self.cache is None else {}))
        self.cache, self.seen = out.past_key_values, input_ids.shape[1]
        return out


class VcdLogitsProcessor(LogitsProcessor):
    """Replaces ``generate``'s next-token scores by ``vcd_logits`` against a ``Branch`` with the
    distorted images: ``distorted`` is the processor's encoding of the same prompts with them."""

    def __init__(self, model: Any, distorted: dict[str, torch.Tensor], alpha: float = 1.0, beta: float = 0.1):
        self.branch, self.alpha, self.beta = Branch(model, distorted), alpha, beta

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        distorted = self.branch(input_ids).logits[:, -1].to(scores.dtype)
        return vcd_logits(scores, distorted, self.alpha, self.beta)


class DolaLogitsProcessor(LogitsProcessor):
    """Replaces ``generate``'s next-token scores by ``dola_logits`` from a ``Branch`` on the same
    encoding (``encoded``) that also returns the candidate layers' hidden states: final and early
    layers then come from one forward (generate's own scores give only the dtype).

    Early layers are read as the final one is, through the final norm and the LM head
    (``final_norm_and_head``); the final layer's logits are the model's own (its hidden state N is
    already the normed one). transformers (<= 4.52) and the authors' code put the LM head on early
    hidden states without the norm (github.com/voidism/DoLa issue 9 asks for it).
    """

    def __init__(self, model: Any, encoded: dict[str, torch.Tensor], layers: str | Sequence[int],
                 relative_top: float = 0.1):
        self.norm, self.head = final_norm_and_head(model)
        self.layers = dola_candidate_layers(causal_lm(model).config.get_text_config().num_hidden_layers, layers)
        self.branch, self.relative_top = Branch(model, encoded), relative_top

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = self.branch(input_ids, output_hidden_states=self.layers)
        premature = torch.stack([self.head(self.norm(out.hidden_states[i][:, -1])) for i in self.layers])
        return dola_logits(out.logits[:, -1], premature, self.relative_top).to(scores.dtype)


def vcd_generate(policy: Policy, images: Sequence[Image.Image], distorted: Sequence[Image.Image],
                 prompts: Sequence[Prompt], max_new_tokens: int = 64, alpha: float = 1.0, beta: float = 0.1,
                 batch_size: int = 8) -> list[str]:
    """Greedy VCD answers, one per (image, its distorted image, prompt), in input order:
    ``Policy.generate`` with the distorted branch as each batch's logits processor.

    With ``alpha`` = 0 they are ``Policy.generate``'s greedy answers (tests/test_decoding.py).
    """
    if not len(images) == len(distorted) == len(prompts):
        raise ValueError(f"{len(images)} images, {len(distorted)} distorted images, {len(prompts)} prompts")
    texts = [policy.render(p) for p in prompts]

    def contrast(idx: list[int]) -> LogitsProcessorList:
        encoded = dict(policy.process([distorted[i] for i in idx], [texts[i] for i in idx], "left"))
        return LogitsProcessorList([VcdLogitsProcessor(policy.model, encoded, alpha, beta)])

    return policy.generate(images, prompts, max_new_tokens, batch_size, logits_processor=contrast)


def dola_generate(policy: Policy, images: Sequence[Image.Image], prompts: Sequence[Prompt], max_new_tokens: int = 64,
                  layers: str | Sequence[int] = "high", relative_top: float = 0.1, repetition_penalty: float = 1.2,
                  batch_size: int = 8) -> list[str]:
    """Greedy DoLa answers, one per (image, prompt), in input order: ``Policy.generate`` with a
    ``DolaLogitsProcessor`` as each batch's logits processor, then a repetition penalty.

    ``layers``: "high" (transformers' advice for short answers), "low" (long answers) or a list
    (``dola_candidate_layers``). ``repetition_penalty``: on the contrasted logits, as transformers
    applied it, to the prompt's and the answer's tokens; 1.2 is the value transformers recommended
    for DoLa, 1.0 turns it off. The left padding is not penalised (transformers' was), so that the
    padding token is not penalised in a batch only and a batched answer is the one-at-a-time answer.
    """
    texts = [policy.render(p) for p in prompts]

    def contrast(idx: list[int]) -> LogitsProcessorList:
        encoded = dict(policy.process([images[i] for i in idx], [texts[i] for i in idx], "left"))
        padding = (encoded["attention_mask"] == 0).sum(-1)
        return LogitsProcessorList([DolaLogitsProcessor(policy.model, encoded, layers, relative_top),
                                    RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=padding)])

    return policy.generate(images, prompts, max_new_tokens, batch_size, logits_processor=contrast)
