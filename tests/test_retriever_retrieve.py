"""Retrieval CLI and API on the tiny toy world: JSONL schema (contract 2), index.json, cache, bad images."""

import json
from pathlib import Path

import pytest
import yaml

from data.images import load_image
from data.manifest import manifest_files
from data.readers import read_index, read_records
from data.records import DOMAINS
from retriever import finetune_clip, retrieve
from retriever.select_k import KRule
from tests.test_retriever_train import TINY_ARCH
from toy.make_toy import make_world

ADDED = ("reference_reports", "retrieve_k", "domain", "reference_ids", "reference_scores")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny world with three one-epoch retrievers and a domain classifier."""
    root = tmp_path_factory.mktemp("retrieval")
    world = make_world(root / "world", size="tiny", progress=False)
    cfg = {"clip": {"model": "tiny-retrieve-test", "model_config": TINY_ARCH}, "data": {"world": str(world)},
           "output_dir": str(root / "clip"), "epochs": 1, "batch_size": 8, "val_every": 1,
           "classifier": {"steps": 50}}
    (root / "clip.yaml").write_text(yaml.safe_dump(cfg))
    finetune_clip.main([str(root / "clip.yaml")])
    return root, world


def run(root: Path, world: Path, out: str, *extra: str) -> Path:
    retrieve.main(["--clip_dir", str(root / "clip"), "--data.world", str(world), "--output_dir", str(root / out), *extra])
    return root / out


def test_jsonl_per_query_file_follows_contract(trained):
    root, world = trained
    out = run(root, world, "ret", "--k.rule", "gap", "--k.k", "4", "--k.gamma", "0.05")
    entries = read_index(out / "index.json", retrieve.QUERY_ROLES)
    sources = {e["path"] for role in retrieve.QUERY_ROLES for e in manifest_files(world, role=role)}
    assert {e["source"] for e in entries} == sources
    for entry in entries:
        assert entry["role"] in retrieve.QUERY_ROLES and entry["domain"] in DOMAINS and entry["kind"] in ("vqa", "report")
        assert Path(entry["path"]).name.startswith(f"{entry['domain']}_")
        src = read_records(entry["source"])
        rows = [json.loads(line) for line in Path(entry["path"]).read_text().splitlines()]
        assert len(rows) == len(src) == entry["records"]
        for rec, row in zip(src, rows):
            assert {k: row[k] for k in rec.raw} == rec.raw  # every query field kept
            assert 1 <= row["retrieve_k"] <= 4 and row["domain"] in DOMAINS
            assert len(row["reference_reports"]) == len(row["reference_ids"]) == len(row["reference_scores"]) == row["retrieve_k"]
            assert row["reference_scores"] == sorted(row["reference_scores"], reverse=True)
    metrics = json.loads((out / "retrieval_metrics.json").read_text())
    assert 0.0 <= metrics["domain_accuracy"] <= 1.0
    some = next(iter(metrics["files"].values()))
    assert {"findings_R@1", "findings_R@5", "findings_R@10", "routing_accuracy", "mean_k"} <= some.keys()
    vqa = [v for v in metrics["files"].values() if v["kind"] == "vqa"]
    assert vqa and all(0.0 <= v["reference_vote_accuracy"] <= 1.0 and v["reference_vote_n"] > 0 for v in vqa)
    assert all(0 <= v["log_gap_p50"] <= v["log_gap_p90"] <= v["log_gap_p99"] for v in metrics["files"].values())


def test_gap_rule_that_never_cuts_is_reported(trained, capsys):
    root, world = trained
    run(root, world, "nocut", "--query_roles", "[test_vqa]", "--k.rule", "gap", "--k.k", "4", "--k.gamma", "100")
    out = capsys.readouterr().out
    assert "warning:" in out and "kept all 4 reports for every query" in out
    run(root, world, "cuts", "--query_roles", "[test_vqa]", "--k.rule", "gap", "--k.k", "4", "--k.gamma", "0")
    assert "warning:" not in capsys.readouterr().out


def test_cache_reused_and_output_stable(trained):
    root, world = trained
    first = run(root, world, "again", "--routing", "oracle")
    caches = {p: p.stat().st_mtime_ns for p in (first / "cache").glob("*.safetensors")}
    assert len(caches) == 3  # one corpus per domain
    before = {p.name: p.read_text() for p in first.glob("*.jsonl")}
    run(root, world, "again", "--routing", "oracle")
    assert {p: p.stat().st_mtime_ns for p in (first / "cache").glob("*.safetensors")} == caches
    assert {p.name: p.read_text() for p in first.glob("*.jsonl")} == before
    metrics = json.loads((first / "retrieval_metrics.json").read_text())
    assert metrics["domain_accuracy"] == 1.0  # oracle routing


def test_unreadable_query_image_keeps_its_line(trained, tmp_path):
    root, world = trained
    entry = manifest_files(world, role="test_vqa", domain="pathology")[0]
    rows = [json.loads(line) for line in Path(entry["path"]).read_text().splitlines()][:3]
    rows[1]["image"] = "missing/nowhere.png"
    rows.append(dict(rows[0], question="<image>"))  # a bad record: skipped, named in retrieval_metrics.json
    qfile = tmp_path / "queries.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "retrieve.yaml"
    cfg.write_text(yaml.safe_dump({"queries": [{"path": str(qfile), "domain": "pathology", "image_root": entry["image_root"]}]}))
    out = tmp_path / "out"
    retrieve.main([str(cfg), "--clip_dir", str(root / "clip"), "--data.world", str(world), "--output_dir", str(out)])
    got = [json.loads(line) for line in (out / "pathology_queries.jsonl").read_text().splitlines()]
    assert len(got) == 3
    assert got[1]["reference_reports"] == [] and "retrieve_error" in got[1]
    assert got[0]["retrieve_k"] == 5 and got[2]["retrieve_k"] == 5
    metrics = json.loads((out / "retrieval_metrics.json").read_text())["files"]["pathology_queries.jsonl"]
    assert metrics["unreadable_images"] == 1
    assert metrics["bad_images"] == {str(Path(entry["image_root"]) / "missing/nowhere.png"): "missing"}
    bad = json.loads((out / "retrieval_metrics.json").read_text())["bad_records"]
    assert bad == {"count": 1, "records": [f"{qfile}:4: no text: `question` is missing or empty"]}


def test_python_api(trained):
    root, world = trained
    r = retrieve.Retriever.load(root / "clip")
    entry = manifest_files(world, role="test_report", domain="ophthalmology")[0]
    recs = read_records(entry["path"], default_image_root=entry["image_root"])[:2]
    images = [load_image(Path(entry["image_root"]) / rec.images[0]) for rec in recs]
    assert all(d in DOMAINS for d in r.route(images))
    hits = r.search(images, domain="ophthalmology", k_rule=KRule("fixed", k=3))
    assert [len(h) for h in hits] == [3, 3]
    corpus = r.corpus("ophthalmology")
    assert all(h.text in corpus.texts and h.id in corpus.ids for row in hits for h in row)
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score


def test_outputs_folder_can_be_moved(trained, tmp_path, monkeypatch):
    """World, retriever and retrieval in one outputs/ tree: after moving it, index.json, the retrieval
    JSONL, their images and the retriever's corpus (data.json) are all still found."""
    import shutil

    from data.images import resolve_image

    _, world = trained
    project = tmp_path / "project"
    shutil.copytree(world, project / "outputs" / "world")
    monkeypatch.chdir(project)
    cfg = {"clip": {"model": "tiny-retrieve-test", "model_config": TINY_ARCH}, "data": {"world": "outputs/world"},
           "domains": ["pathology"], "output_dir": "outputs/clip", "epochs": 1, "batch_size": 8, "max_steps": 1,
           "domain_classifier": False}
    Path("clip.yaml").write_text(yaml.safe_dump(cfg))
    finetune_clip.main(["clip.yaml"])
    retrieve.main(["--clip_dir", "outputs/clip", "--data.world", "outputs/world", "--output_dir", "outputs/retrieval",
                   "--domains", "[pathology]", "--routing", "fixed", "--domain", "pathology", "--query_roles", "[test_vqa]"])
    moved = tmp_path / "elsewhere" / "outputs"
    moved.parent.mkdir()
    (project / "outputs").rename(moved)
    monkeypatch.chdir(tmp_path)
    index = moved / "retrieval" / "index.json"
    assert (index.parent / json.loads(index.read_text())["clip_dir"]).resolve() == (moved / "clip").resolve()
    entries = read_index(index, ["test_vqa"])
    assert entries
    for entry in entries:
        assert Path(entry["source"]).is_file() and Path(entry["image_root"]).is_dir()
        rows = read_records(entry["path"], default_image_root=entry["image_root"])
        assert len(rows) == entry["records"] and all("reference_reports" in r.meta for r in rows)
        assert resolve_image(rows[0].images[0], rows[0].image_root, entry["image_root"]).is_file()
    corpus = retrieve.Retriever.load(moved / "clip", domains=["pathology"]).corpus("pathology")
    assert corpus.texts


