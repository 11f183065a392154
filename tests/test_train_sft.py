"""SFT and the oracle retrieval, on a tiny toy world and a tiny toy policy.

The full toy base policy (scripts/make_toy_policy.sh) is a slow test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from common.config import load_config
from common.io import InputError
from data.images import SKIPPED_KEY, load_image, resolve_image
from data.manifest import manifest_files
from data.noise import NoiseConfig, make_x_v_star
from data.readers import read_records
from data.records import VqaRecord
from policy.align import FindingAligner
from policy.budget import BUDGET_KEY, BudgetLog, answer_tokens
from policy.policy import IGNORE, Policy, load_policy
from policy.prompts import load_prompt_templates
from policy.train_sft import (
    FINDING_LABELS,
    MeasureConfig,
    _image_path,
    held_out,
    SftCollate,
    SftConfig,
    index_sources,
    measure_reliance,
    read_examples,
    reading_fn,
    run_sft,
    training_sources,
)
from toy.make_toy import make_world
from toy.oracle_retrieval import ToyRetrievalConfig, load_corpus, oracle_references, write_oracle_retrieval
from toy.toy_policy import TOY_PROMPTS, ToyPolicyConfig, build_toy_policy, world_texts

ROOT = Path(__file__).resolve().parent.parent
RETRIEVAL_KEYS = {"reference_reports", "retrieve_k", "domain", "reference_ids", "reference_scores"}


@pytest.fixture(autouse=True)
def fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("toy") / "world", size="tiny", progress=False)


@pytest.fixture(scope="module")
def oracle(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oracle")
    return write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(out), roles=["policy_train", "test_vqa"]))


@pytest.fixture(scope="module")
def policy_dir(world, tmp_path_factory) -> Path:
    cfg = ToyPolicyConfig(vocab_size=600, vision_width=32, vision_layers=1, vision_heads=2,
                          text_width=48, text_layers=2, text_heads=2)
    return build_toy_policy(world_texts(world), tmp_path_factory.mktemp("policy") / "init", cfg)


def sft_config(policy_dir: Path, oracle: Path, out: Path, *args: str) -> SftConfig:
    return load_config(SftConfig, [
        "--policy.path", str(policy_dir), "--data.retrieval_index", str(oracle), "--train.output_dir", str(out),
        "--train.batch_size", "8", "--train.lr", "3e-3", "--train.log_every", "1", "--train.progress", "false",
        "--train.warmup_ratio", "0", *args,
    ])


# ---------------------------------------------------------------- oracle retrieval


def test_oracle_retrieval_rows_follow_the_contract(world, oracle):
    index = json.loads(oracle.read_text())
    assert {e["role"] for e in index["files"]} == {"policy_train", "test_vqa"}
    for entry in index["files"]:
        source = read_records(entry["source"])
        rows = [json.loads(line) for line in Path(entry["path"]).read_text().splitlines()]
        assert len(rows) == len(source) == entry["records"]
        for rec, row in zip(source, rows):
            assert {k: row[k] for k in rec.raw} == rec.raw  # every query field, untouched
            assert RETRIEVAL_KEYS <= set(row) and row["domain"] == entry["domain"]
            assert row["retrieve_k"] == len(row["reference_reports"]) == len(set(row["reference_ids"])) == 3


def test_oracle_is_right_with_p_correct_and_deterministic(world):
    corpus = load_corpus(world, "pathology")
    by_id = {r.id: r for r in corpus}
    wanted = sorted({r.findings for r in corpus}, key=len)[-1]  # a finding set the corpus has
    for p, expect in ((1.0, 1.0), (0.0, None)):
        share = []
        for i in range(40):
            refs = oracle_references(f"q{i}", sorted(wanted), None, corpus, 3, p, seed=0)
            share += [by_id[r.id].findings == wanted for r in refs]
        rate = sum(share) / len(share)
        assert rate == expect if expect is not None else rate < 0.6
    a = oracle_references("q1", sorted(wanted), None, corpus, 3, 0.5, seed=0)
    assert a == oracle_references("q1", sorted(wanted), None, corpus, 3, 0.5, seed=0)
    assert a != oracle_references("q1", sorted(wanted), None, corpus, 3, 0.5, seed=1) or len(corpus) < 4


def test_oracle_agrees_on_the_asked_finding_when_no_study_matches(world):
    corpus = load_corpus(world, "ophthalmology")
    truth = ["made-up finding"]  # no corpus study has it: fall back to agreeing on the asked one
    refs = oracle_references("q", truth, "made-up finding", corpus, 3, 1.0, seed=0)
    assert all("made-up finding" not in r.findings for r in refs)


# ---------------------------------------------------------------- examples and batches


def test_examples_mix_references_and_mask_the_prompt(world, oracle, policy_dir):
    cfg = sft_config(policy_dir, oracle, world / "unused")
    examples = read_examples(training_sources(cfg.data), cfg.data, seed=0)
    n_train = sum(e["records"] for e in manifest_files(world, role="policy_train"))
    assert len(examples) == n_train
    share = sum(e.references is None for e in examples) / len(examples)
    assert 0.15 < share < 0.45  # no_reference_rate 0.3
    again = read_examples(training_sources(cfg.data), cfg.data, seed=0)
    assert [e.references is None for e in again] == [e.references is None for e in examples]
    assert {e.task for e in examples} == {"vqa", "report"}

    policy = load_policy(policy_dir)
    collate = SftCollate(policy, examples, cfg.policy.templates(), None)
    items = [{"index": i, "image": load_image(_path(examples[i]))} for i in range(4)]
    batch = collate(items)
    tok = policy.tokenizer
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        answer = labels[labels != IGNORE]
        assert answer[-1] == tok.eos_token_id and len(answer) < (row != tok.pad_token_id).sum()
        first = (labels != IGNORE).nonzero()[0, 0]
        assert (labels[:first] == IGNORE).all()


def test_sft_batches_fit_the_budget_with_whole_answers(world, oracle, policy_dir):
    cfg = sft_config(policy_dir, oracle, world / "unused", "--data.no_reference_rate", "0")
    examples = read_examples(training_sources(cfg.data), cfg.data, seed=0)[:4]
    policy = load_policy(policy_dir)
    templates = cfg.policy.templates()
    items = [{"index": i, "image": load_image(_path(examples[i]))} for i in range(4)]
    whole = dict(SftCollate(policy, examples, templates, None)(items)[BUDGET_KEY])
    sequences = [whole[e.record.source].prompt_tokens + answer_tokens(policy, [e.answer]) for e in examples]
    max_length = min(sequences) - 1  # every record must lose something
    batch = SftCollate(policy, examples, templates, max_length)(items)
    notes = [note for _, note in batch[BUDGET_KEY]]
    assert all(n.dropped + n.shortened >= 1 and not n.refused for n in notes)
    assert batch["attention_mask"].sum(1).max() <= max_length
    tok = policy.tokenizer
    for row, e in zip(batch["labels"], examples):
        assert tok.decode(row[row != IGNORE], skip_special_tokens=True) == e.answer
    assert set(SftCollate(policy, examples, templates, 10)(items)) == {BUDGET_KEY, SKIPPED_KEY}  # all refused


def _path(example):
    return resolve_image(example.record.images[0], example.record.image_root, None)


def test_conversation_json_is_read(tmp_path, world):
    image = manifest_files(world, role="policy_train", domain="pathology", kind="vqa")[0]
    rec = read_records(image["path"])[0]
    conv = [{"id": "c1", "image": rec.images[0], "image_root": image["image_root"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the slide."}, {"from": "gpt", "value": "Dense fibrosis."}]}]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    cfg = load_config(SftConfig, ["--data.files", f"[{path}]", "--data.domain", "pathology"])
    (ex,) = read_examples(training_sources(cfg.data), cfg.data, seed=0)
    assert (ex.task, ex.question, ex.answer, ex.domain) == ("conversation", "Describe the slide.", "Dense fibrosis.", "pathology")
    path.write_text(json.dumps(conv + [{"id": "c2", "image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    skipped = []
    (ex,) = read_examples(training_sources(cfg.data), cfg.data, seed=0, skipped=skipped)  # the bad one skipped, named
    assert ex.record.id == "c1" and len(skipped) == 1 and "conv.json:[1]: needs `image` and a human turn" in skipped[0]
    strict = load_config(SftConfig, ["--data.files", f"[{path}]", "--data.domain", "pathology", "--data.bad_record", "error"])
    with pytest.raises(InputError, match=r"conv.json:\[1\]"):
        read_examples(training_sources(strict.data), strict.data, seed=0)


# ---------------------------------------------------------------- training


def test_full_sft_lowers_the_loss_and_saves_an_auto_loadable_model(world, oracle, policy_dir, tmp_path):
    out = tmp_path / "full"
    cfg = sft_config(policy_dir, oracle, out, "--train.epochs", "3", "--lora.enabled", "false",
                     "--lora.train_projector", "true", "--data.val_fraction", "0.3", "--data.limit", "10",
                     "--data.val_reading", "50")
    run_sft(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3])
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all(0 <= r["eval_reading"] <= 1 for r in rows if "eval_loss" in r)  # held-out VQA asked bare
    assert (out / "run_config.yaml").is_file()
    assert json.loads((out / "bad_records.json").read_text()) == {"bad_records": {"count": 0, "records": []}}
    assert (out / "prompts.yaml").read_text() == TOY_PROMPTS.read_text()  # tuned with the toy's wording, kept with it
    model = AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    start = AutoModelForImageTextToText.from_pretrained(policy_dir)
    vision = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    lm = "model.language_model.layers.0.mlp.up_proj.weight"
    params, before = dict(model.named_parameters()), dict(start.named_parameters())
    assert torch.equal(params[vision], before[vision])  # vision tower frozen by default
    assert not torch.equal(params[lm], before[lm])


def test_lora_sft_adapter_reloads_with_peft_and_merges(world, oracle, policy_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = sft_config(policy_dir, oracle, out, "--train.max_steps", "3", "--lora.r", "4", "--lora.alpha", "8",
                     "--data.limit", "8", "--merge", "true")
    run_sft(cfg)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForImageTextToText.from_pretrained(policy_dir)
    model = PeftModel.from_pretrained(base, out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert (out / "checkpoints" / "step-00000003" / "model" / "adapter_config.json").is_file()
    budget = json.loads((out / "run_summary.json").read_text())["budget"]
    assert budget["max_length"] == budget["model_limit"] == 1024 and budget["refused"] == 0
    assert budget["prompts"] >= 8 and budget["prompt_tokens"]["max"] < 1024


class _ScriptedMeasurePolicy(Policy):
    """Answers a VQA prompt from the image it is shown: the gold answer for a known real image
    without references, the gold answer with references except in radiology ("Unsure."), and
    "Unsure." for an image that is none of the real ones (x_v*). Keeps what it was shown."""

    def __init__(self, processor, gold: dict[bytes, dict[str, tuple[str, str]]]):
        super().__init__(model=None, processor=processor)
        self.gold, self.seen = gold, []

    def generate(self, images, prompts, max_new_tokens=64, batch_size=8, progress=False):
        out = []
        for img, messages in zip(images, prompts):
            text = messages[0]["content"][1]["text"]
            refs = re.search(r"^1\. ", text, re.M) is not None
            known = [da for q, da in self.gold.get(np.asarray(img).tobytes(), {}).items() if q in text]
            self.seen.append((refs, img))
            domain, answer = known[0] if len(known) == 1 else ("", "Unsure.")
            out.append("Unsure." if refs and domain == "radiology" else answer)
        return out


def scripted_policy(examples, policy_dir: Path) -> _ScriptedMeasurePolicy:
    """A _ScriptedMeasurePolicy that knows the gold answer of each example by its image and question."""
    gold: dict[bytes, dict[str, tuple[str, str]]] = {}  # image -> question -> (domain, gold answer)
    for e in examples:
        gold.setdefault(np.asarray(load_image(str(_image_path(e)))).tobytes(), {})[e.record.question] = (e.domain, e.answer)
    return _ScriptedMeasurePolicy(load_policy(policy_dir).processor, gold)


def test_measure_reliance_on_a_scripted_policy(world, oracle, policy_dir):
    """The three accuracies of a policy whose answers are known; x_v* is data.noise.make_x_v_star's."""
    sft = load_config(SftConfig, ["--data.retrieval_index", str(oracle), "--data.no_reference_rate", "0",
                                  "--data.limit", "6"])
    data = sft.data
    examples = read_examples(index_sources(oracle, ["test_vqa"]), data, seed=0, vqa_only=True)
    paths = [str(_image_path(e)) for e in examples]
    policy = scripted_policy(examples, policy_dir)
    assert sum(map(len, policy.gold.values())) == len(examples)  # image and question tell every record apart
    cfg = MeasureConfig(max_new_tokens=3, sigma=0.05, seed=4)
    result = measure_reliance(policy, examples, cfg, sft.policy.templates(), BudgetLog.of(policy, 0))
    n, n_rad = len(examples), sum(e.domain == "radiology" for e in examples)
    assert result["all"]["n"] == n == 6 * 4 and n_rad == 12  # 4 test VQA files (radiology has two)
    assert result["budget"]["prompts"] == 2 * n and result["budget"]["refused"] == 0  # with and without
    assert result["all"]["no_retrieval"] == 1.0
    assert result["all"]["retrieval"] == pytest.approx((n - n_rad) / n)
    assert result["all"]["noised_retrieval"] == 0.0  # x_v* is none of the real images
    assert result["radiology"]["retrieval"] == 0.0 and result["pathology"]["retrieval"] == 1.0
    assert [refs for refs, _ in policy.seen] == [False, True, True] * n
    # the noised image of each record is data.noise's x_v*, drawn from its domain's images
    noise = NoiseConfig(sigma=cfg.sigma, seed=cfg.seed)
    for i, e in enumerate(examples):
        pool = {x.record.images[0]: p for x, p in zip(examples, paths) if x.domain == e.domain}
        want = make_x_v_star(e.record.images[0], load_image(paths[i]), noise, pool, load_image, salt="measure")
        assert np.asarray(policy.seen[3 * i + 2][1]).tobytes() == np.asarray(want).tobytes()


