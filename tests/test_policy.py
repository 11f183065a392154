import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from common.io import InputError
from policy.policy import IGNORE, PolicySpec, load_policy, sequence_logps
from policy.prompts import build_prompt, plain_text
from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

FINDINGS = ["pleural effusion", "cardiomegaly", "pneumothorax", "nodule", "edema"]


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(200):
        a, b = rng.choice(FINDINGS, 2, replace=False)
        out += [
            f"Is there {a} in this image?",
            "Yes.",
            f"No, there is no {a}.",
            f"The heart size is normal. There is {a} in the left lower lobe. No {b}.",
        ]
    return out


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    cfg = ToyPolicyConfig(vocab_size=400, vision_width=64, vision_layers=2, text_width=64, text_layers=2)
    return build_toy_policy(_texts(), tmp_path_factory.mktemp("toy") / "policy", cfg)


@pytest.fixture(scope="module")
def policy(toy_dir):
    torch.manual_seed(0)
    return load_policy(toy_dir)


def _prompts(n: int) -> list:
    """Prompts of different lengths: with 0, 1 or 2 references, different questions."""
    refs = [None, ["The heart size is normal."], ["No edema.", "There is nodule in the left lower lobe."]]
    return [build_prompt("radiology", "vqa", f"Is there {FINDINGS[i % 5]} in this image?", refs[i % 3]) for i in range(n)]


def test_toy_policy_loads_through_auto_classes(toy_dir):
    model = AutoModelForImageTextToText.from_pretrained(toy_dir)
    processor = AutoProcessor.from_pretrained(toy_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (toy_dir / "model.safetensors").is_file()
    tok = processor.tokenizer
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    assert processor.image_token_id == model.config.image_token_id
    text = "No, there is no pleural effusion."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # lossless
    assert len(tok.tokenize(" pleural effusion")) == 2  # world words are whole tokens
    # one processor call gives exactly as many image tokens as the vision tower gives features
    enc = processor(images=_images(1), text=["<image>\nIs there edema?"], return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == model.config.image_seq_length
    assert model(**enc).logits.shape[-1] == len(tok)


def test_chat_template_matches_plain_fallback(policy):
    messages = _prompts(1)[0]
    assert policy.render(messages) == plain_text(messages, "<image>")
    assert policy.render("Is there edema?") == "<image>\nIs there edema?"


def test_batched_generation_equals_one_at_a_time(toy_dir):
    policy = load_policy(toy_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: answers then depend strongly on the input
        for p in policy.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    images, prompts = _images(6), _prompts(6)
    assert len({len(policy.render(p)) for p in prompts}) >= 3  # mixed prompt lengths: padding in play
    batched = policy.generate(images, prompts, max_new_tokens=8, batch_size=4)
    single = [policy.generate([im], [p], max_new_tokens=8)[0] for im, p in zip(images, prompts)]
    assert batched == single
    assert len(set(batched)) >= 4 and all(batched)  # varied, non-empty answers
    other_images = policy.generate(_images(6, seed=9), prompts, max_new_tokens=8, batch_size=4)
    assert other_images != batched  # the image reaches the answer


def test_sampled_tokens_are_the_answers_through_eos_and_never_the_image_token(toy_dir):
    policy = load_policy(toy_dir)
    tok, head = policy.tokenizer, policy.model.get_output_embeddings().weight
    images, prompts = _images(4), _prompts(4)
    first = policy.tokenizer(policy.generate(images[:1], prompts[:1], max_new_tokens=1)[0], add_special_tokens=False).input_ids
    image_id = tok.convert_tokens_to_ids(policy.image_token)
    with torch.no_grad():  # the image token now outscores the greedy first word by far: sampling would take it
        head[image_id] = 20 * head[first[0]]
    torch.manual_seed(0)
    texts, tokens = policy.generate(images, prompts, max_new_tokens=6, batch_size=4, temperature=1.0, return_tokens=True)
    assert all(image_id not in t for t in tokens)
    for text, t in zip(texts, tokens):
        assert t and (t[-1] == tok.eos_token_id or len(t) == 6) and t.count(tok.eos_token_id) <= 1
        assert tok.decode(t, skip_special_tokens=True).strip() == text
    batch = policy.encode_for_training(prompts, texts, images, answer_tokens=tokens)
    assert [row[row != IGNORE].tolist() for row in batch["labels"]] == tokens
    with pytest.raises(ValueError, match="3 answer token lists for 4 answers"):
        policy.encode_for_training(prompts, texts, images, answer_tokens=tokens[:3])


def test_encode_for_training_masks_prompt_and_padding(policy):
    images, prompts = _images(3), _prompts(3)
    answers = ["Yes.", "No, there is no pleural effusion.", "No"]
    batch = policy.encode_for_training(prompts, answers, images)
    tok = policy.tokenizer
    assert batch["pixel_values"].shape[0] == 3
    for i in range(3):
        alone = policy.processor(images=[images[i]], text=[policy.render(prompts[i])], return_tensors="pt")
        prompt_ids = alone.input_ids[0].tolist()
        answer_ids = tok(answers[i], add_special_tokens=False).input_ids + [tok.eos_token_id]
        n = len(prompt_ids) + len(answer_ids)
        row, mask, labels = batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i]
        assert row[:n].tolist() == prompt_ids + answer_ids
        assert labels[: len(prompt_ids)].eq(IGNORE).all()
        assert labels[len(prompt_ids) : n].tolist() == answer_ids
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # right padding
        assert labels[n:].eq(IGNORE).all() and row[n:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]  # no wasted columns


def test_stray_image_tokens_in_texts_are_neutralised(policy):
    prompts = [build_prompt("radiology", "vqa", "Is there edema?", ["Report quoting <image> by mistake."])]
    assert policy.render(prompts[0]).count("<image>") == 1
    batch = policy.encode_for_training(prompts, ["No <image>"], _images(1))
    image_id = policy.model.config.image_token_id
    assert int(batch["input_ids"].eq(image_id).sum()) == policy.model.config.image_seq_length
    assert sequence_logps(policy.model, batch).isfinite().all()


def test_model_free_encoder_matches(policy):
    from policy.policy import Policy

    images, prompts = _images(2), _prompts(2)
    want = policy.encode_for_training(prompts, ["Yes.", "No"], images)
    got = Policy(model=None, processor=policy.processor).encode_for_training(prompts, ["Yes.", "No"], images)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].cpu()), k


