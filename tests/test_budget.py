"""The token budget (policy.budget) on a tiny toy LLaVA and a tiny Qwen2-VL: counting as the processor
expands images, dropping and shortening references, refusing what cannot fit, the default budget,
training pairs, generation and the summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from common.config import ConfigError
from data.images import BadImageLog
from dpo.pair_data import PairCollator, load_pairs, prompt_parts
from evaluation.infer import InferConfig, answer_queries, read_queries
from policy.budget import (
    BUDGET_KEY, MIN_WORDS, BudgetLog, Note, PromptParts, answer_tokens, budget_for, fit_prompt, percentiles,
    policy_limit,
)
from policy.policy import IGNORE, Policy, load_policy
from policy.prompts import load_prompt_templates
from retriever.select_k import KRule
from tests.test_infer import StubRetriever
from tests.test_policy import _images, _texts
from tests.tiny_qwen2vl import build_tiny_qwen2vl
from toy.toy_policy import ToyPolicyConfig, build_toy_policy

POSITIONS = 400  # the toy's own limit: its text config's max_position_embeddings
QUESTION = "Is there pleural effusion in this image?"
REFS = tuple(
    f"Study {i}: the heart size is normal and there is nodule in the left lower lobe with no edema, "
    f"no pneumothorax and a small pleural effusion on the right side seen on view {i}." for i in range(1, 6)
)
TEMPLATES = load_prompt_templates()
PARTS = PromptParts("radiology", "vqa", QUESTION, REFS)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    cfg = ToyPolicyConfig(vocab_size=400, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                          text_layers=1, text_heads=2, max_positions=POSITIONS)
    return load_policy(build_toy_policy(_texts() + list(REFS), tmp_path_factory.mktemp("budget") / "p", cfg))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_policy(build_tiny_qwen2vl(_texts() + list(REFS), tmp_path_factory.mktemp("budget") / "qwen"))


def processed(policy: Policy, prompt, image: Image.Image) -> int:
    """The prompt's length as the processor itself makes it (image tokens expanded)."""
    return policy.processor(images=[image.convert("RGB")], text=[policy.render(prompt)], return_tensors="pt")[
        "input_ids"].shape[1]


def lengths(policy: Policy, image: Image.Image) -> list[int]:
    """Processor length of PARTS' prompt with the first m references, m = 0..5."""
    return [processed(policy, PARTS.prompt(TEMPLATES, REFS[:m]), image) for m in range(len(REFS) + 1)]


def test_counts_are_the_processors_with_its_image_tokens(policy, qwen):
    image = _images(1)[0]
    full = fit_prompt(policy, PARTS, TEMPLATES, [image], None, 0)
    assert full.note == Note(processed(policy, full.prompt, image), 5, 0, 0)
    text_only = len(policy.tokenizer(policy.render(full.prompt)).input_ids)
    assert full.note.prompt_tokens - text_only == policy.model.config.image_seq_length - 1  # <image> -> 4 patches
    # Qwen2-VL: the grid (so the count) follows the image size
    square, wide = image, Image.new("RGB", (70, 50))
    counts = [fit_prompt(qwen, PARTS, TEMPLATES, [im], None, 0).note.prompt_tokens for im in (square, wide)]
    assert counts == [processed(qwen, full.prompt, square), processed(qwen, full.prompt, wide)]
    assert counts[0] != counts[1]
    # several images: the prompt must fit with each, so the longest count is the prompt's
    assert fit_prompt(qwen, PARTS, TEMPLATES, [square, wide], None, 0).note.prompt_tokens == max(counts)


def test_references_are_dropped_from_the_last_one(policy):
    image = _images(1)[0]
    lens = lengths(policy, image)
    reserve = 16
    fit = fit_prompt(policy, PARTS, TEMPLATES, [image], lens[3] + reserve + 2, reserve)  # 2 tokens: no stub fits
    assert fit.references == REFS[:3]
    assert fit.note == Note(lens[3], 5, 2, 0)
    assert fit.prompt == PARTS.prompt(TEMPLATES, REFS[:3])
    assert fit_prompt(policy, PARTS, TEMPLATES, [image], lens[5] + reserve, reserve).note == Note(lens[5], 5, 0, 0)


def test_the_last_kept_reference_is_shortened_by_words(policy):
    image = _images(1)[0]
    lens = lengths(policy, image)
    reserve = 16
    room = lens[3] + (lens[4] - lens[3]) // 2
    fit = fit_prompt(policy, PARTS, TEMPLATES, [image], room + reserve, reserve)
    assert fit.references[:3] == REFS[:3] and len(fit.references) == 4
    words = REFS[3].split()
    kept = fit.references[3].split()
    assert MIN_WORDS <= len(kept) < len(words) and kept == words[: len(kept)]
    assert fit.note == Note(processed(policy, fit.prompt, image), 5, 1, 1)
    assert fit.note.prompt_tokens <= room
    one_more = PARTS.prompt(TEMPLATES, [*REFS[:3], " ".join(words[: len(kept) + 1])])
    assert processed(policy, one_more, image) > room  # as many words as fit, not fewer