def test_records_of_one_image_are_held_out_together(world, oracle):
    sft = load_config(SftConfig, ["--data.retrieval_index", str(oracle)])
    examples = read_examples(index_sources(oracle, ["policy_train"]), sft.data, seed=0)
    held = held_out(examples, 0.2, seed=0)
    by_image: dict[str, set[bool]] = {}
    for e, h in zip(examples, held):
        by_image.setdefault(str(_image_path(e)), set()).add(h)
    assert max(len(v) for v in by_image.values()) == 1  # never split
    assert len(by_image) < len(examples)  # images do carry several records here
    share = sum(v == {True} for v in by_image.values()) / len(by_image)
    assert 0.1 < share < 0.3
    assert held_out(examples, 0.0, seed=0) == [False] * len(examples)


def test_reading_asks_held_out_questions_without_references(world, oracle, policy_dir):
    """eval_reading is the accuracy of answers to the bare question: a policy right only from the
    image scores 1; one answering "yes" to everything scores the share of "yes" answers."""
    sft = load_config(SftConfig, ["--data.retrieval_index", str(oracle), "--data.no_reference_rate", "0",
                                  "--data.limit", "6"])
    examples = read_examples(index_sources(oracle, ["test_vqa"]), sft.data, seed=0, vqa_only=True)
    policy = scripted_policy(examples, policy_dir)
    templates = sft.policy.templates()
    assert reading_fn(policy, examples, templates, None, MeasureConfig())(None) == {"eval_reading": 1.0}
    assert [refs for refs, _ in policy.seen] == [False] * len(examples) == [False] * 24
    policy.generate = lambda images, prompts, *a, **k: ["Yes."] * len(prompts)
    yes = sum(e.answer.lower().startswith("yes") for e in examples) / len(examples)
    assert 0 < yes < 1
    assert reading_fn(policy, examples, templates, None, MeasureConfig())(None) == {"eval_reading": pytest.approx(yes)}