def test_real_config_on_a_partial_release(trained, tmp_path, capsys):
    """configs/mmed_rag/pathology/retrieve.yaml: test queries from data_root, alignment queries from
    sources_dir; an absent query file or corpus is named and left out; only nothing left stops the run."""
    from common.io import InputError
    from tests.test_retriever_train import release_from_world

    root, world = trained
    data, images = release_from_world(world, tmp_path, {
        "training/retriever/radiology/radiology_train.json": "radiology/retriever_train_report_mimic.json",
        "training/retriever/pathology/pathology_train.json": "pathology/retriever_train_report.json",
        "training/retriever/ophthalmology/harvard_train_7000.json": "ophthalmology/retriever_train_report.json",
        "test/vqa/pmc_test.jsonl": "pathology/test_vqa.jsonl",
    })
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "pathology_alignment_vqa.jsonl").write_bytes((world / "pathology" / "alignment_vqa.jsonl").read_bytes())
    config = str(Path(__file__).resolve().parent.parent / "configs" / "mmed_rag" / "pathology" / "retrieve.yaml")
    common = ["--clip_dir", str(root / "clip"), "--data.data_root", str(data), "--data.image_roots", "{}",
              "--data.image_root", str(images), "--sources_dir", str(sources), "--mixed_precision", "no", "--num_workers", "0"]
    retrieve.main([config, *common, "--output_dir", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "retrieval_metrics.json").read_text())
    assert metrics["missing"] == [str(data / "test/vqa/quilt_test.jsonl")] and metrics["skipped_domains"] == []
    assert f"warning: {data / 'test/vqa/quilt_test.jsonl'}: not found; going on without it" in capsys.readouterr().err
    entries = read_index(tmp_path / "out" / "index.json", ["test_vqa", "alignment_vqa"])
    assert [(e["path"].name, e["role"]) for e in entries] == [("pathology_pmc_test.jsonl", "test_vqa"),
                                                              ("pathology_pathology_alignment_vqa.jsonl", "alignment_vqa")]
    assert all(r["retrieve_k"] == 5 for r in map(json.loads, entries[0]["path"].read_text().splitlines()))

    (data / "training/retriever/radiology/radiology_train.json").unlink()
    retrieve.main([config, *common, "--routing", "oracle", "--output_dir", str(tmp_path / "oracle")])
    metrics = json.loads((tmp_path / "oracle" / "retrieval_metrics.json").read_text())
    assert metrics["skipped_domains"] == ["radiology"] and metrics["domains"] == ["pathology", "ophthalmology"]
    assert "warning: radiology: none of its retriever_train files was found; domain skipped" in capsys.readouterr().err
    with pytest.raises(InputError, match="routes to .'radiology'., which have no retriever or corpus here"):
        retrieve.main([config, *common, "--output_dir", str(tmp_path / "routed")])

    preference = [{"id": "p1", "image": "pmc_oa/x.png", "conversations": [{"from": "human", "value": "<image>\nIs it?"},
                                                                         {"from": "gpt", "value": "Yes."}],
                   "rejected_conversations": [{"from": "human", "value": "<image>\nIs it?"}, {"from": "gpt", "value": "No."}]}]
    (sources / "pathology_alignment_vqa.jsonl").write_text(json.dumps(preference[0]) + "\n")
    with pytest.raises(InputError, match=r"a preference record .*python -m pairs.release_sources --data_root .* --out "):
        retrieve.main([config, *common, "--routing", "oracle", "--output_dir", str(tmp_path / "pref")])
    with pytest.raises(InputError, match="no retriever_train file .* was found"):
        retrieve.main([config, *common, "--data.data_root", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "none")])