def _manual_logp(model, batch, i):
    """log p(answer | prompt) of row i, run alone without padding."""
    keep = batch["attention_mask"][i].bool()
    ids, labels = batch["input_ids"][i][keep][None], batch["labels"][i][keep]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"][i : i + 1]).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, len(labels)) if labels[t] != IGNORE)


def test_sequence_logps_equals_manual_computation(policy):
    images, prompts = _images(3), _prompts(3)
    batch = policy.encode_for_training(prompts, ["Yes.", "No, there is no edema.", "Nodule."], images)
    with torch.no_grad():
        got = sequence_logps(policy.model, batch)
        mean = sequence_logps(policy.model, batch, average=True)
    want = torch.tensor([_manual_logp(policy.model, batch, i) for i in range(3)], dtype=torch.float64)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    n_answer = batch["labels"][:, 1:].ne(IGNORE).sum(1)
    torch.testing.assert_close(mean, got / n_answer)


def _full_logits_logps(model, batch, average=False):
    """The answer log-probs from the full [B, T, vocab] logits: what the chunked scorer must equal."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    total = (logits.log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def _values_and_grads(model, score):
    model.zero_grad()
    got = score()
    (got * torch.tensor([1.0, -2.0, 0.5])).sum().backward()  # a different weight per row
    return got.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_logps_equal_full_logits_values_and_gradients(toy_dir, average, lora):
    """One answer position per chunk (chunk_mb 0) and all in one chunk give the full-logits values
    and gradients, on the model and on a PEFT-wrapped one (only the LoRA weights get gradients)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_policy(toy_dir).model.train()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy = load_policy(toy_dir)
    batch = policy.encode_for_training(_prompts(3), ["Yes.", "No, there is no edema.", "Nodule."], _images(3))
    want, want_grads = _values_and_grads(model, lambda: _full_logits_logps(model, batch, average))
    assert want_grads and (not lora or all("lora_" in n for n in want_grads))
    for chunk_mb in (0, 64):
        got, grads = _values_and_grads(model, lambda: sequence_logps(model, batch, average, chunk_mb=chunk_mb))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_chunked_logps_in_bfloat16_match_full_logits(toy_dir):
    model = load_policy(toy_dir, dtype="bfloat16").model
    policy = load_policy(toy_dir)
    batch = policy.encode_for_training(_prompts(3), ["Yes.", "No, there is no edema.", "Nodule."], _images(3))
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        want = _full_logits_logps(model, batch)
        got = sequence_logps(model, batch, chunk_mb=0)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)


def test_chunked_logps_refuse_models_with_transformed_logits(toy_dir):
    model = load_policy(toy_dir).model
    batch = load_policy(toy_dir).encode_for_training(_prompts(1), ["Yes."], _images(1))
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        sequence_logps(model, batch)


