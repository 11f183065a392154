"""The rehearsal of the real chain: its pieces on hand-made input, and (slow) the whole run on
the toy world in the release's layout, as CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rehearse import STAGES, _spread, complete, inventory, markdown, write_sample
from toy.make_toy import make_world
from toy.toy_release import write_release

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("release")
    world = make_world(base / "world", seed=0, size="tiny", progress=False)
    write_release(world, base / "release", ROOT / "configs" / "prompts" / "default.yaml")
    return base / "release"


def test_spread_keeps_ends_and_count():
    assert _spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert _spread([1, 2], 5) == [1, 2]
    assert _spread(list(range(10)), 1) == [0]


def test_complete_needs_each_stage_ok_in_some_domain():
    rows = [{"stage": s, "domain": None, "ok": True} for s in STAGES]
    assert complete(rows) == []
    rows[4] = {**rows[4], "ok": False}
    assert complete(rows) == [STAGES[4]]
    rows.append({"stage": STAGES[4], "domain": "pathology", "ok": True})
    assert complete(rows) == []


def test_inventory_counts_bad_records_and_names_missing_files(release, tmp_path):
    data = tmp_path / "data"
    os.system(f"cp -r {release / 'data'} {data}")
    (data / "test/report/mimic_test.json").unlink()
    files, missing = inventory(data)
    assert missing == ["test/report/mimic_test.json"]
    assert files["test/vqa/iuxray_test.jsonl"]["bad_records"] == 2
    assert files["test/vqa/mimic_test.jsonl"]["bad_records"] == 0
    assert files["training/alignment/radiology/radiology_vqa.json"]["kind"] == "preference"


def test_sample_keeps_paths_and_cuts_records(release, tmp_path):
    files, _ = inventory(release / "data")
    write_sample(release / "data", tmp_path / "sample", files, 5)
    for rel in files:
        path = tmp_path / "sample" / rel
        n = len(path.read_text().splitlines()) if rel.endswith(".jsonl") else len(json.loads(path.read_text()))
        assert n == min(5, files[rel]["records"] + files[rel]["bad_records"]), rel


def test_markdown_lists_failures_and_missing():
    report = {
        "missing": ["test/vqa/quilt_test.jsonl"],
        "files": {"test/vqa/iuxray_test.jsonl": {"kind": "vqa", "records": 36, "bad_records": 2}},
        "stages": [{"stage": "retrieve", "domain": "pathology", "ok": False, "seconds": 1.0, "error": "exit 2: boom"}],
    }
    text = markdown(report)
    assert "| retrieve | pathology | **no** | 1.0 | exit 2: boom |" in text
    assert "- test/vqa/quilt_test.jsonl" in text and "| test/vqa/iuxray_test.jsonl | vqa | 36 | 2 |" in text


@pytest.mark.slow
def test_rehearsal_runs_the_whole_chain_on_the_toy_release(tmp_path):
    """scripts/rehearse.sh as a user runs it without a release: the toy world in its layout."""
    out = tmp_path / "rehearsal"
    cmd = ["bash", "scripts/rehearse.sh", "--toy", "true", "--out", str(out), "--records", "12", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    report = json.loads((out / "rehearsal.json").read_text())
    failed = [s for s in report["stages"] if not s["ok"]]
    assert proc.returncode == 0, (proc.stderr[-2000:], failed)
    assert not failed, failed
    assert report["missing"] == []
    assert report["files"]["test/vqa/iuxray_test.jsonl"]["bad_records"] == 2
    ran = {(s["stage"], s["domain"]) for s in report["stages"]}
    for stage in ("finetune_clip", "retrieve", "build_pairs", "train_dpo", "evaluate", "infer"):
        assert {(stage, d) for d in ("radiology", "pathology", "ophthalmology")} <= ran
    assert (out / "rehearsal.md").is_file()


def test_trust_remote_code_reaches_every_stage_that_loads_the_policy(tmp_path):
    """Each command parses under its own stage's config, and the flag arrives there (off by default)."""
    import importlib

    from common.config import load_config
    from pipeline.rehearse import RehearseConfig, chain_commands

    configs = {"pairs.build_pairs": "PairsConfig", "dpo.train_dpo": "DpoConfig",
               "evaluation.evaluate": "EvalConfig", "evaluation.infer": "InferConfig"}
    for trust in (False, True):
        cfg = RehearseConfig(out=str(tmp_path), policy="some/policy", trust_remote_code=trust)
        seen = set()
        for _, cmd in chain_commands(cfg, "radiology", ["radiology"], "some/policy"):
            module = cmd[2]
            if module in configs:
                parsed = load_config(getattr(importlib.import_module(module), configs[module]), cmd[3:])
                assert parsed.policy.path == "some/policy" and parsed.policy.trust_remote_code is trust
                seen.add(module)
        assert seen == set(configs)
