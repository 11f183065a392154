"""Rehearse the whole real chain on CPU before booking GPUs.

    bash scripts/rehearse.sh --data_root D [--image_root I] --out O [--policy P]

Runs every stage of the ``configs/mmed_rag`` chain, as its script would, on the user's copy of
the MMed-RAG release at CPU scale: a few dozen records per file (``<out>/sample/``), a small
CLIP built from a config, the toy policy architecture with a tokenizer trained on the sample's
text (unless ``--policy``), a few optimizer steps. Each stage runs in its own process with the
shipped config and only the sizes and output folders overridden, so what breaks here breaks
on the GPU run too, minutes instead of hours into it.

A failed stage does not stop the rest: the stages after it in that domain are marked as not
run, the other domains go on. Writes ``<out>/rehearsal.json``::

    {"missing": [release files the configs name that are absent],
     "files": {path relative to data_root: {"kind", "records", "bad_records"}},
     "stages": [{"stage", "domain" (or null), "ok", "seconds", "error"}]}

and ``<out>/rehearsal.md`` (the same as tables); each stage's output is in ``<out>/logs/``.
Exit 0 only when every stage ran for at least one domain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from common.config import ConfigError, cli_main, doc, load_config
from common.io import InputError, atomic_write_json, atomic_write_text
from data.readers import read_records
from data.records import DOMAINS
from data.release import RELEASE_FILES, image_search_path, release_files
from data.validate import validate

STAGES = ("validate", "policy", "sources", "finetune_clip", "retrieve", "build_pairs", "train_dpo", "evaluate", "infer")


@dataclass
class RehearseConfig:
    data_root: str = doc("", "the release's data/ folder (holds test/ and training/)")
    image_root: str = doc("", "image folder: holds every image, or one folder per set (mimic, iuxray, harvard, pmc, quilt)")
    image_roots: dict[str, str] = doc({}, "image set -> folder (mimic, iuxray, harvard, pmc, quilt); looked up before image_root")
    out: str = doc("outputs/rehearsal", "output folder: sample/, outputs/, logs/, rehearsal.json, rehearsal.md")
    policy: str = doc("", "policy folder (Hugging Face format); empty = the untrained toy architecture, tokenizer from the sample")
    trust_remote_code: bool = doc(False, "let every stage that loads --policy run the code shipped in it (off: safe by default)")
    records: int = doc(24, "records per release file in the sample the chain runs on")
    domains: list[str] = doc(list(DOMAINS), "domains to rehearse")
    configs: str = doc("configs/mmed_rag", "the chain's configs: <configs>/<domain>/{clip,retrieve,pairs,dpo,evaluate}.yaml")
    steps: int = doc(4, "optimizer steps of each CLIP and DPO run")
    max_length: int = doc(0, "token budget of pairs, DPO, evaluation and inference (0 = each config's own)")
    toy: bool = doc(False, "no release at hand: rehearse on the toy world written in the release's layout (<out>/toy_release)")
    timeout: int = doc(900, "seconds one stage may take before it counts as failed")


# ---------------------------------------------------------------- the release's files


def inventory(data_root: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(per present file: kind, records, bad_records; the release files that are absent)."""
    files, missing = {}, []
    for f in RELEASE_FILES:
        path = data_root / f.path
        if not path.is_file():
            missing.append(f.path)
            continue
        skipped: list[str] = []
        try:
            records = read_records(path, kind=f.kind, bad_record="skip", skipped=skipped)
            files[f.path] = {"kind": f.kind, "records": len(records), "bad_records": len(skipped)}
        except InputError as e:
            files[f.path] = {"kind": f.kind, "records": 0, "bad_records": 0, "error": str(e)}
    return files, missing


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over the list (all of them when it is short)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def write_sample(data_root: Path, out: Path, files: dict[str, dict], n: int) -> None:
    """The first-parse-clean files cut to ``n`` records each, same paths under ``out``.

    JSONL keeps its raw lines (a bad record stays as the user's file has it); a JSON list is
    re-written from its parsed elements.
    """
    for rel, info in files.items():
        if "error" in info:
            continue
        src, dst = data_root / rel, out / rel
        if rel.endswith(".jsonl"):
            lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
            atomic_write_text(dst, "".join(ln + "\n" for ln in _spread(lines, n)))
        else:
            rows = json.loads(src.read_text(encoding="utf-8"))
            atomic_write_text(dst, json.dumps(_spread(rows, n), indent=1, ensure_ascii=False) + "\n")


