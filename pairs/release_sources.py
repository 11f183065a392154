"""Query files for the pair builder, recovered from the release's alignment files.

    bash scripts/release_sources.sh [CONFIG.yaml] --data_root D --out O   # = python -m pairs.release_sources

The MMed-RAG release's alignment files (``training/alignment/<domain>/*.json``) are finished
preference pairs: the human turn is an instruction with retrieved reference reports and the
question, the gpt turn of ``conversations`` the gold answer. The pair builder (pairs.build_pairs) starts
one step earlier, from queries that retrieval runs on; this turns the pairs back into queries.
Whether a file is VQA or report is told by its name (``*_vqa.json`` / ``*_report.json``).

The question is recovered from the prompt (``<image>`` mark removed) by matching it against the
with-references template of ``prompts`` (its ``{question}``); when the prompt does not match,
a VQA question is the last line ending in "?" and a report instruction the template's
``default_question``. Several pairs of one question (its D_cm and D_oa pairs) give one query.

Writes into ``out`` (each file atomically):

- ``<domain>_alignment_vqa.jsonl``: VQA records (``question_id``, ``question``, ``answer`` = the
  chosen answer, ``image``, ``image_root`` and ``report`` when the pair has them);
- ``<domain>_alignment_report.json``: report records (``id``, ``image_path``, ``report`` = the
  chosen answer, ``image_root`` when the pair has one);
- ``sources.json``: per alignment file the pairs read, its bad records, the queries it added and
  how each question was recovered; the files missing under ``data_root``; the outputs written
  (with the domain and role to give retrieval, e.g. in a ``queries:`` list of retrieve.yaml).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.config import ConfigError, cli_main, doc, load_config
from common.io import InputError, atomic_write_json, atomic_write_jsonl
from data.readers import BadRecordPolicy, bad_records_summary, read_records
from data.records import DOMAINS, PreferenceRecord
from data.release import ReleaseFile, release_files
from policy.prompts import PromptTemplates, load_prompt_templates

MMED_RAG_PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "prompts" / "mmed_rag.yaml"
HOW = ("template", "last_question_line", "default_question")  # how a question was recovered


@dataclass
class ReleaseSourcesConfig:
    data_root: str = doc("", "the release's data/ folder (holding training/alignment/<domain>/)")
    out: str = doc("outputs/mmed_rag/sources", "folder for the query files and sources.json (retrieve.yaml's sources_dir)")
    prompts: str = doc(str(MMED_RAG_PROMPTS), "prompt templates YAML the release's prompts follow (with references)")
    domains: list[str] = doc(list(DOMAINS), "domains whose alignment files are read")
    bad_record: Literal["skip", "error"] = doc("skip", "a pair that cannot be used: skip it (named in sources.json) or stop")


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching the text ``template`` fills in to, with named groups ``question`` and
    ``references``; ``{expert}`` and ``{image}`` match anything, a run of whitespace any run.

    The question takes no line break, so that it ends where a multi-line reference list does
    not when the two are only separated by a new line (the report template)."""
    parts: list[str] = []
    named: set[str] = set()
    for literal, field, _, _ in string.Formatter().parse(template.strip()):
        parts.append(r"\s+".join(re.escape(word) for word in re.split(r"\s+", literal)))
        if field in ("question", "references"):
            body = r"[^\n]*?" if field == "question" else r".*?"
            parts.append(f"(?P={field})" if field in named else f"(?P<{field}>{body})")
            named.add(field)
        elif field is not None:
            parts.append(r".*?")
    return re.compile("".join(parts), re.DOTALL)


def recover_question(prompt: str, pattern: re.Pattern[str], task: str, default: str) -> tuple[str, str] | None:
    """(question, how) from a prompt without its image mark; None for a VQA prompt with no question."""
    found = pattern.fullmatch(prompt.strip())
    if found and "question" in found.groupdict() and found["question"].strip():
        return found["question"].strip(), "template"
    if task == "report":
        return default, "default_question"
    lines = [ln.strip() for ln in prompt.splitlines() if ln.strip().endswith("?")]
    if lines:
        return re.sub(r"^question\s*:\s*", "", lines[-1], flags=re.IGNORECASE), "last_question_line"
    return None


def task_of(file: ReleaseFile) -> str:
    """vqa or report, told by the file name."""
    name = Path(file.path).name
    for task in ("vqa", "report"):
        if name.endswith(f"_{task}.json"):
            return task
    raise ValueError(f"{file.path}: name ends in neither _vqa.json nor _report.json")


