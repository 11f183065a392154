"""Tiny models run fastest single-threaded, and tests share the machine's cores."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_processor():
    """A tiny LLaVA processor without a model, for stand-in policies: the token budget counts with it.

    Its tokenizer's ``model_max_length`` (1024) is then the stand-in's own limit.
    """
    from policy.prompts import DEFAULT_PROMPTS
    from toy.toy_policy import ToyPolicyConfig, build_processor, template_texts, train_tokenizer

    texts = template_texts(DEFAULT_PROMPTS) + ["Is there a finding? Yes finding. No finding. Normal study."] * 5
    return build_processor(train_tokenizer(texts, 400, 1024), ToyPolicyConfig())