def test_question_and_image_tokens_are_never_cut(policy):
    image = _images(1)[0]
    answer = "No, there is no pleural effusion."
    reserve = answer_tokens(policy, [answer])
    bare = lengths(policy, image)[0]
    fit = fit_prompt(policy, PARTS, TEMPLATES, [image], bare + reserve, reserve)
    assert fit.references == () and fit.note == Note(bare, 5, 5, 0)
    assert QUESTION in policy.render(fit.prompt)
    batch = policy.encode_for_training([fit.prompt], [answer], [image])
    assert batch["input_ids"].shape[1] == bare + reserve  # exactly the budget, nothing cut
    image_id = policy.model.config.image_token_id
    assert int(batch["input_ids"].eq(image_id).sum()) == policy.model.config.image_seq_length
    labels = batch["labels"][0]
    assert policy.tokenizer.decode(labels[labels != IGNORE], skip_special_tokens=True) == answer
    # one token less: refused, not cut
    refused = fit_prompt(policy, PARTS, TEMPLATES, [image], bare + reserve - 1, reserve)
    assert refused.prompt is None and refused.references == ()
    assert refused.refused == f"prompt {bare} tokens without references + {reserve} answer tokens > max_length {bare + reserve - 1}"
    # a plain-text prompt (references in it cannot be told apart) is kept whole or refused
    text = PromptParts(text=TEMPLATES.text("radiology", "vqa", QUESTION, list(REFS)))
    whole = fit_prompt(policy, text, TEMPLATES, [image], None, 0).note.prompt_tokens
    assert fit_prompt(policy, text, TEMPLATES, [image], whole + 4, 4).note == Note(whole, 0, 0, 0)
    assert "plain-text" in fit_prompt(policy, text, TEMPLATES, [image], whole + 3, 4).refused


def test_default_budget_is_the_models_own_limit(policy, qwen):
    tok = policy.tokenizer
    assert tok.model_max_length == POSITIONS
    tok.model_max_length = 5000  # the config's max_position_embeddings wins over the tokenizer
    try:
        assert BudgetLog.of(policy, 0).max_length == policy_limit(policy) == POSITIONS
        assert BudgetLog.of(policy, 10_000).max_length == POSITIONS  # never above the model's limit
        assert BudgetLog.of(policy, 200).max_length == 200
        assert policy_limit(Policy(model=None, processor=policy.processor)) == 5000  # model-free: the tokenizer's
        tok.model_max_length = VERY_LARGE_INTEGER  # transformers' "no limit"
        assert policy_limit(Policy(model=None, processor=policy.processor)) is None
    finally:
        tok.model_max_length = POSITIONS
    assert budget_for(0, None) is None and budget_for(300, None) == 300
    with pytest.raises(ConfigError, match="max_length"):
        budget_for(-1, POSITIONS)
    assert BudgetLog.of(qwen, 0).max_length == qwen.model.config.get_text_config().max_position_embeddings == 1024
    # the default budget does cut: five references do not fit 400 tokens with 96 new ones
    image = _images(1)[0]
    fit = fit_prompt(policy, PARTS, TEMPLATES, [image], BudgetLog.of(policy, 0).max_length, 96)
    assert lengths(policy, image)[5] + 96 > POSITIONS
    assert fit.note.dropped >= 1 and fit.note.prompt_tokens + 96 <= POSITIONS


# ---------------------------------------------------------------- training pairs


