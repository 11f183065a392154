"""The policy layer and the DPO trainer on other architectures: tiny Qwen2-VL and Qwen2.5-VL (tests/tiny_qwen2vl.py).

"Any Hugging Face vision-language model" is checked where LLaVA alone would hide the
differences: patch-flattened images with ``image_grid_thw``, a per-token ``mm_token_type_ids``,
M-RoPE positions from the attention mask, and a vision tower named ``visual``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from common.engine import LoraConfig, apply_lora
from data.noise import pure_noise
from dpo.train_dpo import pair_logps, run
from policy.policy import load_policy
from tests.test_pair_data import policy_texts, write_pairs
from tests.test_policy import _images, _prompts
from tests.test_train_dpo import (  # noqa: F401 (fresh_accelerate, one_thread: fixtures)
    _batch, _sharpen, config, fresh_accelerate, images_encoded_once_give_the_same_logps, one_forward_equals_two,
    one_thread, rows,
)
from tests.tiny_qwen2vl import build_tiny_qwen2vl


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def world(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen2vl")
    write_pairs(root, n=16)
    write_pairs(root, n=16, released=True)
    build_tiny_qwen2vl(policy_texts(), root / "policy", version=request.param)
    return root


def test_loads_through_auto_classes_and_batched_generation_equals_one_at_a_time(world):
    policy = load_policy(world / "policy")
    assert type(policy.model).__name__ in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    assert policy.image_token == "<|image_pad|>"
    _sharpen(policy.model)
    images, prompts = _images(6), _prompts(6)
    batched = policy.generate(images, prompts, max_new_tokens=6, batch_size=4)
    single = [policy.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(images, prompts)]
    assert batched == single and len(set(batched)) >= 3
    assert policy.generate(_images(6, seed=9), prompts, max_new_tokens=6, batch_size=4) != batched


def test_training_batch_keeps_per_token_keys_aligned(world):
    policy = load_policy(world / "policy")
    prompts, answers = _prompts(3), ["Yes.", "No, there is no pleural effusion.", "No"]
    batch = policy.encode_for_training(prompts, answers, _images(3))
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    image_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # type 1 exactly where the image tokens are, 0 on text, answers and padding
    torch.testing.assert_close(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long())
    assert batch["image_grid_thw"].shape == (3, 3)


def test_one_forward_equals_two_and_the_rejected_image_counts(world):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    chosen, rejected = one_forward_equals_two(world, policy)
    with torch.no_grad():
        c2, r2 = pair_logps(policy.model, _batch(world, policy, rejected_image=pure_noise((40, 40), 3))[2]["inputs"])
    torch.testing.assert_close(c2, chosen, rtol=0, atol=1e-5)
    assert (r2 - rejected).abs().min() > 1e-4


def test_images_encoded_once_give_the_same_logps(world):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    images_encoded_once_give_the_same_logps(world, policy)


def test_lora_leaves_the_vision_tower_alone_but_trains_the_merger(world):
    policy = load_policy(world / "policy")
    model = apply_lora(policy.model, LoraConfig(r=4, alpha=8, dropout=0.0, train_projector=True))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and not any(".visual." in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all(".visual.merger." in n for n in trainable)


def test_dpo_trains_saves_and_merges(world, tmp_path, capsys):
    summary = run(config(world, tmp_path / "run", pairs="released.json", merge=True, train={"max_steps": 3}))
    # M-RoPE positions are not one integer per token: each pair takes two rows, and the run says so
    assert "share_prompt: off for this model (its multimodal rotary positions" in capsys.readouterr().out
    train_rows = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert len(train_rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    adapter_cfg = json.loads((Path(summary["adapter"]) / "adapter_config.json").read_text())
    assert not any("visual" in m for m in adapter_cfg["target_modules"])
    merged = AutoModelForImageTextToText.from_pretrained(summary["merged"]).eval()
    base = load_policy(world / "policy")
    with_adapter = PeftModel.from_pretrained(base.model, str(summary["adapter"])).eval()
    inputs = {k: v for k, v in _batch(world, base)[2]["inputs"].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter(**inputs).logits, rtol=0, atol=1e-4)


def test_a_prefix_lm_is_refused_for_training_not_trained_wrong():
    """PaliGemma's token_type_ids mark the answer (bidirectional prompt): one causal sequence of
    prompt + answer would let the answer attend forward, so SFT/DPO encoding refuses it."""
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    from common.io import InputError
    from policy.policy import Policy
    from toy.toy_policy import train_tokenizer

    bpe = train_tokenizer(policy_texts(), 300, 512).backend_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", image_token="<image>")
    processor = PaliGemmaProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32},
                                                                        image_seq_length=4), tokenizer=tok)
    with pytest.raises(InputError, match="prefix LM"):
        Policy(model=None, processor=processor).encode_for_training(["Is there a nodule?"], ["Yes."], _images(1))