def sample_texts(sample: Path) -> list[str]:
    """Every natural-language field of the sample's non-test files (the toy tokenizer's corpus)."""
    from toy.toy_policy import record_texts

    texts = []
    for f in RELEASE_FILES:
        if (sample / f.path).is_file() and not f.role.startswith("test"):
            for rec in read_records(sample / f.path, kind=f.kind, bad_record="skip", skipped=[]):
                texts += [" ".join(t.split()) for t in record_texts(rec) if t.strip()]
    return texts


# ---------------------------------------------------------------- stages


def run_stage(name: str, domain: str | None, cmd: list[str], logs: Path, timeout: int) -> dict[str, Any]:
    """Run one stage's command; its row for rehearsal.json (error: the last line it printed)."""
    log = logs / f"{name}{'_' + domain if domain else ''}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    seconds = round(time.time() - t0, 1)
    error = None
    if rc != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if len(lines) > 1 else ""
        error = f"timed out after {timeout} s" if rc == -1 else f"exit {rc}: {last.strip()[:300]} (log: {log})"
    return {"stage": name, "domain": domain, "ok": rc == 0, "seconds": seconds, "error": error}


def _row(name: str, domain: str | None, ok: bool, seconds: float, error: str | None) -> dict[str, Any]:
    return {"stage": name, "domain": domain, "ok": ok, "seconds": round(seconds, 1), "error": error}


def validate_domain(sample: Path, domain: str, roots: list[str]) -> dict[str, Any]:
    """data.validate over one domain's sampled files, images decoded."""
    t0, problems = time.time(), []
    for f in release_files(domain=domain):
        if not (sample / f.path).is_file():
            continue
        try:
            _, summary = validate(str(sample / f.path), f.kind, roots, True, None)
        except InputError as e:
            problems.append(str(e))
            continue
        bad = summary["images_missing"] + summary["images_unreadable"]
        if bad:
            problems.append(f"{f.path}: {bad} of {summary['images_checked']} images missing or unreadable")
    return _row("validate", domain, not problems, time.time() - t0, "; ".join(problems)[:600] or None)


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def clip_command(cfg: RehearseConfig, domain: str) -> list[str]:
    """finetune_clip of one domain; the last domain's run also trains the domain classifier."""
    out = Path(cfg.out).resolve()
    return py(
        "retriever.finetune_clip", str(Path(cfg.configs) / domain / "clip.yaml"), "--data.data_root", str(out / "sample"),
        *roots_arguments(cfg, "data."), "--clip.model", "toy-clip", "--clip.pretrained", "", "--output_dir", str(out / "outputs" / "clip"),
        "--epochs", "1", "--max_steps", str(cfg.steps), "--batch_size", "8", "--val_batch_size", "16",
        "--num_workers", "0", "--mixed_precision", "no", "--val_every", "1",
        "--domain_classifier", "true" if domain == cfg.domains[-1] else "false",
        "--classifier_domains", json.dumps(cfg.domains), "--classifier.steps", "30",
    )


