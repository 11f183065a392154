"""The pair builder (pairs/build_pairs.py) on a tiny toy world with a tiny random-weight policy."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.io import InputError, write_path
from data.images import BadImageError, load_image
from data.manifest import manifest_files
from data.noise import pick_other
from data.readers import detect_kind, read_records
from data.validate import validate
from dpo.pair_data import load_pairs, prompt_parts
from dpo.pair_data import PairDataset, load_pairs
from pairs.build_pairs import (
    GENERATIONS,
    Input,
    NoiseConfig,
    PairsConfig,
    answer_batch,
    batches,
    build_pairs,
    correct_fn,
    find_inputs,
    make_x_v_star,
    noised_name,
    prompt_chars,
    other_candidates,
    read_generations,
    read_items,
    run,
    settings_of,
)
from policy.budget import BudgetLog, PromptParts, fit_prompt
from policy.policy import PolicySpec, load_policy
from toy.make_toy import make_world
from toy.oracle_retrieval import ToyRetrievalConfig, write_oracle_retrieval
from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny world + oracle retrieval in a project's outputs tree (``base``); one alignment image is
    truncated (a bad image)."""
    project = tmp_path_factory.mktemp("pairs")
    base = project / "outputs"
    world = make_world(base / "world", size="tiny", progress=False)
    index = write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(base / "retrieval"),
                                                      roles=["alignment_vqa", "alignment_report"]))
    rec = read_records(manifest_files(world, role="alignment_report", domain="pathology")[0]["path"])[0]
    bad = world / "pathology" / "images" / rec.images[0]
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = ToyPolicyConfig(vocab_size=500, vision_width=32, vision_layers=1, text_width=32, text_layers=1, text_heads=2,
                          vision_heads=2)
    policy = build_toy_policy(world_texts(world), base / "policy", cfg)
    return {"project": project, "base": base, "world": world, "index": index, "policy": policy, "bad": str(bad)}


@pytest.fixture(scope="module", autouse=True)
def in_project(world):
    """Runs start in the project folder, as a user runs them: pairs.json names the paths inside its
    outputs tree relative to itself (common.io.write_path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world["project"])
        yield


def _from_project(env: dict[str, str] | None = None, **kw) -> dict:
    """subprocess keywords that run this repository's code from the project folder."""
    return {"cwd": Path.cwd(), "env": {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw}


def _cfg(world, out, **kw) -> PairsConfig:
    # report_threshold 0: every report counts as right, so the random policy still yields cm pairs
    kw = {"limit": 2, "batch_size": 2, "max_new_tokens_vqa": 3, "max_new_tokens_report": 4,
          "report_threshold": 0.0, "progress": False, **kw}
    policy = PolicySpec(path=str(world["policy"]))
    return PairsConfig(policy=policy, retrieval_index=str(world["index"]), out=str(out), **kw)


def _argv(cfg: PairsConfig) -> list[str]:
    return [sys.executable, "-m", "pairs.build_pairs", "--policy.path", cfg.policy.path,
            "--retrieval_index", cfg.retrieval_index, "--out", cfg.out, "--limit", str(cfg.limit),
            "--batch_size", str(cfg.batch_size), "--max_new_tokens_vqa", str(cfg.max_new_tokens_vqa),
            "--max_new_tokens_report", str(cfg.max_new_tokens_report), "--report_threshold", str(cfg.report_threshold),
            "--progress", "false"]


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("pairs.json", GENERATIONS, "pairs_stats.json")}


@pytest.fixture(scope="module")
def baseline(world):
    """One uninterrupted run; the other runs reuse its folder and compare their bytes with it."""
    out = world["base"] / "out"
    stats = run(_cfg(world, out))
    return {"out": out, "stats": stats, "bytes": _outputs(out)}


def test_correct_decides_vqa_by_yes_no_and_reports_by_threshold():
    cfg = PairsConfig(report_threshold=0.5)
    vqa, report = correct_fn("vqa", cfg), correct_fn("report", cfg)
    assert vqa("Yes, there is a pleural effusion.", "yes") and vqa("no", "No, there is no nodule.")
    assert not vqa("No.", "Yes.") and not vqa("There is an effusion.", "Yes.")
    ref = "There is a small pleural effusion. The heart is enlarged."
    assert report(ref, ref) and report("There is a small pleural effusion.", ref)
    assert not report("Normal fundus.", ref) and not report("", ref)
    assert correct_fn("report", replace(cfg, report_threshold=0.0))("Normal fundus.", ref)


