import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from common.config import ConfigError, cli_main
from common.io import InputError
from evaluation.infer import InferConfig, answer_queries, main, pick_adapter, read_queries
from policy.budget import BudgetLog
from policy.policy import Policy, PolicySpec
from retriever.select_k import KRule

BRIGHT, DARK = 220, 30


class Hit(NamedTuple):
    id: str
    text: str
    score: float


class StubRetriever:
    """Routes bright images to radiology and dark ones to pathology; each domain has 3 reports."""

    domains = ["radiology", "pathology"]

    def __init__(self):
        self.searched: list[tuple[str, int, KRule]] = []

    def route(self, images):
        return ["radiology" if np.asarray(im).mean() > 128 else "pathology" for im in images]

    def search(self, images, domain=None, k_rule=None):
        self.searched.append((domain, len(images), k_rule))
        hits = [Hit(f"{domain}-{i}", f"{domain} report {i}.", 0.9 - 0.1 * i) for i in range(3)]
        return [hits[: k_rule.k] for _ in images]


class EchoPolicy(Policy):
    """Answers with the prompt text, so the test sees what the policy was given."""

    def __init__(self, processor):
        super().__init__(model=None, processor=processor)

    def generate(self, images, prompts, max_new_tokens=64, batch_size=8, progress=False):
        return [p[0]["content"][1]["text"] for p in prompts]


def _image(path: Path, value: int) -> Path:
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path


