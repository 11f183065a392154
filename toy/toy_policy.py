"""Build the toy base policy: a tiny, untrained LLaVA-architecture model with its own tokenizer.

No weights can be downloaded on the build machines, so the GPU-free default policy is made here
from a config (CLIP vision tower + Llama text model, as LLaVA-1.5 / LLaVA-Med v1.5) and saved as
an ordinary Hugging Face checkpoint folder that ``AutoModelForImageTextToText.from_pretrained``
and ``AutoProcessor.from_pretrained`` load (safetensors), exactly as a real LLaVA-Med folder.

Tokenizer: byte-level BPE trained on the world's text with the ``tokenizers`` library. Chosen
over WordLevel because decoding is lossless ("No, there is no effusion." comes back byte for
byte, which answer matching and BLEU/ROUGE depend on) and any text -- a user's own prompt
template, an unseen word in a reference -- still encodes without <unk>. On the toy world's
closed vocabulary nearly every word ends up a single token, so sequences stay short.

Run: ``python -m toy.toy_policy --world outputs/toy/world --out outputs/toy/policy_init``
(or ``--texts FILE`` with one text per line instead of / besides a world folder).
The world's files are found through its manifest (``data.manifest.manifest_files``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.io import InputError, atomic_dir, atomic_write_json
from data.manifest import manifest_files
from data.readers import read_records
from data.records import Record, ReportRecord, VqaRecord
from policy.prompts import DEFAULT_PROMPTS, keep_prompts, load_prompt_templates
from retriever.model import visual_weights
from toy.make_toy import EVALUATION_SPLITS, ROLES
from toy.pretrain_vision import pretrain_on_world
from toy.reading_probe import accuracy, answer_rows, read_prompts, train_reading

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
TOY_PROMPTS = DEFAULT_PROMPTS.with_name("toy.yaml")  # short wording: this policy cannot read instructions

# LLaVA-1.5 conversation layout ("USER: <image>\n... ASSISTANT:"), written as a Jinja chat
# template so the processor renders role/content messages the way real LLaVA checkpoints do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ '\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class ToyPolicyConfig:
    world: str = doc("", "toy world folder (with manifest.json); its texts but the test and dev splits' train the BPE")
    texts: str = doc("", "text file, one training text per line (with or instead of --world)")
    out: str = doc("outputs/toy/policy_init", "output checkpoint folder")
    prompts: str = doc(str(TOY_PROMPTS), "prompt templates the policy is tuned and prompted with: their words join the "
                                         "vocabulary and they are kept in its folder (policy.prompts.prompts_for)")
    vocab_size: int = doc(2048, "BPE vocabulary size, an upper bound (the small world fills ~1200)")
    image_size: int = doc(32, "vision tower input size (images are resized to this)")
    patch_size: int = doc(8, "vision patch size; (image_size/patch_size)^2 image tokens per image")
    vision_width: int = doc(128, "vision tower hidden size")
    vision_layers: int = doc(3, "vision tower layers")
    vision_heads: int = doc(4, "vision tower attention heads")
    text_width: int = doc(192, "language model hidden size")
    text_layers: int = doc(3, "language model layers")
    text_heads: int = doc(4, "language model attention heads")
    max_positions: int = doc(1024, "language model context length")
    text_init_std: float = doc(0.02, "std of the language model's initial weights (transformers' initializer_range); 0.02 leaves the 128-wide model on a plateau where it never learns to find the asked finding in its prompt, 0.08 (about 1/sqrt(width)) does not (docs/RESULTS.md)")
    seed: int = doc(0, "seed for the random initial weights")
    vision_pretrain_epochs: int = doc(0, "epochs of finding-label pretraining of the vision tower on the world's policy_train images (toy.pretrain_vision; 0: a random tower)")
    vision_tower_from: str = doc("", "open_clip checkpoint (toy.pretrain_vision's, the retrievers' start) whose image tower starts the policy's instead, as LLaVA's starts from a CLIP ViT; its tower must have this one's width, layers, heads, image and patch size")
    reading_index: str = doc("", "retrieval index.json whose policy_train yes/no questions, with their references, teach the language model to read (toy.oracle_retrieval writes one)")
    reading_steps: int = doc(0, "steps of text-only reading (toy.reading_probe.train_reading, batch 32, lr 1e-3) before SFT, as LLaVA starts from a language model that reads; 0: none")
    reading_target: float = doc(0.0, "stop reading once the accuracy on held-out policy_train questions reaches this (checked every 200 steps; reading_steps is then the most it takes): the step at which a seed learns to read varies from 600 to over 2,000 (docs/RESULTS.md); 0: always reading_steps")


def record_texts(record: Record) -> list[str]:
    """The natural-language fields of one annotation record."""
    if isinstance(record, ReportRecord):
        return [record.text]
    if isinstance(record, VqaRecord):
        return [record.question, record.answer, record.report]
    return [record.prompt, record.chosen, record.rejected]


def world_texts(world: str | Path) -> list[str]:
    """Report/question/answer texts of the world's annotation files, the evaluation splits' left out.

    The tokenizer is part of the model, so it learns from what the model may learn from (not the
    test or dev questions); words it never saw still encode (byte-level BPE), only in more pieces.
    """
    texts: list[str] = []
    for entry in manifest_files(world):
        if ROLES.get(entry["role"], ("",))[0] not in EVALUATION_SPLITS:
            for record in read_records(entry["path"], kind=entry["kind"]):
                texts += [t for t in record_texts(record) if t]
    return texts


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts`` with pad/bos/eos/unk and an ``<image>`` special token."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        image_token=IMAGE,
        padding_side="left",
        model_max_length=max_length,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, cfg: ToyPolicyConfig) -> LlavaProcessor:
    """CLIP image processor resizing to ``image_size`` + tokenizer + chat template."""
    size = cfg.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, cfg: ToyPolicyConfig
) -> LlavaForConditionalGeneration:
    """An untrained LLaVA: CLIP vision tower + 2-layer projector + Llama text model."""
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image_size {cfg.image_size} is no multiple of patch {cfg.patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_width,
        hidden_act="gelu",  # open_clip's, so a toy-clip image tower loads as it is (vision_tower_from)
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=(8 * cfg.text_width) // 3 // 16 * 16,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=cfg.text_init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        # "default" drops CLS so the feature count matches the processor's image tokens;
        # the last layer is used because a 3-layer tower has no spare penultimate layer.
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model


def open_clip_to_hf_vision(w: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """An open_clip ViT's weights (``model.visual``'s, retriever.model.visual_weights) under
    transformers' CLIPVisionModel names.

    Written by hand: transformers ships this mapping only inside a conversion script that needs
    OpenAI's clip package. open_clip keeps q, k and v in one in_proj matrix; its ln_post and proj
    act after the tokens LLaVA reads, so they are left out (CLIPVisionModel's post_layernorm
    keeps its initial weights and only pools)."""
    out = {"embeddings.class_embedding": w["class_embedding"], "embeddings.patch_embedding.weight": w["conv1.weight"],
           "embeddings.position_embedding.weight": w["positional_embedding"],
           "pre_layrnorm.weight": w["ln_pre.weight"], "pre_layrnorm.bias": w["ln_pre.bias"]}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, part in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            for proj, chunk in zip("qkv", w[src + "attn." + part].chunk(3)):
                out[f"{dst}self_attn.{proj}_proj.{name}"] = chunk
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = w[f"{src}{a}.weight"], w[f"{src}{a}.bias"]
    return out


def load_open_clip_tower(tower: torch.nn.Module, path: str | Path) -> None:
    """Start the policy's CLIPVisionModel ``tower`` from an open_clip checkpoint's image tower."""
    cfg = tower.config
    try:
        weights = open_clip_to_hf_vision(visual_weights(path, "vision_tower_from"), cfg.num_hidden_layers)
    except KeyError as e:
        raise InputError(f"{path}: not an open_clip ViT with {cfg.num_hidden_layers} layers (no {e})") from None
    own = tower.state_dict()
    wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"{path}: its image tower is not this policy's (width {cfg.hidden_size}, "
                          f"{cfg.num_hidden_layers} layers, image {cfg.image_size}, patch {cfg.patch_size}): {wrong[0]}")
    tower.load_state_dict(weights, strict=False)  # post_layernorm: LLaVA reads the tokens before it


def template_texts(prompts_yaml: str | Path) -> list[str]:
    """Words of the prompt and chat templates (placeholders removed): prompts tokenize compactly."""
    templates = load_prompt_templates(prompts_yaml)
    chat_words = "USER: ASSISTANT: SYSTEM:"  # the roles CHAT_TEMPLATE writes
    return [chat_words] + [t.replace("{", " ").replace("}", " ") for t in templates.all_texts()]


def build_toy_policy(texts: list[str], out: str | Path, cfg: ToyPolicyConfig) -> Path:
    """Train the tokenizer on ``texts``, pretrain the vision tower if asked, save model + processor
    to ``out`` (atomically)."""
    if not texts:
        raise InputError(f"{cfg.world or cfg.texts}: no text found to train the tokenizer on")
    if cfg.vision_pretrain_epochs > 0 and not cfg.world:
        raise ConfigError("vision_pretrain_epochs needs --world (its policy_train images and findings)")
    if cfg.reading_steps > 0 and not cfg.reading_index:
        raise ConfigError("reading_steps needs --reading_index (e.g. outputs/toy/oracle_retrieval/index.json)")
    texts = texts + template_texts(cfg.prompts)
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.max_positions)
    processor = build_processor(tokenizer, cfg)
    model = build_model(tokenizer, cfg)
    if cfg.vision_tower_from:
        load_open_clip_tower(model.model.vision_tower, cfg.vision_tower_from)
    elif cfg.vision_pretrain_epochs > 0:
        tower = model.model.vision_tower
        pretrain_on_world(tower, lambda x: tower(pixel_values=x).last_hidden_state[:, 1:],  # CLS dropped, as LLaVA does
                          lambda images: processor.image_processor(images=images, return_tensors="pt")["pixel_values"],
                          cfg.world, cfg.vision_pretrain_epochs, seed=cfg.seed)
    curve: list[dict[str, float]] = []
    if cfg.reading_steps > 0:
        curve = learn_to_read(model, tokenizer, cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        keep_prompts(cfg.prompts, tmp)
        save_config(cfg, Path(tmp) / "run_config.yaml")
        if curve:
            atomic_write_json(Path(tmp) / "reading.json", {"target": cfg.reading_target, "curve": curve})
    return Path(out)


HELD_OUT = 512  # at most this many policy_train questions (a fifth at most) decide when reading is learnt


def learn_to_read(model: torch.nn.Module, tokenizer: Any, cfg: ToyPolicyConfig) -> list[dict[str, float]]:
    """Text-only reading on the policy_train questions; with ``reading_target``, until the held-out
    ones are answered that well. Returns the held-out accuracy curve (empty without a target)."""
    prompts, labels = read_prompts(cfg.reading_index, ["policy_train"], tokenizer, cfg.prompts)
    choice, pad = answer_rows(tokenizer, cfg.reading_index), tokenizer.pad_token_id
    order, cut = list(range(len(prompts))), 0
    if cfg.reading_target > 0:
        order = random.Random(cfg.seed).sample(order, len(order))
        cut = min(HELD_OUT, len(order) // 5)
    held, train = order[:cut], order[cut:]
    held_x, held_y = [prompts[i] for i in held], [labels[i] for i in held]
    curve: list[dict[str, float]] = []

    def reached(step: int, loss: float) -> bool:
        acc = accuracy(model, held_x, held_y, choice, pad) / len(held_y)
        curve.append({"step": step, "train_loss": loss, "held_out_accuracy": acc})
        tqdm.write(f"reading step {step}: held-out accuracy {acc:.3f} (target {cfg.reading_target})")
        return acc >= cfg.reading_target

    train_reading(model, [prompts[i] for i in train], [labels[i] for i in train], choice, pad, cfg.reading_steps,
                  32, 1e-3, cfg.seed, desc="reading", on_eval=reached if held else None, eval_every=200)
    return curve


def main() -> None:
    cfg = load_config(ToyPolicyConfig, description=__doc__)
    texts: list[str] = []
    if cfg.world:
        texts += world_texts(cfg.world)
    if cfg.texts:
        if not Path(cfg.texts).is_file():
            raise InputError(f"{cfg.texts}: text file does not exist")
        lines = Path(cfg.texts).read_text(encoding="utf-8").splitlines()
        texts += [line for line in lines if line.strip()]
    if not (cfg.world or cfg.texts):
        raise InputError("give --world FOLDER and/or --texts FILE to train the tokenizer on")
    out = build_toy_policy(texts, cfg.out, cfg)
    n = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(out).parameters())
    print(f"toy policy: {out} ({n / 1e6:.2f}M parameters, vocabulary from {len(texts)} texts)")


if __name__ == "__main__":
    cli_main(main)