def test_option_text_follows_the_question_once(world, tmp_path):
    """The toy world's radiology `text` is the question itself: no option text, no doubled
    question. A record whose `text` holds options gets them after its question, in every prompt."""
    cfg = _cfg(world, tmp_path, option_text=True)
    source = next(i for i in find_inputs(cfg) if i.domain == "radiology" and detect_kind(i.path) == "vqa")
    rows = [json.loads(line) for line in Path(source.path).read_text().splitlines()]
    assert rows[0]["text"] == rows[0]["question"].replace("\n<image>", "")
    options = "Please choose from the following two options: [yes, no]"
    rows[1]["text"] = options
    path = tmp_path / "with_options.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_items([Input(str(path), "radiology", source.image_root)], cfg)
    assert items[0].options is None and items[1].options == options
    text = cfg.policy.templates().text("radiology", "vqa", items[1].question, None, items[1].options)
    assert f"{items[1].question} {options}" in text and text.count(items[1].question) == 1
    plain = read_items([Input(str(path), "radiology", source.image_root)], replace(cfg, option_text=False))
    assert all(it.options is None for it in plain)


def test_x_v_star_is_deterministic_and_another_image(world, tmp_path):
    cfg = _cfg(world, tmp_path, limit=0)
    items = [it for it in read_items(find_inputs(cfg), cfg) if it.domain == "ophthalmology"]
    pool = other_candidates(items)["ophthalmology"]
    it = items[0]
    real = load_image(it.image_path())

    def x(noise, pool=pool):
        return np.asarray(make_x_v_star(it, real, noise, pool, lambda o: load_image(o.image_path())))

    noise = NoiseConfig(sigma=0.05)
    first = x(noise)
    assert np.array_equal(first, x(noise))  # same inputs, same pixels
    assert np.array_equal(first, x(noise, dict(reversed(list(pool.items())))))  # pool order is irrelevant
    assert not np.array_equal(first, x(replace(noise, seed=1)))
    assert first.shape == np.asarray(real).shape
    picked = pick_other(it.image, list(pool), noise.seed)  # x_v* shows this other image, noised

    def dist(key):
        return np.abs(first.astype(float) - np.asarray(load_image(pool[key].image_path()).resize(real.size))).mean()

    assert picked != it.image and dist(picked) < 0.5 * dist(it.image)
    for mode in ("gaussian", "diffusion"):
        assert np.array_equal(x(NoiseConfig(mode=mode)), x(NoiseConfig(mode=mode)))

    def unreadable_pick(o):  # the picked other image is bad: the next pick is taken, no crash
        if o.image == picked:
            raise BadImageError(o.image, "unreadable")
        return load_image(o.image_path())

    again = np.asarray(make_x_v_star(it, real, noise, pool, unreadable_pick))
    assert not np.array_equal(again, first)
    with pytest.raises(BadImageError, match="no other image"):
        make_x_v_star(it, real, noise, {it.image: it}, unreadable_pick)


