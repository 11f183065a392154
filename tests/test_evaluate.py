import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ConfigError, cli_main, save_config
from common.io import InputError
from evaluation.evaluate import (
    CONDITIONS, METRIC_KEYS, EvalConfig, check_adapter_base, check_java, condition_k, diagnostics, eval_files, evaluate,
    main,
)
from evaluation.plots import plot_clip_curves, plot_dpo_curves
from policy.policy import Policy, PolicySpec
from policy.prompts import build_prompt

# ---------------------------------------------------------------- hand-made files, scripted policy


def _image(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path.name


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _retrieval(refs: list[str], scores: list[float]) -> dict:
    return {"reference_reports": refs, "retrieve_k": len(refs), "domain": "radiology",
            "reference_ids": [f"r{i}" for i in range(len(refs))], "reference_scores": scores}


BRIGHT, DARK = 220, 30
SCORES = [0.9, 0.5, 0.49]  # gap rule (gamma 0.1): log(0.9/0.5) > 0.1, so adaptive k = 1


@pytest.fixture
def hand_world(tmp_path):
    """Retrieval JSONL of 6 VQA records (one open question, one missing image) and 2 reports."""
    images = tmp_path / "images"
    bright, dark = _image(images / "bright.png", BRIGHT), _image(images / "dark.png", DARK)
    _image(images / "bright2.png", BRIGHT)
    _image(images / "dark2.png", DARK)
    yes_refs, no_refs = ["Yes finding.", "No finding.", "x"], ["No finding.", "Yes finding.", "x"]
    vqa = [  # (image, gold, references): the scripted policy reads the image without references
        ("bright.png", "Yes.", yes_refs),  # right without and with retrieval
        ("bright2.png", "Yes", no_refs),  # right without, wrong with: over-reliance
        (dark, "No", no_refs),  # right, right
        ("dark2.png", "Yes, there is a nodule.", yes_refs),  # wrong without, right with
        (bright, "Cardiomegaly.", yes_refs),  # not yes/no: counted, left out
        ("missing.png", "No", no_refs),  # bad image: skipped, counted
    ]
    rows = [{"question_id": i, "question": "Is there a finding?\n<image>", "answer": a, "image": img,
             "report": "r", **_retrieval(refs, SCORES)} for i, (img, a, refs) in enumerate(vqa)]
    vqa_file = _write_jsonl(tmp_path / "radiology_test_vqa.jsonl", rows)
    reports = [{"id": "a", "report": "Yes finding.", "image_path": bright, **_retrieval(yes_refs, SCORES)},
               {"id": "b", "report": "No finding.", "image_path": dark, **_retrieval(yes_refs, SCORES)}]
    report_file = _write_jsonl(tmp_path / "radiology_test_report.jsonl", reports)
    index = {"files": [
        {"path": str(vqa_file), "domain": "radiology", "role": "test_vqa", "kind": "vqa", "image_root": str(images)},
        {"path": str(report_file), "domain": "radiology", "role": "test_report", "kind": "report",
         "image_root": str(images)},
    ]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    (tmp_path / "retrieval_metrics.json").write_text(json.dumps(
        {"routing": "classifier", "domain_accuracy": 0.9,
         "files": {"radiology_test_vqa.jsonl": {"routing_accuracy": 0.9, "findings_R@5": 0.75}}}))
    return tmp_path


class ScriptedPolicy(Policy):
    """Copies the first retrieved report's first word when there are references; otherwise reads
    the image (bright: yes, dark: no). Reports: the first reference, or a fixed sentence. Counts
    tokens with a real processor (the budget's)."""

    def __init__(self, processor):
        super().__init__(model=None, processor=processor)
        self.seen: list[tuple[str, np.ndarray]] = []

    def generate(self, images, prompts, max_new_tokens=64, batch_size=8, progress=False):
        out = []
        for img, messages in zip(images, prompts):
            text = messages[0]["content"][1]["text"]
            self.seen.append((text, np.asarray(img)))
            first = re.search(r"^1\. (.*)$", text, re.M)
            if "Question:" not in text:  # a report prompt
                out.append(first.group(1) if first else "Normal study.")
            elif first:
                out.append(first.group(1).split()[0] + ".")
            else:
                out.append("Yes." if np.asarray(img).mean() > 128 else "No.")
        return out


def _cfg(world: Path, **kw) -> EvalConfig:
    base = dict(retrieval_dir=str(world), out=str(world / "eval"), policy=PolicySpec(path=str(world)), meteor=False,
                clip_dir=str(world / "none"), dpo_dir=str(world / "none"), policies=["base"])
    return EvalConfig(**{**base, **kw})


def test_results_by_hand_on_scripted_policy(hand_world, toy_processor):
    policy = ScriptedPolicy(toy_processor)
    results = evaluate(_cfg(hand_world), load=lambda adapter: policy)
    out = hand_world / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["condition"], r["task"]): r for r in saved["rows"]}
    assert len(rows) == len(saved["rows"]) == 2 * len(CONDITIONS)
    for r in saved["rows"]:
        assert r["policy"] == "base" and r["condition"] in CONDITIONS and r["task"] in ("vqa", "report")
        assert set(METRIC_KEYS) <= set(r) and isinstance(r["n"], int) and r["file"]
    vqa = rows["no_rag", "vqa"]
    # 4 yes/no rows scored; the open question counted and left out; the missing image skipped
    assert (vqa["n"], vqa["n_not_yes_no"], vqa["n_bad_images"]) == (4, 1, 1)
    assert vqa["accuracy"] == pytest.approx(3 / 4)  # wrong only on the dark "Yes"
    assert vqa["f1"] == pytest.approx(0.8)  # tp 2, fp 0, fn 1
    assert vqa["bleu"] is None and vqa["meteor"] is None
    assert rows["rag_fixed", "vqa"]["accuracy"] == pytest.approx(3 / 4)  # the bright "Yes" with "No" references fails
    assert rows["rag_fixed", "vqa"]["mean_k"] == 3 and rows["rag_adaptive", "vqa"]["mean_k"] == 1
    d = saved["diagnostics"]["base"]
    assert d["n"] == 4
    assert d["copy_rate"] == pytest.approx(3 / 4)  # the copying policy is as right with x_v* as with x_v
    assert d["over_reliance_rate"] == pytest.approx(1 / 4) == d["over_reliance_rate_adaptive"]
    report = rows["rag_fixed", "report"]
    assert report["n"] == 2 and report["accuracy"] is None and report["meteor"] is None
    assert 0 < report["rouge_l"] < 1  # one copied reference is the gold report, one is not
    assert rows["no_rag", "report"]["rouge_l"] < report["rouge_l"]
    # predictions: every record that has an image x condition, with its k
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == (5 + 2) * len(CONDITIONS)
    assert {p["k"] for p in preds if p["condition"] == "rag_adaptive"} == {1}
    assert diagnostics(preds) == saved["diagnostics"]
    # the noised condition saw images that are none of the real ones (another image plus noise)
    real = {v: np.asarray(Image.open(hand_world / "images" / n)) for v, n in ((BRIGHT, "bright.png"), (DARK, "dark.png"))}
    seen_noised = [img for i, (_, img) in enumerate(policy.seen) if i % len(CONDITIONS) == CONDITIONS.index("noised_rag")]
    assert len(seen_noised) == 7
    assert all(not any(np.array_equal(img, r) for r in real.values()) for img in seen_noised)
    md = (out / "results.md").read_text()
    assert "| base | noised_rag |" in md and "| base | no_rag | 0.750 / 0.800 |" in md
    assert "domain accuracy 0.900" in md and "| radiology_test_vqa | 0.900 | 0.750 |" in md
    assert (out / "conditions.png").stat().st_size > 0 and (out / "run_config.yaml").is_file()