@pytest.mark.slow
def test_make_toy_policy(tmp_path):
    """The toy base policy end to end: loads through the Auto classes and leans on references."""
    world = make_world(tmp_path / "world", size="tiny", progress=False)
    cmd = ["bash", "scripts/make_toy_policy.sh", "--world", str(world), "--out", str(tmp_path / "policy"),
           "--reading_steps", "20", "--train.max_steps", "20", "--measure.limit", "10", "--reference_k", "1",
           "--p_correct", "0.9"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    oracle = [json.loads(line) for f in sorted((tmp_path / "oracle_retrieval").glob("*_vqa*.jsonl"))
              for line in f.read_text().splitlines()]
    assert oracle and {r["retrieve_k"] for r in oracle} == {1}  # the script's option, given after the SFT's
    assert yaml.safe_load((tmp_path / "oracle_retrieval" / "run_config.yaml").read_text())["p_correct"] == 0.9
    policy = tmp_path / "policy"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(policy), torch.nn.Module)
    assert_tokenizer_round_trips(AutoProcessor.from_pretrained(policy), world)
    reliance = json.loads((policy / "reliance.json").read_text())
    assert reliance["all"]["n"] > 0
    assert all(0.0 <= reliance["all"][c] <= 1.0 for c in ("no_retrieval", "retrieval", "noised_retrieval"))