def test_pairs_from_hand_made_answers(world, tmp_path):
    cfg = _cfg(world, tmp_path, report_threshold=0.5)
    items = read_items(find_inputs(cfg), cfg)
    vqa = next(it for it in items if it.task == "vqa" and it.truth.lower().startswith("yes"))
    rep = next(it for it in items if it.task == "report")
    wrong = "No" if vqa.truth.lower().startswith("yes") else "Yes"
    noised = tmp_path / noised_name(vqa)
    noised.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(noised)
    gens = {
        vqa.key: {"key": vqa.key, "a": "Yes.", "b": "yes", "c": wrong, "references": vqa.references},  # cm (copy) + oa1
        rep.key: {"key": rep.key, "a": "Normal fundus.", "b": "Normal fundus.", "c": rep.truth,
                  "references": rep.references},  # oa2
    }
    pairs, stats = build_pairs([vqa, rep], gens, cfg, cfg.policy.templates(), tmp_path, BudgetLog(None, None))
    assert [(p["pair_type"], p["task"]) for p in pairs] == [("cm", "vqa"), ("oa1", "vqa"), ("oa2", "report")]
    cm, oa1, oa2 = pairs
    assert cm["conversations"][1]["value"] == cm["rejected_conversations"][1]["value"] == vqa.truth
    root = tmp_path / cm["image_root"]  # written relative to pairs.json's folder, here tmp_path
    assert cm["rejected_noised"] == 1 and Path(os.path.normpath(root / cm["rejected_image"])) == noised
    assert Path(os.path.normpath(root / cm["image"])) == vqa.image_path()
    assert (oa1["conversations"][1]["value"], oa1["rejected_conversations"][1]["value"]) == ("Yes.", wrong)
    assert Path(os.path.normpath(tmp_path / oa1["image_root"] / oa1["image"])) == vqa.image_path()
    assert "rejected_image" not in oa1 and oa1["rejected_noised"] == 0
    assert (oa2["conversations"][1]["value"], oa2["rejected_conversations"][1]["value"]) == (rep.truth, "Normal fundus.")
    human = oa2["conversations"][0]["value"]
    assert human.startswith("<image>\n") and rep.references[0].split()[0] in human  # references written in
    assert human == oa2["rejected_conversations"][0]["value"]
    assert stats["pairs_by_type"] == {"cm": 1, "oa1": 1, "oa2": 1}
    v = stats["conditions"][f"{vqa.domain}/vqa"]
    assert (v["accuracy_a"], v["accuracy_b"], v["accuracy_c"], v["copy_rate"], v["over_reliance_rate"]) == (1, 1, 0, 1, 0)
    assert stats["conditions"][f"{rep.domain}/report"]["over_reliance_rate"] == 1
    # the wrong rule: a right, b wrong -> y over b, no noised image
    gens[vqa.key]["b"] = wrong
    pairs, _ = build_pairs([vqa], gens, replace(cfg, cm_rule="wrong"), cfg.policy.templates(), tmp_path,
                           BudgetLog(None, None))
    assert [(p["pair_type"], p["rejected_conversations"][1]["value"], p["rejected_noised"]) for p in pairs][0] == ("cm", wrong, 0)
    # a skipped record is counted, not paired; an empty answer drops its pair
    gens = {vqa.key: {"key": vqa.key, "skipped": {"path": "x.png", "reason": "missing", "detail": ""}},
            rep.key: {"key": rep.key, "a": "", "b": "", "c": rep.truth, "references": rep.references}}
    pairs, stats = build_pairs([vqa, rep], gens, cfg, cfg.policy.templates(), tmp_path, BudgetLog(None, None))
    assert pairs == [] and stats["skipped"] == 1 and stats["dropped_empty_answer"] == 1


def test_bad_input_record_is_skipped_and_named(tmp_path):
    row = {"question_id": 1, "question": "Is there a mass?", "answer": "no", "image": "a.png",
           "reference_reports": ["No mass."], "domain": "pathology"}
    path = tmp_path / "retrieved.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row, dict(row, question_id=2, question="<image>"), row]))
    skipped: list[str] = []
    items = read_items(find_inputs(PairsConfig(inputs=[str(path)])), PairsConfig(), skipped)
    assert len(items) == 2 and skipped == [f"{path}:2: no text: `question` is missing or empty"]
    with pytest.raises(InputError, match=f"{path}:2: no text"):
        read_items(find_inputs(PairsConfig(inputs=[str(path)])), PairsConfig(bad_record="error"))