def test_noised_images_are_deterministic(hand_world, toy_processor):
    runs = []
    for _ in range(2):
        policy = ScriptedPolicy(toy_processor)
        evaluate(_cfg(hand_world, conditions=["noised_rag"], plots=False), load=lambda adapter: policy)
        runs.append([img for _, img in policy.seen])
    assert all(np.array_equal(a, b) for a, b in zip(*runs)) and len(runs[0]) == 7


def test_bad_query_records_are_skipped_and_named(hand_world, toy_processor):
    vqa = hand_world / "radiology_test_vqa.jsonl"
    lines = vqa.read_text().splitlines()
    bad = dict(json.loads(lines[0]), question="<image>")  # the IU-Xray quirk: no question text
    lines[1:1] = [json.dumps(bad)]
    lines[4:4] = [json.dumps(bad)]
    vqa.write_text("\n".join(lines) + "\n")
    results = evaluate(_cfg(hand_world, conditions=["no_rag"], plots=False), load=lambda adapter: ScriptedPolicy(toy_processor))
    assert results["bad_records"] == {"count": 2, "records": [f"{vqa}:2: no text: `question` is missing or empty",
                                                              f"{vqa}:5: no text: `question` is missing or empty"]}
    assert json.loads((hand_world / "eval" / "results.json").read_text())["bad_records"]["count"] == 2
    with pytest.raises(InputError, match=f"{vqa}:2: no text"):
        evaluate(_cfg(hand_world, bad_record="error", plots=False), load=lambda adapter: ScriptedPolicy(toy_processor))