def assert_tokenizer_round_trips(processor, world: Path) -> None:
    """A toy sentence (a world text and one with unseen words) decodes to itself, byte for byte."""
    tok = processor.tokenizer
    for sentence in (world_texts(world)[0], "Is there a zebra-like opacity? Yes: 3 mm, (left) lobe."):
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == sentence


def test_toy_policy_saves_a_folder_the_auto_classes_load(world, policy_dir):
    assert isinstance(AutoModelForImageTextToText.from_pretrained(policy_dir), torch.nn.Module)
    assert (policy_dir / "prompts.yaml").read_text() == TOY_PROMPTS.read_text()
    assert_tokenizer_round_trips(AutoProcessor.from_pretrained(policy_dir), world)


# ---------------------------------------------------------------- finding alignment (policy.align)


def test_finding_aligner_labels_prior_and_a_loss_the_projector_can_lower(world, oracle, policy_dir):
    cfg = sft_config(policy_dir, oracle, Path("unused"), "--data.limit", "40")
    examples = [e for e in read_examples(training_sources(cfg.data), cfg.data, seed=0) if e.task == "vqa"]
    policy = load_policy(str(policy_dir))
    aligner = FindingAligner([e.record for e in examples], [e.domain for e in examples], policy.tokenizer)
    assert {d for d, _ in aligner.names} == {e.domain for e in examples}
    y = aligner.labels([e.record for e in examples], [e.domain for e in examples])
    for e, row in zip(examples, y):
        assert {aligner.names[i][1] for i in row.nonzero().flatten().tolist()} == set(e.record.meta["findings"])
    rare = y.mean(0) < 0.5
    assert (aligner.prior[rare] < 0).all()  # the fixed prior is the log-odds of each finding

    hook = aligner.attach(policy.model)
    projector = policy.model.model.multi_modal_projector
    opt = torch.optim.Adam(projector.parameters(), lr=1e-2)
    images = [load_image(str(_path(e))).convert("RGB") for e in examples]
    batch = policy.encode_for_training([e.parts().prompt(load_prompt_templates()) for e in examples],
                                       [e.answer for e in examples], images)
    losses = []
    for _ in range(30):  # only the projector learns: the loss reaches it through the hooked features
        policy.model(**batch, use_cache=False)
        loss = aligner.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    unknown = y.clone()
    unknown[:3] = float("nan")  # images whose findings are not known (x_v*) are left out of the loss
    with torch.no_grad():
        policy.model(**batch, use_cache=False)
        features = aligner._features
        left_out = aligner.loss(unknown)
        aligner._features = features[3:]
        assert left_out.item() == pytest.approx(aligner.loss(y[3:]).item(), rel=1e-5)
        policy.model(**batch, use_cache=False)
        assert aligner.loss(torch.full_like(y, float("nan"))).item() == 0.0
    hook.remove()
    with pytest.raises(RuntimeError, match="before a forward pass"):
        aligner.loss(y)