def query_row(rec: PreferenceRecord, task: str, question: str, qid: str) -> dict[str, Any]:
    """One query record in the shape data.readers reads as a VqaRecord or ReportRecord."""
    if task == "vqa":
        row = {"question_id": qid, "question": question, "answer": rec.chosen, "image": rec.image}
        report = rec.meta.get("report")
        if isinstance(report, str) and report.strip():
            row["report"] = report
    else:
        row = {"id": qid, "image_path": rec.image, "report": rec.chosen}
    if rec.image_root:
        row["image_root"] = rec.image_root
    return row


@dataclass
class _Output:
    """The queries of one domain and task, deduplicated by (image, question)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def add(self, rec: PreferenceRecord, task: str, question: str) -> bool:
        if (rec.image, question) in self.seen:
            return False
        self.seen.add((rec.image, question))
        qid, n = rec.id, 2
        while qid in self.ids:  # two questions whose pairs carry one id
            qid, n = f"{rec.id}#{n}", n + 1
        self.ids.add(qid)
        self.rows.append(query_row(rec, task, question, qid))
        return True


def convert_file(
    path: Path, task: str, templates: PromptTemplates, out: _Output, bad_record: BadRecordPolicy
) -> dict[str, Any]:
    """Add one alignment file's queries to ``out``; returns its sources.json entry."""
    bad: list[str] = []
    records = read_records(path, "preference", None, bad_record, bad)
    t = templates.tasks[task]
    pattern = template_regex(t.with_references)
    how = dict.fromkeys(HOW, 0)
    added = 0
    for rec in records:
        got = recover_question(rec.prompt, pattern, task, t.default_question)
        if got is None:
            message = f"{rec.source}: no question in the prompt (no template match, no line ending in '?')"
            if bad_record == "error":
                raise InputError(message)
            bad.append(message)
            continue
        question, way = got
        how[way] += 1
        added += out.add(rec, task, question)
    return {"path": str(path), "task": task, "pairs": len(records), "bad_records": bad_records_summary(bad),
            "queries": added, "question_from": how}


def run(cfg: ReleaseSourcesConfig) -> dict[str, Any]:
    """Convert every alignment file present under ``data_root``; returns the sources.json summary."""
    if not cfg.data_root:
        raise ConfigError("--data_root: the release's data/ folder is required")
    unknown = sorted(set(cfg.domains) - set(DOMAINS))
    if unknown:
        raise ConfigError(f"domains: unknown {unknown}; expected some of {list(DOMAINS)}")
    root, out_dir = Path(cfg.data_root), Path(cfg.out)
    templates = load_prompt_templates(cfg.prompts)
    outputs: dict[tuple[str, str], _Output] = {}
    files, missing = [], []
    for f in release_files(role="alignment"):
        if f.domain not in cfg.domains:
            continue
        path = root / f.path
        if not path.is_file():
            missing.append(f.path)
            print(f"missing: {path} (skipped)")
            continue
        task = task_of(f)
        out = outputs.setdefault((f.domain, task), _Output())
        files.append({"domain": f.domain, **convert_file(path, task, templates, out, cfg.bad_record)})
    if not files:
        raise InputError(f"{root}: none of the release's alignment files is here ({', '.join(missing)})")
    written = []
    for (domain, task), out in outputs.items():
        if not out.rows:
            continue
        if task == "vqa":
            path = out_dir / f"{domain}_alignment_vqa.jsonl"
            atomic_write_jsonl(path, out.rows)
        else:
            path = out_dir / f"{domain}_alignment_report.json"
            atomic_write_json(path, out.rows)
        written.append({"path": str(path), "domain": domain, "role": f"alignment_{task}", "kind": task,
                        "records": len(out.rows)})
    summary = {"data_root": str(root), "prompts": cfg.prompts, "files": files, "missing": missing, "outputs": written}
    atomic_write_json(out_dir / "sources.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(ReleaseSourcesConfig, argv, description=__doc__)
    summary = run(cfg)
    for f in summary["files"]:
        bad = f["bad_records"]["count"]
        print(f"{f['path']}: {f['pairs']} pairs -> {f['queries']} new queries (question from {f['question_from']})"
              + (f", {bad} bad records" if bad else ""))
    for o in summary["outputs"]:
        print(f"written: {o['path']} ({o['records']} {o['kind']} queries)")


if __name__ == "__main__":
    cli_main(main)