def prior_at_rank_1(out: Path, world: Path) -> tuple[int, int]:
    """(test VQA questions whose first reference is their own patient's prior study, questions)."""
    prior = {}
    for e in manifest_files(world, role="retriever_train"):
        prior.update({r.meta["prior_of"]: r.id for r in read_records(e["path"]) if "prior_of" in r.meta})
    rows = [r for e in read_index(out / "index.json", ["test_vqa"]) for r in read_records(e["path"])]
    return sum(r.meta["reference_ids"][:1] == [prior[r.meta["study"]]] for r in rows), len(rows)


def test_image_match_finds_the_patients_prior(trained, tmp_path):
    """Every queried study has a prior in the corpus: the prior's report says nothing of the
    patient's anatomy, its image shows it, so image match finds it first far more often."""
    root, _ = trained
    world = make_world(tmp_path / "world", size="tiny", progress=False, prior_share=1.0)
    common = ["--query_roles", "[test_vqa]", "--routing", "oracle", "--k.k", "3"]
    by_text = prior_at_rank_1(run(root, world, str(tmp_path / "text"), *common), world)
    by_image = prior_at_rank_1(run(root, world, str(tmp_path / "image"), *common, "--match", "image"), world)
    assert by_image[1] == by_text[1] > 50
    assert by_image[0] >= 0.8 * by_image[1] and by_image[0] >= by_text[0] + 0.3 * by_text[1], (by_image, by_text)
    summary = json.loads((tmp_path / "image" / "retrieval_metrics.json").read_text())
    assert summary["match"] == "image" and summary["corpus_unreadable_images"] == {d: 0 for d in DOMAINS}


def test_image_match_leaves_out_unreadable_corpus_images(trained, tmp_path):
    root, _ = trained
    world = make_world(tmp_path / "world", size="tiny", progress=False)
    corpus = read_records(manifest_files(world, role="retriever_train", domain="pathology")[0]["path"])
    entry = manifest_files(world, role="retriever_train", domain="pathology")[0]
    (Path(entry["image_root"]) / read_records(entry["path"])[0].images[0]).write_bytes(b"not an image")
    r = retrieve.Retriever.load(root / "clip", domains=["pathology"], match="image", cache_dir=tmp_path / "cache",
                                corpus_files={"pathology": [(entry["path"], entry["image_root"])]})
    assert len(r.index("pathology")) == len(corpus) - 1 and r.unreadable == {"pathology": 1}
    again = retrieve.Retriever.load(root / "clip", domains=["pathology"], match="image", cache_dir=tmp_path / "cache",
                                    corpus_files={"pathology": [(entry["path"], entry["image_root"])]})
    assert len(again.index("pathology")) == len(corpus) - 1 and again.unreadable == {"pathology": 1}  # from the cache
    assert corpus[0].id not in again.index("pathology").ids