def test_noised_reference_records_train_on_x_v_star_without_finding_labels(world, oracle, policy_dir):
    """A share of the records with references is trained on another image + noise, the answer kept."""
    cfg = sft_config(policy_dir, oracle, Path("unused"), "--data.no_reference_rate", "0.3",
                     "--data.noised_reference_rate", "0.5", "--data.limit", "40")
    examples = read_examples(training_sources(cfg.data), cfg.data, seed=0)
    noised = [e.noised for e in examples]
    assert not any(e.noised for e in examples if e.references is None)
    assert 0.3 < sum(noised) / sum(e.references is not None for e in examples) < 0.7
    assert noised == [e.noised for e in read_examples(training_sources(cfg.data), cfg.data, seed=0)]
    assert noised != [e.noised for e in read_examples(training_sources(cfg.data), cfg.data, seed=1)]

    policy = load_policy(str(policy_dir))
    aligner = FindingAligner([e.record for e in examples], [e.domain for e in examples], policy.tokenizer)
    collate = SftCollate(policy, examples, cfg.policy.templates(), None, aligner, NoiseConfig(seed=0))
    picked = [i for i, e in enumerate(examples) if e.noised][:2] + [i for i, e in enumerate(examples) if not e.noised][:2]
    items = [{"index": i, "image": load_image(_path(examples[i])).convert("RGB")} for i in picked]
    labels = collate(items)[FINDING_LABELS]
    assert labels[:2].isnan().all() and not labels[2:].isnan().any()
    e, real = examples[picked[0]], items[0]["image"]
    x_v_star = collate._x_v_star(e, real)
    assert x_v_star.size == real.size and x_v_star.tobytes() != real.tobytes()
    assert x_v_star.tobytes() == collate._x_v_star(e, real).tobytes()  # a function of the record
    alone = SftCollate(policy, [e], cfg.policy.templates(), None, aligner, NoiseConfig(seed=0))
    batch = alone([{"index": 0, "image": real}])  # no other image of its domain: the sample is skipped, named
    assert [bad.reason for bad in batch[SKIPPED_KEY]] == ["no_other_image"] and "input_ids" not in batch