def test_a_small_budget_cuts_references_and_refuses_what_cannot_fit(hand_world, toy_processor):
    policy = ScriptedPolicy(toy_processor)
    full = evaluate(_cfg(hand_world, conditions=["rag_fixed"], plots=False), load=lambda adapter: policy)
    whole = {r["budget"]["prompt_tokens"] for r in _predictions(hand_world)}
    assert full["budget"]["references_dropped"] == 0 and full["budget"]["prompts"] == 7
    max_length = min(whole) + 16 - 1  # VQA answers get 16 new tokens; one token short for every VQA prompt
    cut = evaluate(_cfg(hand_world, conditions=["rag_fixed"], plots=False, max_length=max_length),
                   load=lambda adapter: policy)["budget"]
    rows = _predictions(hand_world)
    vqa = [r for r in rows if r["task"] == "vqa"]
    assert all(r["k"] == 3 - r["budget"]["dropped"] and r["budget"]["prompt_tokens"] + 16 <= max_length for r in vqa)
    assert cut["references_dropped"] == sum(r["budget"]["dropped"] for r in rows) >= len(vqa)
    assert cut["refused"] == 2 and cut["prompts"] == 7  # the 2 report prompts need 96 new tokens: not run
    assert {r["task"] for r in rows} == {"vqa"} and len(rows) == 5
    results = json.loads((hand_world / "eval" / "results.json").read_text())
    assert results["budget"] == cut and any("too long" in n for n in results["notes"])


def _predictions(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "eval" / "predictions.jsonl").read_text().splitlines()]


def test_diagnostics_by_hand():
    def row(cond, index, correct, policy="base"):
        return {"policy": policy, "condition": cond, "file": "f", "task": "vqa", "index": index, "correct": correct}

    preds = [row("no_rag", 0, True), row("rag_fixed", 0, False), row("noised_rag", 0, True),
             row("no_rag", 1, True), row("rag_fixed", 1, True), row("noised_rag", 1, False),
             row("no_rag", 2, False), row("rag_fixed", 2, True), row("noised_rag", 2, True),
             row("no_rag", 3, None), row("rag_fixed", 3, None)]  # not yes/no: left out
    d = diagnostics(preds)["base"]
    assert d["n"] == 3 and d["copy_rate"] == pytest.approx(2 / 3)
    assert d["over_reliance_rate"] == pytest.approx(1 / 3) and d["over_reliance_rate_adaptive"] is None
    assert d["accuracy_no_rag"] == pytest.approx(2 / 3)