def _pairs_file(root: Path, chosen: str, rejected: str) -> Path:
    """Two pairs on one image: ours (question and references named) and a released one (plain text)."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(root / "x.png")
    text = TEMPLATES.text("radiology", "vqa", QUESTION, list(REFS))
    turns = lambda answer: [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": answer}]  # noqa: E731
    ours = {"id": "ours", "image": "x.png", "image_root": str(root), "conversations": turns(chosen),
            "rejected_conversations": turns(rejected), "rejected_noised": 0, "pair_type": "oa1",
            "domain": "radiology", "task": "vqa", "question": QUESTION, "references": list(REFS)}
    released = {"id": "released", "image": "x.png", "image_root": str(root), "conversations": turns(chosen),
                "rejected_conversations": turns(rejected), "rejected_noised": 0}
    path = root / "pairs.json"
    path.write_text(json.dumps([ours, released]))
    return path


def test_a_pair_that_does_not_fit_loses_references_or_is_refused_never_an_answer(policy, tmp_path):
    chosen = "Yes, there is a small pleural effusion on the right side and the heart size is normal."
    rejected = "No."
    records = load_pairs([_pairs_file(tmp_path, chosen, rejected)])
    assert prompt_parts(records[0], TEMPLATES) == PARTS
    assert prompt_parts(records[1], TEMPLATES).text == records[1].prompt
    image = _images(1)[0]
    reserve = answer_tokens(policy, [chosen, rejected])
    max_length = lengths(policy, image)[2] + reserve  # two references fit with the longer answer
    collate = PairCollator(records, policy.processor, ["oa", "oa1"], TEMPLATES, max_length)
    items = [{"image": image, "rejected_image": image, "index": i} for i in (0, 1)]
    batch = collate(items)
    (ours, n_ours), (released, n_released) = batch[BUDGET_KEY]
    assert (ours, released) == (records[0].source, records[1].source)
    assert n_ours == Note(lengths(policy, image)[2], 5, 3, 0)
    assert n_released.refused and "plain-text" in n_released.refused
    inputs = batch["inputs"]
    assert batch["index"].tolist() == [0] and inputs["input_ids"].shape[0] == 2  # the released pair left out
    assert inputs["attention_mask"].sum(1).max() <= max_length
    tok = policy.tokenizer
    for row, answer in zip(inputs["labels"], (chosen, rejected)):  # both answers whole
        assert tok.decode(row[row != IGNORE], skip_special_tokens=True) == answer
    log = BudgetLog(max_length, POSITIONS)
    assert log.take(batch) is batch and BUDGET_KEY not in batch
    assert log.take(BadImageLog().take(collate([items[1]]))) is None  # nothing fits: no step, the pair counted
    summary = log.summary()
    assert (summary["prompts"], summary["refused"], summary["references_dropped"]) == (2, 1, 3)
    assert summary["refused_records"] == [{"record": records[1].source, "reason": n_released.refused}]


def test_pair_prompt_written_with_other_templates_is_plain_text(tmp_path):
    records = load_pairs([_pairs_file(tmp_path, "Yes.", "No.")])
    other = dataclasses.replace(records[0], prompt=records[0].prompt + " Be brief.")
    assert prompt_parts(other, TEMPLATES) == PromptParts(text=other.prompt)


# ---------------------------------------------------------------- generation


def test_generation_keeps_prompt_plus_new_tokens_within_the_budget(policy, tmp_path, monkeypatch):
    Image.fromarray(np.full((16, 16, 3), 220, np.uint8)).save(tmp_path / "b.png")
    queries = read_queries(InferConfig(image=str(tmp_path / "b.png"), question=QUESTION))
    cfg = InferConfig(image="x", k=KRule(rule="fixed", k=3), max_new_tokens_vqa=6)
    full = answer_queries(queries, StubRetriever(), policy, cfg, BudgetLog(None, POSITIONS))[0]
    max_length = full["budget"]["prompt_tokens"] + 6 - 1  # one token over: the last report goes
    widths = []
    generate = policy.model.generate

    def watched(**kw):
        out = generate(**kw)
        widths.append((kw["input_ids"].shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(policy.model, "generate", watched)
    log = BudgetLog(max_length, POSITIONS)
    row = answer_queries(queries, StubRetriever(), policy, cfg, log)[0]
    assert row["budget"]["dropped"] == 1 and row["budget"]["prompt_tokens"] + 6 <= max_length
    ((width, total),) = widths
    assert width == row["budget"]["prompt_tokens"] and width + 6 <= max_length and total <= max_length
    assert log.summary()["references_dropped"] == 1
    refused = BudgetLog(7, POSITIONS)
    widths.clear()
    row = answer_queries(queries, StubRetriever(), policy, cfg, refused)[0]
    assert "prompt too long" in row["error"] and widths == []  # nothing ran
    assert refused.summary()["refused"] == 1


# ---------------------------------------------------------------- the summary


def test_summary_counts_each_prompt_once_with_nearest_rank_percentiles():
    log = BudgetLog(100, 128)
    notes = [("a", Note(10, 0, 0, 0)), ("b", Note(20, 3, 1, 0)), ("c", Note(30, 3, 0, 1)), ("d", Note(40, 3, 2, 1)),
             ("e", Note(90, 3, 3, 0, "too long"))]
    for _ in range(2):  # a second epoch encodes the same prompts again
        assert log.take({"inputs": 1, BUDGET_KEY: notes}) == {"inputs": 1}
    assert log.take({BUDGET_KEY: notes[:1]}) is None
    assert log.merged(SimpleNamespace(num_processes=1)).notes == log.notes
    assert log.summary() == {
        "max_length": 100, "model_limit": 128, "prompts": 5, "prompts_trimmed": 3, "references_dropped": 3,
        "references_shortened": 2, "refused": 1, "refused_records": [{"record": "e", "reason": "too long"}],
        "prompt_tokens": {"p50": 20, "p90": 40, "max": 40},
        "prompt_tokens_with_references": {"p50": 30, "p90": 40, "max": 40},
    }
    assert percentiles([]) == {"p50": None, "p90": None, "max": None}
    assert percentiles(list(range(1, 11))) == {"p50": 5, "p90": 9, "max": 10}
    assert Note(**json.loads(json.dumps(Note(1, 2, 3, 4)._asdict()))) == Note(1, 2, 3, 4)