def chain_commands(cfg: RehearseConfig, domain: str, retrievers: list[str], policy: str) -> Iterator[tuple[str, list[str]]]:
    """The stages after CLIP of one domain: the shipped config, sizes and output folders overridden.

    A generator, so each command is made after the stage before it ran (DPO takes our pairs only
    when the pair builder made some)."""
    out = Path(cfg.out).resolve()
    conf = Path(cfg.configs) / domain
    clip_dir, run = str(out / "outputs" / "clip"), out / "outputs" / domain
    adapter = str(run / "dpo" / "adapter")
    budget = ["--max_length", str(cfg.max_length)] if cfg.max_length else []
    pol = ["--policy.path", policy, "--policy.dtype", "float32", "--policy.trust_remote_code", str(cfg.trust_remote_code).lower()]
    yield "retrieve", py(
        "retriever.retrieve", str(conf / "retrieve.yaml"), "--data.data_root", str(out / "sample"),
        *roots_arguments(cfg, "data."),
        "--domains", json.dumps(retrievers), "--sources_dir", str(out / "sources"), "--clip_dir", clip_dir,
        "--output_dir", str(run / "retrieval"), "--batch_size", "16", "--num_workers", "0", "--mixed_precision", "no",
    )
    yield "build_pairs", py(
        "pairs.build_pairs", str(conf / "pairs.yaml"), *pol,
        "--device", "cpu", "--retrieval_index", str(run / "retrieval" / "index.json"), "--out", str(run / "pairs"),
        "--limit", "6", "--batch_size", "4", "--max_new_tokens_report", "24", "--progress", "false", *budget,
    )
    ours = [str(run / "pairs" / "pairs.json")] if built_pairs(run / "pairs") else []
    yield "train_dpo", py(
        "dpo.train_dpo", str(conf / "dpo.yaml"), *pol,
        *roots_arguments(cfg), "--pairs", json.dumps(ours + released_pairs(cfg, domain)),
        "--lora.r", "4", "--lora.alpha", "8", "--train.output_dir", str(run / "dpo"), "--train.deepspeed", "",
        "--train.mixed_precision", "no", "--train.gradient_checkpointing", "false", "--train.max_steps", str(cfg.steps),
        "--train.batch_size", "2", "--train.num_workers", "0", "--train.save_every", str(cfg.steps),
        "--train.eval_every", str(cfg.steps), "--train.progress", "false", *budget,
    )
    yield "evaluate", py(
        "evaluation.evaluate", str(conf / "evaluate.yaml"), *pol,
        "--adapter", adapter, "--device", "cpu", "--retrieval_dir", str(run / "retrieval"), "--clip_dir", clip_dir,
        "--dpo_dir", str(run / "dpo"), "--out", str(run / "eval"), "--limit", "4", "--batch_size", "4",
        "--meteor", "false", "--max_new_tokens_report", "24", *budget,
    )
    yield "infer", py(
        "evaluation.infer", "--queries", str(run / "infer_queries.jsonl"), "--out", str(run / "infer" / "answers.jsonl"),
        *pol, "--adapter", adapter, "--clip_dir", clip_dir,
        "--cache_dir", str(run / "retrieval" / "cache"), "--policy.prompts", "configs/prompts/mmed_rag.yaml",
        "--device", "cpu", "--max_new_tokens_report", "24", *budget,
    )


def built_pairs(folder: Path) -> int:
    """How many pairs the pair builder wrote (an untrained policy, rarely right, may make none)."""
    try:
        return int(json.loads((folder / "pairs_stats.json").read_text())["pairs"])
    except (OSError, ValueError, KeyError):
        return 0


def released_pairs(cfg: RehearseConfig, domain: str) -> list[str]:
    """The sample's released alignment files of a domain (DPO trains on them beside ours)."""
    sample = Path(cfg.out).resolve() / "sample"
    return [str(sample / f.path) for f in release_files(domain=domain, role="alignment") if (sample / f.path).is_file()]


def infer_queries(sample: Path, domain: str, roots: list[str], out: Path) -> bool:
    """Two test queries of the domain (a question, a report request) for evaluation.infer; False if none."""
    from data.images import resolve_image
    from data.records import VqaRecord

    rows = []
    for f in release_files(domain=domain):
        if not f.role.startswith("test") or not (sample / f.path).is_file():
            continue
        for rec in read_records(sample / f.path, kind=f.kind, bad_record="skip", skipped=[])[:1]:
            image = str(resolve_image(rec.images[0], rec.image_root, roots)) if rec.images else ""
            question = rec.question if isinstance(rec, VqaRecord) else ""
            rows.append({"id": rec.id, "image": image, "question": question, "domain": domain})
    if rows:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows[:2]))
    return bool(rows)


def roots_arguments(cfg: RehearseConfig, prefix: str = "") -> list[str]:
    """The user's image folders as a stage's overrides (the configs' placeholders replaced)."""
    return [f"--{prefix}image_root", cfg.image_root, f"--{prefix}image_roots", json.dumps(cfg.image_roots)]


# ---------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Rehearsal of the MMed-RAG chain", "", "| stage | domain | ok | seconds | error |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['domain'] or '-'} | {'yes' if s['ok'] else '**no**'} | {s['seconds']} | {s['error'] or ''} |")
    lines += ["", "| file | kind | records | bad records |", "|---|---|---|---|"]
    for path, f in report["files"].items():
        lines.append(f"| {path} | {f['kind']} | {f['records']} | {f['bad_records']}{' ' + f['error'] if 'error' in f else ''} |")
    if report["missing"]:
        lines += ["", "Missing (named by the configs, absent under data_root):", ""]
        lines += [f"- {m}" for m in report["missing"]]
    return "\n".join(lines) + "\n"


def complete(stages: list[dict[str, Any]]) -> list[str]:
    """The stages that did not run cleanly for any domain."""
    return [name for name in STAGES if not any(s["stage"] == name and s["ok"] for s in stages)]