def test_k_per_condition():
    cfg = EvalConfig(fixed_k=2)
    assert [condition_k(c, SCORES, 3, cfg) for c in CONDITIONS] == [0, 2, 1, 2]
    assert condition_k("rag_adaptive", [], 0, cfg) == 0  # a record retrieval could not serve
    with pytest.raises(InputError, match="reference_scores"):
        condition_k("rag_adaptive", [], 3, cfg)
    calibrated = EvalConfig(fixed_k=2, k_by_domain={"pathology": 1, "radiology": 5})  # RULE's k per domain
    assert [condition_k(c, SCORES, 3, calibrated, "pathology") for c in CONDITIONS] == [0, 1, 1, 1]
    assert condition_k("rag_fixed", SCORES, 3, calibrated, "radiology") == 3  # no more than retrieved
    assert condition_k("rag_fixed", SCORES, 3, calibrated, "ophthalmology") == 2  # not calibrated: fixed_k


@pytest.mark.parametrize("written", ["by train_dpo", "flat"])
def test_adapter_trained_on_another_base_is_refused(tmp_path, written):
    from dpo.train_dpo import DpoConfig

    (tmp_path / "adapter").mkdir()
    run_config = tmp_path / "run_config.yaml"
    if written == "flat":
        run_config.write_text("policy: p\ninit_adapter: outputs/toy/sft/adapter\n")
    else:
        save_config(DpoConfig(policy=PolicySpec(init_adapter="outputs/toy/sft/adapter")), run_config)
    with pytest.raises(ConfigError, match="--policy.init_adapter outputs/toy/sft/adapter"):
        check_adapter_base(str(tmp_path / "adapter"), "")
    check_adapter_base(str(tmp_path / "adapter"), "outputs/toy/sft/adapter")


def test_missing_java_fails_before_generation(hand_world, monkeypatch):
    monkeypatch.setattr("evaluation.evaluate.shutil.which", lambda name: None)
    cfg = _cfg(hand_world, meteor=True)
    with pytest.raises(ConfigError, match="java"):
        check_java(cfg, eval_files(cfg))


