"""The reading probe measures reading: it learns a task the references answer, and not without them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from transformers import AutoTokenizer, LlavaForConditionalGeneration

from common.config import ConfigError
from policy.prompts import prompts_for
from toy.reading_probe import ReadingProbeConfig, accuracy, answer_rows, main, probe, read_prompts
from toy.toy_policy import ToyPolicyConfig, build_toy_policy


def _world(root: Path) -> Path:
    """Retrieval JSONL where the answer is whether the one reference names the finding."""
    rng = random.Random(0)
    files = []
    for role, n in (("policy_train", 400), ("val_vqa", 100)):
        rows = []
        for i in range(n):
            finding = rng.choice(["effusion", "nodule"])
            present = rng.random() < 0.5
            rows.append({"question_id": f"{role}{i}", "question": f"Is there {finding}?", "image": "x.png",
                         "answer": f"Yes, there is {finding}." if present else f"No, there is no {finding}.",
                         "reference_reports": [f"There is {finding}." if present else "The study is clear."]})
        path = root / f"{role}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append({"path": path.name, "role": role, "domain": "radiology", "kind": "vqa"})
    (root / "index.json").write_text(json.dumps({"files": files}))
    return root / "index.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reading")
    index = _world(root)
    texts = ["Is there effusion? Is there nodule? Yes, there is effusion. No, there is no nodule. The study is clear."] * 20
    policy = build_toy_policy(texts, root / "policy", _tiny())
    return index, policy


def _tiny(**kw) -> ToyPolicyConfig:
    return ToyPolicyConfig(text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1,
                           vision_heads=2, **kw)


def _cfg(setup, **kw) -> ReadingProbeConfig:
    index, policy = setup
    return ReadingProbeConfig(retrieval_index=str(index), val_roles=["val_vqa"], policy=str(policy),
                              steps=150, batch_size=16, lr=3e-3, eval_every=150, **kw)


def test_the_probe_learns_what_the_references_say(setup):
    got = probe(_cfg(setup))
    assert got["n_val"] == 100 and got["curve"][-1]["val_accuracy"] >= 0.9


def test_without_references_it_stays_near_chance(setup):
    got = probe(_cfg(setup, references=False))
    assert got["curve"][-1]["val_accuracy"] <= max(0.7, got["majority_answer_accuracy"] + 0.1)


def test_main_writes_the_curve(setup, tmp_path, monkeypatch):
    index, policy = setup
    out = tmp_path / "probe.json"
    monkeypatch.setattr("sys.argv", ["reading_probe", "--retrieval_index", str(index), "--val_roles", "[val_vqa]", "--policy", str(policy), "--steps", "4",
                                     "--eval_every", "2", "--batch_size", "8", "--out", str(out)])
    main()
    got = json.loads(out.read_text())
    assert [c["step"] for c in got["curve"]] == [2, 4] and got["n_val"] == 100 and got["config"]["steps"] == 4


def _reads(policy: Path, index: Path) -> float:
    """The built policy's val accuracy on the reading task, text only."""
    tokenizer = AutoTokenizer.from_pretrained(policy)
    x, y = read_prompts(str(index), ["val_vqa"], tokenizer, prompts_for(policy))
    model = LlavaForConditionalGeneration.from_pretrained(policy)
    return accuracy(model, x, y, answer_rows(tokenizer, str(policy)), tokenizer.pad_token_id) / len(y)


def test_toy_policy_reading_steps_teach_the_policy_itself_to_read(setup, tmp_path):
    index, policy = setup
    texts = ["Is there effusion? Is there nodule? Yes, there is effusion. No, there is no nodule. The study is clear."] * 20
    read = build_toy_policy(texts, tmp_path / "read", _tiny(reading_index=str(index), reading_steps=150, text_init_std=0.08))
    assert _reads(read, index) >= 0.9 and _reads(policy, index) <= 0.7


def test_reading_stops_at_its_target(setup, tmp_path):
    """With reading_target, reading ends at the first check (every 200 steps) that reaches it."""
    index, _ = setup
    texts = ["Is there effusion? Is there nodule? Yes, there is effusion. No, there is no nodule. The study is clear."] * 20
    read = build_toy_policy(texts, tmp_path / "read", _tiny(reading_index=str(index), reading_steps=2000,
                                                             reading_target=0.9, text_init_std=0.08))
    curve = json.loads((read / "reading.json").read_text())["curve"]
    assert curve[-1]["step"] < 2000 and curve[-1]["held_out_accuracy"] >= 0.9
    assert all(c["held_out_accuracy"] < 0.9 for c in curve[:-1]) and _reads(read, index) >= 0.9


def test_reading_steps_need_an_index(tmp_path):
    with pytest.raises(ConfigError, match="reading_index"):
        build_toy_policy(["a b c"] * 5, tmp_path / "p", _tiny(reading_steps=5))


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_short_reading_runs_have_a_schedule(setup, steps, tmp_path):
    """OneCycleLR divides by zero when its warm-up rounds to no step (20 steps at 5%)."""
    index, _ = setup
    build_toy_policy(["Is there effusion? Yes. No."] * 5, tmp_path / "p", _tiny(reading_index=str(index), reading_steps=steps))