def test_x_v_star_is_the_same_wherever_the_world_lies(world, oracle, policy_dir, tmp_path):
    """x_v* is drawn by the image as the record writes it, not by the folder the world was copied
    to: the same chain built in two checkouts trains on the same images."""
    cfg = sft_config(policy_dir, oracle, Path("unused"), "--data.no_reference_rate", "0",
                     "--data.noised_reference_rate", "1.0", "--data.limit", "8")
    examples = [e for e in read_examples(training_sources(cfg.data), cfg.data, seed=0) if e.domain == "pathology"]
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(examples[0].record.image_root, moved)
    copies = [dataclasses.replace(e, record=dataclasses.replace(e.record, image_root=str(moved))) for e in examples]
    assert str(_path(copies[0])) != str(_path(examples[0]))
    policy = load_policy(str(policy_dir))
    here, there = (SftCollate(policy, ex, cfg.policy.templates(), None, None, NoiseConfig(seed=0))
                   for ex in (examples, copies))
    for e, c in zip(examples, copies):
        real = load_image(_path(e)).convert("RGB")
        assert here._x_v_star(e, real).tobytes() == there._x_v_star(c, real).tobytes()


def test_sft_with_finding_alignment_logs_both_losses(world, oracle, policy_dir, tmp_path):
    out = tmp_path / "align"
    run_sft(sft_config(policy_dir, oracle, out, "--train.epochs", "1", "--lora.enabled", "false",
                       "--lora.train_vision", "true", "--lora.train_projector", "true", "--data.limit", "10",
                       "--align_findings", "1.0"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert rows and all({"answer_loss", "align_loss"} <= set(r) for r in rows)
    r = rows[0]
    assert r["loss"] == pytest.approx(r["answer_loss"] + r["align_loss"], rel=1e-4)
    AutoModelForImageTextToText.from_pretrained(out)  # the hook left nothing in the saved model


def test_finding_alignment_needs_findings(policy_dir):
    record = VqaRecord(id="1", question="Is there fibrosis?", answer="yes", images=["x.png"])
    with pytest.raises(InputError, match="findings"):
        FindingAligner([record], ["pathology"], load_policy(str(policy_dir)).tokenizer)