def test_cli_exit_2_without_retrieval(tmp_path, monkeypatch, capsys):
    policy = tmp_path / "policy"
    policy.mkdir()
    argv = ["evaluate", "--retrieval_dir", str(tmp_path / "nothing"), "--policy.path", str(policy),
            "--policies", "[base]", "--out", str(tmp_path / "eval")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == 2 and "retrieve.sh" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
    monkeypatch.setattr(sys, "argv", argv[:3] + ["--policy.path", str(tmp_path / "no_policy")])
    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == 2 and "make_toy_policy.sh" in capsys.readouterr().err


# ---------------------------------------------------------------- a tiny real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tiny toy world, oracle retrieval, an untrained tiny policy and a random LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from policy.policy import load_policy
    from toy.make_toy import make_world
    from toy.oracle_retrieval import ToyRetrievalConfig, write_oracle_retrieval
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

    root = tmp_path_factory.mktemp("tiny")
    world = make_world(root / "world", size="tiny", progress=False)
    write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(root / "retrieval"),
                                              roles=["test_vqa", "test_report"], k=5))
    cfg = ToyPolicyConfig(vocab_size=400, vision_width=32, vision_layers=1, text_width=32, text_layers=1)
    build_toy_policy(world_texts(world), root / "policy", cfg)
    torch.manual_seed(0)
    peft = get_peft_model(load_policy(root / "policy").model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights=False))
    peft.save_pretrained(root / "dpo" / "adapter")
    (root / "dpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.7 - 0.1 * s, "rewards/accuracies": 0.5 + 0.1 * s, "rewards/margins": 0.2 * s,
                    "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s}) + "\n" for s in range(4)))
    return root


def test_tiny_run_schema(tiny_run):
    cfg = EvalConfig(retrieval_dir=str(tiny_run / "retrieval"), policy=PolicySpec(path=str(tiny_run / "policy")),
                     dpo_dir=str(tiny_run / "dpo"), clip_dir=str(tiny_run / "none"), out=str(tiny_run / "eval"),
                     limit=1, max_new_tokens_vqa=4, max_new_tokens_report=6, meteor=False)
    results = evaluate(cfg)
    files = {r["file"] for r in results["rows"]}
    assert len(files) == 8  # 4 VQA + 4 report files of the tiny world
    keys = [(r["policy"], r["condition"], r["file"]) for r in results["rows"]]
    assert len(keys) == len(set(keys)) == 2 * len(CONDITIONS) * len(files)
    assert set(results["diagnostics"]) == {"base", "dpo"}
    assert results["policies"]["dpo"]["adapter"].endswith("adapter")
    for d in results["diagnostics"].values():
        assert {"copy_rate", "over_reliance_rate"} <= set(d) and 0 <= d["copy_rate"] <= 1
    preds = (tiny_run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 2 * len(CONDITIONS) * len(files)
    budget = results["budget"]
    assert budget["max_length"] == 1024 and budget["prompts"] == len(preds) and budget["refused"] == 0
    rows = [json.loads(p) for p in preds]
    assert budget["prompt_tokens"]["max"] == max(r["budget"]["prompt_tokens"] for r in rows)
    assert (tiny_run / "eval" / "dpo_training.png").stat().st_size > 0
    gallery = (tiny_run / "eval" / "gallery.html").read_text()
    assert gallery.count("<article class='card'") == len(files) and gallery.count("src='data:image/jpeg") == 2 * len(files)


# ---------------------------------------------------------------- plots


def test_training_curve_plots(tmp_path):
    clip = tmp_path / "clip"
    for domain in ("radiology", "pathology"):
        (clip / domain).mkdir(parents=True)
        rows = [{"step": 0, "epoch": 0, "val/i2t_R@1": 0.1, "val/mean_recall": 0.2}]
        rows += [{"step": e * 10 - 5, "epoch": e - 0.5, "train/loss": 2.0 / e} for e in (1, 2)]
        rows += [{"step": e * 10, "epoch": e, "val/i2t_R@1": 0.1 * e, "val/mean_recall": 0.2 + 0.1 * e} for e in (1, 2)]
        (clip / domain / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    assert plot_clip_curves(clip, tmp_path / "clip.png").stat().st_size > 0
    assert plot_clip_curves(tmp_path / "none", tmp_path / "x.png") is None
    assert plot_dpo_curves(tmp_path / "none.jsonl", tmp_path / "y.png") is None
    (tmp_path / "dpo.jsonl").write_text(json.dumps({"step": 1, "eval/loss": 0.6}) + "\n")
    assert plot_dpo_curves(tmp_path / "dpo.jsonl", tmp_path / "dpo.png").is_file()


def test_prompt_layout_the_scripted_policy_reads():
    """ScriptedPolicy parses the template layout; fail loudly if the wording changes under it."""
    text = build_prompt("radiology", "vqa", "Is there a finding?", ["Yes finding.", "b"])[0]["content"][1]["text"]
    assert "Question:" in text and re.search(r"^1\. Yes finding\.$", text, re.M)
    report = build_prompt("radiology", "report", None, None)[0]["content"][1]["text"]
    assert "Question:" not in report


def test_option_text_of_a_record(hand_world, toy_processor):
    """A record's own option text follows its question when option_text is on; a record whose
    `text` is only its question, or that has none, keeps the plain prompt."""
    options = "Please choose from the following two options: [yes, no]"
    path = hand_world / "radiology_test_vqa.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["text"], rows[1]["text"] = options, "Is there a finding?"
    _write_jsonl(path, rows)
    for enabled in (True, False):
        policy = ScriptedPolicy(toy_processor)
        evaluate(_cfg(hand_world, conditions=["no_rag"], plots=False, option_text=enabled),
                 load=lambda adapter: policy)
        texts = [text for text, _ in policy.seen]
        assert ("Question: Is there a finding? " + options in texts[0]) is enabled
        assert texts[1] == texts[2] and options not in texts[1] and texts[1].count("Is there a finding?") == 1


def test_noised_image_is_data_noise_x_v_star(hand_world):
    """noised_rag's x_v* is data.noise.make_x_v_star on the record's image and its domain's images,
    the function the pair builder and the SFT reliance check call: byte for byte the same."""
    from data.datasets import first_image
    from data.images import load_image, resolve_image
    from data.noise import make_x_v_star
    from evaluation.evaluate import ImageSource

    cfg = _cfg(hand_world, conditions=["noised_rag"])
    files = eval_files(cfg)
    pool = {first_image(r): str(resolve_image(first_image(r), r.image_root, f.image_root))
            for f in files for r in f.records if first_image(r)}
    source = ImageSource(files, cfg)
    vqa = next(f for f in files if f.task == "vqa")
    rel, real, noised = source.load(vqa, 0)
    want = make_x_v_star(rel, load_image(pool[rel]), cfg.noise, pool, load_image, domain="radiology")
    assert np.asarray(noised).tobytes() == np.asarray(want).tobytes()
    assert not np.array_equal(np.asarray(noised), np.asarray(real))


# ---------------------------------------------------------------- decoding


def _decoded(tiny_run, name: str, **kw) -> tuple[dict, list[dict]]:
    cfg = EvalConfig(retrieval_dir=str(tiny_run / "retrieval"), policy=PolicySpec(path=str(tiny_run / "policy")),
                     policies=["base"], roles=["test_vqa"], conditions=["rag_fixed", "noised_rag"],
                     clip_dir=str(tiny_run / "none"), out=str(tiny_run / name), limit=2, max_new_tokens_vqa=4,
                     meteor=False, plots=False, gallery=0, **kw)
    results = evaluate(cfg)
    return results, [json.loads(x) for x in (tiny_run / name / "predictions.jsonl").read_text().splitlines()]


def test_vcd_contrasts_each_record_with_its_x_v_star(tiny_run, monkeypatch):
    import evaluation.evaluate as ev

    greedy, greedy_rows = _decoded(tiny_run, "greedy")
    assert greedy["decoding"] == {"method": "greedy"}
    seen = []
    real_vcd = ev.vcd_generate

    def spy(policy, images, distorted, prompts, *args):
        seen.extend(zip(images, distorted))
        return real_vcd(policy, images, distorted, prompts, *args)

    monkeypatch.setattr(ev, "vcd_generate", spy)
    vcd0, rows = _decoded(tiny_run, "vcd0", decoding="vcd", vcd_alpha=0.0)
    assert vcd0["decoding"] == {"method": "vcd", "alpha": 0.0, "beta": 0.1}
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in greedy_rows]  # alpha 0 is greedy
    # the distortion of every job is its record's x_v*: the noised_rag image itself, another image under rag_fixed
    by_cond = {r["condition"]: [] for r in rows}
    for r, (image, distorted) in zip(rows, seen):
        by_cond[r["condition"]].append(np.array(image).tobytes() == np.array(distorted).tobytes())
    assert by_cond == {"rag_fixed": [False, False] * 4, "noised_rag": [True, True] * 4}


def test_beam_search_is_recorded_and_needs_two_beams(tiny_run):
    results, rows = _decoded(tiny_run, "beam", decoding="beam", num_beams=2)
    assert results["decoding"] == {"method": "beam", "num_beams": 2} and all("prediction" in r for r in rows)
    with pytest.raises(ConfigError, match="num_beams"):
        _decoded(tiny_run, "beam1", decoding="beam", num_beams=1)


def test_dola_is_recorded_and_runs_through_dola_generate(tiny_run, monkeypatch):
    import evaluation.evaluate as ev

    seen = {}
    real_dola = ev.dola_generate

    def spy(policy, images, prompts, max_new, layers, **kw):
        seen["layers"] = layers
        return real_dola(policy, images, prompts, max_new, layers, **kw)

    monkeypatch.setattr(ev, "dola_generate", spy)
    results, rows = _decoded(tiny_run, "dola", decoding="dola", dola_layers=[0])
    assert results["decoding"] == {"method": "dola", "layers": [0]} and seen["layers"] == [0]
    assert len(rows) == 16 and all(isinstance(r["prediction"], str) for r in rows)