def test_a_small_budget_cuts_references_and_pairs_hold_what_the_answers_saw(world, tmp_path):
    cfg = _cfg(world, tmp_path, report_threshold=0.0)
    templates = cfg.policy.templates()
    items = read_items(find_inputs(cfg), cfg)
    batch = next(b for b in batches(items, 2) if b[0].task == "vqa" and len(b) == 2)
    policy = load_policy(world["policy"])
    image = load_image(batch[0].image_path())
    parts = PromptParts(batch[0].domain, "vqa", batch[0].question, tuple(batch[0].references))
    full = fit_prompt(policy, parts, templates, [image], None, 0).note.prompt_tokens
    max_length = full + cfg.max_new_tokens_vqa - 1  # one token short for the first record's references
    rows = answer_batch(policy, batch, cfg, templates, other_candidates(items), tmp_path, max_length)
    gens = {it.key: row for it, row in zip(batch, rows)}
    first, refs = rows[0], batch[0].references
    ab = first["budget"]["ab"]
    assert ab["dropped"] + ab["shortened"] == 1 and first["budget"]["c"]["dropped"] == 0
    assert ab["prompt_tokens"] + cfg.max_new_tokens_vqa <= max_length
    kept = first["references"]
    assert kept[:-1] == refs[:-1] and len(kept) == len(refs) - ab["dropped"]  # only the last one was cut
    assert ab["dropped"] or refs[-1].split()[: len(kept[-1].split())] == kept[-1].split()
    wrong = "No" if batch[0].truth.lower().startswith("yes") else "Yes"
    first.update(a=batch[0].truth, b=batch[0].truth, c=wrong)  # cm + oa1 pairs, whatever the random policy said
    pairs, stats = build_pairs(batch, gens, cfg, templates, tmp_path, BudgetLog(max_length, 1024))
    mine = [p for p in pairs if p["id"].startswith(batch[0].key + "/")]
    assert mine and all(p["references"] == kept and p["question"] == batch[0].question for p in mine)
    assert all(p["conversations"][0]["value"] == "<image>\n" + templates.text(p["domain"], "vqa", p["question"], kept)
               for p in mine)
    budget = stats["budget"]
    notes = [n for row in rows for n in row["budget"].values()]
    assert budget["prompts"] == 4 and budget["refused"] == 0
    assert budget["references_dropped"] == sum(n["dropped"] for n in notes)
    assert budget["references_shortened"] == sum(n["shortened"] for n in notes)
    assert budget["prompts_trimmed"] >= 1
    assert budget["prompt_tokens"]["max"] == max(n["prompt_tokens"] for n in notes) <= max_length - cfg.max_new_tokens_vqa
    # too small for even the question: skipped and counted, never generated on a cut prompt
    rows = answer_batch(policy, batch, cfg, templates, other_candidates(items), tmp_path, 10)
    assert [r["skipped"]["reason"] for r in rows] == ["too_long", "too_long"]
    _, stats = build_pairs(batch, {it.key: r for it, r in zip(batch, rows)}, cfg, templates, tmp_path,
                           BudgetLog(10, 1024))
    assert stats["skipped_by_reason"] == {"too_long": 2} and stats["budget"]["refused"] == 4


def test_run_outputs_validate_and_bad_image_is_skipped(world, baseline):
    out, stats = baseline["out"], baseline["stats"]
    budget = stats["budget"]
    assert budget["max_length"] == budget["model_limit"] == 1024  # the toy's max_position_embeddings
    assert budget["prompts"] == 2 * stats["answered"] and budget["refused"] == 0
    templates = _cfg(world, out).policy.templates()
    assert all(prompt_parts(r, templates).text is None for r in load_pairs([out / "pairs.json"]))  # DPO can trim them
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs and stats["pairs"] == len(pairs) and stats["pairs_by_type"]["cm"] > 0
    asked = [p["conversations"][0]["value"] for p in pairs]  # in the toy policy's own wording (its prompts.yaml)
    assert any("Reports of other images:" in a for a in asked) and not any("for reference only" in a for a in asked)
    assert all(p["rejected_image"] for p in pairs if p["pair_type"] == "cm")
    problems, summary = validate(str(out / "pairs.json"), "preference", None, True, None)
    assert problems == [] and summary["records"] == len(pairs) and summary["images_checked"] > 0
    assert stats["skipped"] >= 1 and any(s["path"] == world["bad"] for s in stats["skipped_records"])
    gens = read_generations(out / GENERATIONS)
    assert len(gens) == stats["records"] and sum("skipped" in g for g in gens) == stats["skipped"]
    assert not list(out.glob("generations.rank*"))
    assert stats["bad_records"] == {"count": 0, "records": []}
    cmd = [sys.executable, "-m", "data.validate", str(out / "pairs.json"), "--kind", "preference", "--check-images"]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0


def test_image_roots_outside_the_outputs_stay_absolute(tmp_path, monkeypatch):
    """pair_record writes image_root with common.io.write_path: relative inside the outputs tree."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "pairs"
    assert write_path(str(tmp_path / "outputs" / "world" / "images"), out) == "../world/images"
    assert write_path(str(tmp_path / "outputs"), out) == ".."
    assert write_path("/data/mimic-cxr/files", out) == "/data/mimic-cxr/files"


def test_moved_outputs_still_chain_to_training(world, baseline, tmp_path):
    """pairs.json names its images relative to itself: the world and the pairs moved together
    elsewhere still give every image (and stored x_v*) to train_dpo's loader, from the new place."""
    text = (baseline["out"] / "pairs.json").read_text()
    assert str(world["base"]) not in text  # no absolute path into the folder being moved
    moved = tmp_path / "elsewhere" / "deeper"
    for name in ("world", baseline["out"].name):
        shutil.copytree(world["base"] / name, moved / name)
    records = load_pairs([moved / baseline["out"].name / "pairs.json"])
    assert any(r.rejected_image for r in records)
    dataset = PairDataset(records, None, bad_image="error")
    assert all(root.startswith(str(moved)) for roots in dataset._roots for root in roots)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].size and item["rejected_image"].size


