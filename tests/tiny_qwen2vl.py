"""A tiny, untrained Qwen2-VL or Qwen2.5-VL checkpoint folder, built from a config.

The toy policy is a LLaVA; this one is laid out differently in every place a policy layer can
trip over: the vision tower is ``visual`` with its projector (``merger``) inside it, images
become flattened patches plus ``image_grid_thw`` rows instead of an (N, C, H, W) stack, the
processor returns a per-token ``mm_token_type_ids`` beside ``input_ids``, and positions are
3-D (M-RoPE) computed from the attention mask. Tests run the policy layer and DPO on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from policy.prompts import DEFAULT_PROMPTS
from toy.toy_policy import template_texts, train_tokenizer

SPECIAL = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
           "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}

# Qwen-style turns; the image item becomes <|vision_start|><|image_pad|><|vision_end|>, which the
# processor expands to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# version -> (config, model, processor classes, vision config): Qwen2.5-VL's vision tower has
# window attention and a separate output width, the rest of the layout is Qwen2-VL's.
VERSIONS = {
    "2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
          dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)),
    "2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
            dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                 window_size=16, fullatt_block_indexes=[1])),
}


def build_tiny_qwen2vl(texts: list[str], out: Path, version: str = "2", image_side: int = 32, seed: int = 0) -> Path:
    """Save model + processor (images resized to ``image_side``^2 pixels, 4 image tokens) to ``out``."""
    config_cls, model_cls, processor_cls, vision = VERSIONS[version]
    bpe = train_tokenizer(texts + template_texts(str(DEFAULT_PROMPTS)), 400, 1024).backend_tokenizer
    bpe.add_special_tokens(list(SPECIAL.values()) + ["<|im_start|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left", **SPECIAL)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    config = config_cls(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    pixels = dict(min_pixels=image_side**2, max_pixels=image_side**2, patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
