"""Visual contrastive decoding (VCD; Leng et al., CVPR 2024) for the policy, greedy.

At each step the next-token logits with the real image are contrasted with those with a
distorted image, so tokens the model would say without really seeing the image lose weight;
an adaptive plausibility cut keeps the contrast from promoting tokens the real image makes
implausible. Our distortion is the project's x_v* (``data.noise.make_x_v_star``, made by the
caller): the same image the copy test and the D_cm pairs use.

Hand-written: neither transformers 5.23 nor TRL has contrastive decoding between two images.
transformers' nearest piece, ``UnbatchedClassifierFreeGuidanceLogitsProcessor``, runs its second
branch on token ids alone (no image inputs, positions from the cache rather than the padding);
``VcdLogitsProcessor`` is the same idea with the distorted image's pixel values and left padding.
Tested on the LLaVA layout (the toy policy); a layout whose positions are not 1-D (Qwen2-VL's
M-RoPE) is not supported by the distorted branch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from policy.policy import Policy, Prompt

TOKEN_KEYS = ("input_ids", "attention_mask")


def vcd_logits(logits_real: torch.Tensor, logits_distorted: torch.Tensor, alpha: float = 1.0,
               beta: float = 0.1) -> torch.Tensor:
    """VCD's contrasted logits (Leng et al., CVPR 2024):

        (1 + alpha) * logit(y | x_v, x) - alpha * logit(y | x_v*, x),
        set to -inf where p(y | x_v, x) < beta * max_w p(w | x_v, x)

    The cut compares logits: p_y < beta * p_max  <=>  logit_y < log(beta) + max logit (one softmax
    normaliser), so the most likely token under the real image always survives it.
    """
    cutoff = math.log(beta) + logits_real.max(dim=-1, keepdim=True).values
    contrast = (1 + alpha) * logits_real - alpha * logits_distorted
    return contrast.masked_fill(logits_real < cutoff, float("-inf"))


class VcdLogitsProcessor(LogitsProcessor):
    """Replaces ``generate``'s next-token scores by ``vcd_logits`` against a second branch: the same
    model on the same tokens with the distorted images, with its own KV cache.

    ``distorted``: the processor's encoding of the same prompts with the distorted images, padded
    like the real one (same ``input_ids`` and ``attention_mask``, other pixel values).
    """

    def __init__(self, model: Any, distorted: dict[str, torch.Tensor], alpha: float = 1.0, beta: float = 0.1):
        self.model, self.alpha, self.beta = model, alpha, beta
        self.prompt_ids, self.prompt_mask = distorted["input_ids"], distorted["attention_mask"]
        self.image_inputs = {k: v for k, v in distorted.items() if k not in TOKEN_KEYS}
        self.cache: Any = None
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n_prompt = self.prompt_ids.shape[1]
        if self.cache is None and not torch.equal(input_ids[:, :n_prompt], self.prompt_ids):
            raise ValueError("the distorted encoding's tokens differ from the real one's "
                             "(give x_v* the real image's size, the same prompts and padding)")
        new = input_ids.shape[1] - n_prompt
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.shape[0], new)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate's, under left padding
        step = input_ids[:, self.seen:]
        out = self.model(input_ids=step, attention_mask=mask, position_ids=positions[:, -step.shape[1]:],
                         past_key_values=self.cache, use_cache=True,
                         **(self.image_inputs if self.cache is None else {}))
        self.cache, self.seen = out.past_key_values, input_ids.shape[1]
        return vcd_logits(scores, out.logits[:, -1].to(scores.dtype), self.alpha, self.beta)


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