def test_resume_after_sigkill_gives_identical_outputs(world, baseline):
    out = baseline["out"]
    shutil.rmtree(out)
    cfg = _cfg(world, out)
    proc = subprocess.Popen(_argv(cfg), **_from_project(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    gen = out / GENERATIONS
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (gen.is_file() and gen.read_bytes().count(b"\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "pairs.json").exists()
    done = gen.read_bytes().count(b"\n")
    assert 1 <= done < baseline["stats"]["records"]
    with open(gen, "ab") as f:  # a write cut off mid-line
        f.write(b'{"key": "vqa/radiology/30')
    run(cfg)
    assert _outputs(out) == baseline["bytes"]


def test_other_settings_are_refused(world, baseline):
    out = baseline["out"]
    with pytest.raises(InputError, match="other settings"):
        run(_cfg(world, out, noise=NoiseConfig(seed=3)))
    assert _outputs(out) == baseline["bytes"]


def test_a_policy_retrained_into_the_same_folder_does_not_reuse_answers(world, tmp_path):
    """The answers depend on the weights, not only on the policy's path."""
    policy = tmp_path / "policy"
    shutil.copytree(world["policy"], policy)
    cfg = replace(_cfg(world, tmp_path / "out"), policy=PolicySpec(path=str(policy)))
    before = settings_of(cfg, [])
    weights = next(policy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # a retrained policy: other bytes in the same file
    assert settings_of(cfg, []) != before and settings_of(cfg, []) == settings_of(cfg, [])


def test_two_processes_equal_one(world, baseline):
    out = baseline["out"]
    shutil.rmtree(out)
    argv = _argv(_cfg(world, out))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + argv[1:]
    res = subprocess.run(torchrun, **_from_project({"OMP_NUM_THREADS": "1"}, capture_output=True, text=True))
    assert res.returncode == 0, res.stderr[-2000:]
    assert _outputs(out) == baseline["bytes"]


def test_length_grouped_batches_change_no_output(world, tmp_path):
    """Records batched by prompt length give the bytes of batches by position (answers in record order)."""
    items = read_items(find_inputs(_cfg(world, tmp_path / "x", limit=4)), _cfg(world, tmp_path / "x", limit=4))
    grouped = batches(items, 2, by_length=True)
    assert grouped != batches(items, 2) and sorted(map(id, sum(grouped, []))) == sorted(map(id, items))
    for b in grouped:
        assert len({it.file for it in b}) == 1
    for f in {it.file for it in items}:
        lengths = [prompt_chars(it) for b in grouped for it in b if it.file == f]
        assert lengths == sorted(lengths)
    outs = {}
    for name, by_length in (("grouped", True), ("positional", False)):
        run(_cfg(world, tmp_path / name, limit=4, group_by_length=by_length))
        outs[name] = {k: v.replace(f"/{name}/".encode(), b"/OUT/") for k, v in _outputs(tmp_path / name).items()}
    assert outs["grouped"] == outs["positional"]


def test_x_v_star_is_data_noise_x_v_star(world, tmp_path):
    """The pair builder's x_v* is data.noise.make_x_v_star on the item's image name and its domain's pool."""
    from data import noise as data_noise

    cfg = _cfg(world, tmp_path, limit=0)
    items = [it for it in read_items(find_inputs(cfg), cfg) if it.domain == "ophthalmology"]
    pool = other_candidates(items)["ophthalmology"]
    it, noise = items[0], NoiseConfig(sigma=0.07, seed=2)
    real = load_image(it.image_path())
    got = make_x_v_star(it, real, noise, pool, lambda o: load_image(o.image_path()))
    paths = {name: o.image_path() for name, o in pool.items()}
    want = data_noise.make_x_v_star(it.image, real, noise, paths, load_image, domain="ophthalmology")
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