def test_preference_batch_has_own_images_and_common_length(policy):
    images, noised = _images(2, seed=1), _images(2, seed=2)
    prompts = _prompts(2)
    chosen, rejected = ["Yes.", "No, there is no edema."], ["No", "Yes, there is edema in the left lower lobe."]
    pair = policy.encode_preference(prompts, chosen, rejected, images, rejected_images=noised)
    assert pair["input_ids"].shape[0] == 4
    assert not torch.equal(pair["pixel_values"][:2], pair["pixel_values"][2:])
    with torch.no_grad():
        joint = sequence_logps(policy.model, pair)
        parts = [policy.encode_for_training(prompts, chosen, images), policy.encode_for_training(prompts, rejected, noised)]
        alone = torch.cat([sequence_logps(policy.model, b) for b in parts])
    torch.testing.assert_close(joint, alone, atol=1e-4, rtol=1e-5)


def test_load_policy_with_lora_adapter(toy_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_policy(toy_dir)
    torch.manual_seed(1)
    lora = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial adapter
    lora.save_pretrained(tmp_path / "adapter")
    batch = base.encode_for_training(_prompts(2), ["Yes.", "No"], _images(2))
    with torch.no_grad():
        want = sequence_logps(lora, batch)
        plain = sequence_logps(load_policy(toy_dir).model, batch)
        got = sequence_logps(load_policy(toy_dir, adapter=tmp_path / "adapter").model, batch)
        merged = sequence_logps(load_policy(toy_dir, adapter=tmp_path / "adapter", merge_adapter=True).model, batch)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(plain, want)


def test_load_policy_refuses_missing_folders(toy_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(InputError, match="adapter"):
        load_policy(toy_dir, adapter=tmp_path / "nope")


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_from_pretrained(toy_dir, monkeypatch, trust):
    """PolicySpec.trust_remote_code is what transformers is told when the policy, its processor and
    (for the token budget) its config are loaded."""
    import transformers

    from policy.adapters import load_with_adapters
    from policy.budget import checkpoint_limit

    seen: list[tuple[str, object]] = []

    def spy(cls: type) -> type:
        class Spy:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                seen.append((cls.__name__, kwargs.get("trust_remote_code")))
                return cls.from_pretrained(*args, **kwargs)

        return Spy

    for module, name in [("policy.policy", "AutoModelForImageTextToText"), ("policy.policy", "AutoProcessor"),
                         ("transformers", "AutoConfig"), ("transformers", "AutoProcessor")]:
        monkeypatch.setattr(f"{module}.{name}", spy(getattr(transformers, name)))
    load_with_adapters(PolicySpec(path=str(toy_dir), trust_remote_code=trust))
    checkpoint_limit(toy_dir, trust)
    assert sorted(seen) == sorted([("AutoModelForImageTextToText", trust), ("AutoProcessor", trust),
                                   ("AutoConfig", trust), ("AutoProcessor", trust)])
    assert PolicySpec().trust_remote_code is False


def test_world_texts_reads_training_text_through_the_manifest(tmp_path):
    (tmp_path / "rad").mkdir()
    (tmp_path / "rad" / "train.json").write_text(
        json.dumps([{"id": "1", "report": "Small nodule.", "image_path": ["img/1.png"]}])
    )
    vqa = {"question_id": 3, "question": "Is there edema?\n<image>", "answer": "No", "image": "x.png", "report": ""}
    (tmp_path / "rad" / "vqa.jsonl").write_text(json.dumps(vqa) + "\n")
    (tmp_path / "rad" / "test.jsonl").write_text(json.dumps({**vqa, "question": "Secret test words?"}) + "\n")
    entry = {"domain": "radiology", "image_root": "rad", "records": 1}
    files = [
        {**entry, "path": "rad/train.json", "role": "policy_train", "kind": "report"},
        {**entry, "path": "rad/vqa.jsonl", "role": "alignment_vqa", "kind": "vqa"},
        {**entry, "path": "rad/test.jsonl", "role": "test_vqa", "kind": "vqa"},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    assert sorted(world_texts(tmp_path)) == ["Is there edema?", "No", "Small nodule."]
    with pytest.raises(InputError, match="manifest.json"):
        world_texts(tmp_path / "rad")


def test_sft_answer_loss_equals_the_models_own_loss(toy_dir):
    """SFT's loss from the chunked log-probs is the model's token-mean cross-entropy, gradients too."""
    from policy.train_sft import answer_loss

    model = load_policy(toy_dir).model.train()
    batch = load_policy(toy_dir).encode_for_training(_prompts(3), ["Yes.", "No, there is no edema.", "Nodule."],
                                                     _images(3))
    (want := model(**batch, use_cache=False).loss).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got, n = answer_loss(model, batch)
    got.backward()
    assert int(n) == int(batch["labels"][:, 1:].ne(IGNORE).sum())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)