def toy_release(out: Path) -> tuple[str, str]:
    """(data_root, image_root) of the tiny toy world written in the release's layout under ``out``."""
    from toy.make_toy import make_world
    from toy.toy_release import write_release

    world = make_world(out / "world", seed=0, size="tiny", progress=False)
    write_release(world, out / "release", "configs/prompts/mmed_rag.yaml")
    return str(out / "release" / "data"), str(out / "release" / "images")


def rehearse(cfg: RehearseConfig) -> dict[str, Any]:
    if cfg.toy:
        if cfg.data_root:
            raise ConfigError("--toy makes its own release: give it without --data_root")
        cfg.data_root, cfg.image_root = toy_release(Path(cfg.out).resolve() / "toy_release")
    data_root, out = Path(cfg.data_root), Path(cfg.out).resolve()
    if not cfg.data_root or not data_root.is_dir():
        raise ConfigError(f"--data_root {cfg.data_root!r}: not a folder (the release's data/ folder)")
    unknown = set(cfg.domains) - set(DOMAINS)
    if unknown:
        raise ConfigError(f"--domains: unknown {sorted(unknown)}; known: {list(DOMAINS)}")
    roots = image_search_path(cfg.image_root, cfg.image_roots)
    files, missing = inventory(data_root)
    print(f"release: {len(files)} files present, {len(missing)} missing; sampling {cfg.records} records each", flush=True)
    sample, logs = out / "sample", out / "logs"
    write_sample(data_root, sample, files, cfg.records)
    stages: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> bool:
        stages.append(row)
        print(f"[{'ok' if row['ok'] else 'FAILED'}] {row['stage']}{' ' + row['domain'] if row['domain'] else ''} "
              f"({row['seconds']} s){': ' + row['error'] if row['error'] else ''}", flush=True)
        return row["ok"]

    for domain in cfg.domains:
        record(validate_domain(sample, domain, roots))
    policy = cfg.policy
    if not policy:
        texts = out / "policy_texts.txt"
        atomic_write_text(texts, "".join(t + "\n" for t in sample_texts(sample)))
        policy = str(out / "policy")
        record(run_stage("policy", None, py("toy.toy_policy", "configs/toy/toy_policy.yaml", "--texts", str(texts),
                                           "--out", policy, "--prompts", "configs/prompts/mmed_rag.yaml",
                                           "--vision_pretrain_epochs", "0", "--reading_steps", "0"), logs, cfg.timeout))
    else:
        stages.append(_row("policy", None, Path(policy).is_dir(), 0.0, None if Path(policy).is_dir() else f"{policy}: not a folder"))
    record(run_stage("sources", None, py("pairs.release_sources", "--data_root", str(sample), "--out", str(out / "sources")),
                     logs, cfg.timeout))
    retrievers = [d for d in cfg.domains
                  if record(run_stage("finetune_clip", d, clip_command(cfg, d), logs, cfg.timeout))]
    for domain in cfg.domains:
        if domain not in retrievers:
            stages.extend(_row(name, domain, False, 0.0, "not run: finetune_clip failed") for name in STAGES[4:])
            continue
        has_queries = infer_queries(sample, domain, roots, out / "outputs" / domain / "infer_queries.jsonl")
        failed = None
        for name, cmd in chain_commands(cfg, domain, retrievers, policy):
            if failed or (name == "infer" and not has_queries):
                why = f"{failed} failed" if failed else "no test file of this domain in the sample"
                record(_row(name, domain, False, 0.0, f"not run: {why}"))
            elif not record(run_stage(name, domain, cmd, logs, cfg.timeout)):
                failed = name
            elif name == "build_pairs":
                stages[-1]["pairs"] = n = built_pairs(out / "outputs" / domain / "pairs")
                if not n:
                    print(f"  {domain}: the policy's answers made no pair; DPO trains on the released pairs alone")
    return {"missing": missing, "files": files, "stages": stages}


def main() -> None:
    cfg = load_config(RehearseConfig, description=__doc__)
    t0 = time.time()
    report = rehearse(cfg)
    out = Path(cfg.out)
    atomic_write_json(out / "rehearsal.json", report)
    atomic_write_text(out / "rehearsal.md", markdown(report))
    not_run = complete(report["stages"])
    print(f"\nrehearsal: {time.time() - t0:.0f} s; {out / 'rehearsal.md'}")
    if not_run:
        print(f"error: no domain completed: {', '.join(not_run)}", file=sys.stderr)
        raise SystemExit(1)
    print("every stage ran for at least one domain")


if __name__ == "__main__":
    cli_main(main)