def test_read_queries(tmp_path):
    _image(tmp_path / "a.png", BRIGHT)
    rows = [{"question_id": 7, "question": "Is there effusion?\n<image>", "answer": "No", "image": "a.png"},
            {"image_path": ["a.png", "b.png"], "id": "r1"},  # no question: a report
            {"question": "Any mass?"}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"q\.jsonl:3: no `image`"):
        read_queries(InferConfig(queries=str(path), image_root=str(tmp_path)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    q = read_queries(InferConfig(queries=str(path), image_root=str(tmp_path)))
    assert [x.task for x in q] == ["vqa", "report"] and q[0].question == "Is there effusion?"
    assert q[1].image_path == str(tmp_path / "a.png") and q[0].row["question_id"] == 7
    with pytest.raises(ConfigError):
        read_queries(InferConfig(queries=str(path), image=str(tmp_path / "a.png")))
    with pytest.raises(InputError, match="task"):
        read_queries(InferConfig(image="x.png", task="caption"))


def test_answer_queries_routes_retrieves_and_prompts(tmp_path, toy_processor):
    bright, dark = _image(tmp_path / "b.png", BRIGHT), _image(tmp_path / "d.png", DARK)
    cfg = InferConfig(queries="unused", k=KRule(rule="fixed", k=2))
    queries = [
        *read_queries(InferConfig(image=str(bright), question="Is there effusion?")),
        *read_queries(InferConfig(image=str(dark))),  # a report
        *read_queries(InferConfig(image=str(tmp_path / "missing.png"), question="Q?")),
        *read_queries(InferConfig(image=str(dark), question="Is there necrosis?", domain="radiology")),  # fixed
    ]
    retriever = StubRetriever()
    echo = EchoPolicy(toy_processor)
    rows = answer_queries(queries, retriever, echo, cfg, BudgetLog.of(echo, 0))
    assert [r.get("domain") for r in rows] == ["radiology", "pathology", None, "radiology"]
    assert "missing" in rows[2]["error"] and "prediction" not in rows[2]
    first = rows[0]
    assert first["reference_ids"] == ["radiology-0", "radiology-1"] and first["retrieve_k"] == 2
    assert first["reference_scores"] == [0.9, 0.8]
    assert "1. radiology report 0." in first["prediction"] and "Is there effusion?" in first["prediction"]
    assert rows[1]["task"] == "report" and "pathologist" in rows[1]["prediction"]
    assert sorted(d for d, _, _ in retriever.searched) == ["pathology", "radiology"]  # one search per domain
    no_rag = answer_queries(queries[:1], retriever, echo, InferConfig(image="x", rag=False), BudgetLog.of(echo, 0))
    assert no_rag[0]["reference_reports"] == [] and "1. " not in no_rag[0]["prediction"]
    with pytest.raises(InputError, match="no retriever"):
        answer_queries(queries[:1], None, echo, InferConfig(image="x", rag=False), BudgetLog.of(echo, 0))


def test_option_text_of_a_query_row(tmp_path, toy_processor):
    _image(tmp_path / "a.png", BRIGHT)
    options = "Please choose from the following two options: [yes, no]"
    rows = [{"question": "Is there effusion?", "image": "a.png", "text": options},
            {"question": "Is there effusion?", "image": "a.png", "text": "Is there effusion?"},  # only the question
            {"question": "Is there effusion?", "image": "a.png"}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for enabled in (True, False):
        cfg = InferConfig(queries=str(path), image_root=str(tmp_path), rag=False, domain="radiology",
                          option_text=enabled)
        texts = [r["prediction"] for r in answer_queries(read_queries(cfg), None, EchoPolicy(toy_processor), cfg,
                                                                BudgetLog(None, None))]
        assert ("Is there effusion? " + options in texts[0]) is enabled
        assert texts[1] == texts[2] and options not in texts[2] and texts[2].count("Is there effusion?") == 1


def _toy_adapter(root: Path) -> Path:
    """A toy DPO adapter where the defaults look for it (relative to the working directory)."""
    adapter = root / "outputs" / "toy" / "dpo" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (root / "outputs" / "toy" / "policy").mkdir()
    return adapter


def test_toy_adapter_only_for_the_toy_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _toy_adapter(tmp_path)
    mine = tmp_path / "mine"
    (mine / "adapter_config.json").parent.mkdir()
    (mine / "adapter_config.json").write_text("{}")
    assert pick_adapter(InferConfig())[0] == "outputs/toy/dpo/adapter"
    toy, other = PolicySpec(path=str(tmp_path / "outputs/toy/policy")), PolicySpec(path=str(tmp_path / "llava-med"))
    assert pick_adapter(InferConfig(policy=toy))[0] == "outputs/toy/dpo/adapter"
    adapter, why = pick_adapter(InferConfig(policy=other))
    assert adapter is None and "--adapter PATH" in why
    assert pick_adapter(InferConfig(policy=other, adapter=str(mine)))[0] == str(mine)
    assert pick_adapter(InferConfig(adapter="none"))[0] is None


# ---------------------------------------------------------------- the CLI on tiny trained stand-ins


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny world, three one-epoch retrievers + domain classifier, an untrained tiny policy."""
    from retriever import finetune_clip
    from tests.test_retriever_train import TINY_ARCH
    from toy.make_toy import make_world
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

    root = tmp_path_factory.mktemp("infer")
    world = make_world(root / "world", size="tiny", progress=False)
    cfg = {"clip": {"model": "tiny-infer-test", "model_config": TINY_ARCH}, "data": {"world": str(world)},
           "output_dir": str(root / "clip"), "epochs": 1, "batch_size": 8, "val_every": 1,
           "classifier": {"steps": 50}}
    (root / "clip.yaml").write_text(yaml.safe_dump(cfg))
    finetune_clip.main([str(root / "clip.yaml")])
    torch.manual_seed(0)
    build_toy_policy(world_texts(world), root / "policy",
                     ToyPolicyConfig(vocab_size=400, vision_width=32, vision_layers=1, text_width=32, text_layers=1))
    return root, world


def _run(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["infer", *argv])
    try:
        cli_main(main)
    except SystemExit as e:
        return int(e.code)
    return 0


def test_cli_end_to_end(tiny, monkeypatch, capsys):
    root, world = tiny
    test_vqa = world / "radiology" / "test_vqa_iu_xray.jsonl"
    first = json.loads(test_vqa.read_text().splitlines()[0])
    image = world / "radiology" / "images" / first["image"]
    common = ["--clip_dir", str(root / "clip"), "--cache_dir", str(root / "cache"), "--policy.path", str(root / "policy"),
              "--adapter", "none", "--max_new_tokens_vqa", "4", "--max_new_tokens_report", "4"]
    assert _run(monkeypatch, "--image", str(image), "--question", first["question"], *common) == 0
    out = capsys.readouterr().out
    assert "domain: " in out and "retrieved reports (k=" in out and "answer:" in out and "[0." in out
    queries = root / "queries.jsonl"
    queries.write_text("".join(line + "\n" for line in test_vqa.read_text().splitlines()[:3]))
    answers = root / "answers.jsonl"
    assert _run(monkeypatch, "--queries", str(queries), "--image_root", str(world / "radiology" / "images"),
                "--out", str(answers), *common) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 3 and all(r["domain"] in ("radiology", "pathology", "ophthalmology") for r in rows)
    assert all(1 <= r["retrieve_k"] <= 5 and len(r["reference_scores"]) == r["retrieve_k"] for r in rows)
    assert all(isinstance(r["prediction"], str) and r["question_id"] for r in rows)
    budget = json.loads(answers.with_suffix(".budget.json").read_text())
    assert budget["max_length"] == 1024 and budget["prompts"] == 3 and budget["refused"] == 0
    assert sorted(r["budget"]["prompt_tokens"] for r in rows)[1] == budget["prompt_tokens"]["p50"]
    # a budget one token short of the shortest prompt with its 4 new tokens: every prompt loses a reference
    max_length = min(r["budget"]["prompt_tokens"] for r in rows) + 4 - 1
    assert _run(monkeypatch, "--queries", str(queries), "--image_root", str(world / "radiology" / "images"),
                "--out", str(answers), "--max_length", str(max_length), *common) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    cut = [r["budget"] for r in rows]
    assert all(c["dropped"] + c["shortened"] >= 1 and c["prompt_tokens"] + 4 <= max_length for c in cut)
    budget = json.loads(answers.with_suffix(".budget.json").read_text())
    assert budget["references_dropped"] == sum(c["dropped"] for c in cut)
    assert budget["references_shortened"] == sum(c["shortened"] for c in cut) and budget["prompts_trimmed"] == 3


def test_cli_missing_outputs_exit_2(tiny, monkeypatch, capsys, tmp_path):
    root, world = tiny
    image = str(next((world / "pathology" / "images").rglob("*.png")))
    assert _run(monkeypatch, "--image", image, "--clip_dir", str(tmp_path / "no_clip")) == 2
    assert "finetune_clip.sh" in capsys.readouterr().err
    assert _run(monkeypatch, "--image", image, "--rag", "false", "--domain", "pathology",
                "--policy.path", str(tmp_path / "no_policy")) == 2
    assert "make_toy_policy.sh" in capsys.readouterr().err
    assert _run(monkeypatch, "--image", image, "--rag", "false", "--domain", "pathology", "--policy.path",
                str(root / "policy"), "--adapter", str(tmp_path / "no_adapter")) == 2
    assert "train_dpo.sh" in capsys.readouterr().err


def test_cli_bad_image_exits_2_once_before_loading_models(monkeypatch, capsys, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    # clip_dir and policy do not exist: the image is refused before either is looked at
    assert _run(monkeypatch, "--image", str(text), "--clip_dir", str(tmp_path / "no_clip"),
                "--policy.path", str(tmp_path / "no_policy")) == 2
    captured = capsys.readouterr()
    assert str(text) in captured.err and "finetune_clip.sh" not in captured.err
    assert "error" not in captured.out


def test_cli_other_policy_gets_no_toy_adapter(tiny, monkeypatch, capsys, tmp_path):
    """A toy DPO adapter sits in outputs/toy/dpo/adapter; a run with another policy does not apply it."""
    root, world = tiny
    monkeypatch.chdir(tmp_path)
    _toy_adapter(tmp_path)
    image = str(next((world / "pathology" / "images").rglob("*.png")))
    assert _run(monkeypatch, "--image", image, "--rag", "false", "--domain", "pathology", "--policy.path",
                str(root / "policy"), "--max_new_tokens_report", "2") == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"policy: {root / 'policy'}, no DPO adapter (") and "--adapter PATH" in header
