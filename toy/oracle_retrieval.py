"""Oracle retrieval for the toy world: reference reports that are usually, not always, right.

A stand-in for the CLIP retriever where ground truth is wanted instead of a trained model: to
train the toy policy with references in its prompts (so it learns to lean on them, as real
Med-LVLMs do), and for pair-builder tests. For each query record, ``k`` reports are drawn from
the same domain's corpus (its ``retriever_train`` reports); each is, with probability
``p_correct``, a report of a study with the same findings (else one agreeing on the finding the
question asks about, else the most similar finding set), otherwise a uniformly random report.
Draws depend only on (seed, domain, record id), never on file order.

Output as retrieve.sh writes it (docs/DESIGN.md contract 2): ``<out>/<domain>_<file stem>.jsonl``
with every query field plus ``reference_reports``, ``retrieve_k``, ``domain``,
``reference_ids``, ``reference_scores`` (the findings agreement, Jaccard: an oracle's
similarity), and ``<out>/index.json`` listing the files (path, source, domain, role, kind,
records, image_root). References stay in draw order, so position tells nothing about
correctness.

    python -m toy.oracle_retrieval --world outputs/toy/world --out outputs/toy/oracle_retrieval \\
        [--roles [policy_train,test_vqa]] [--k 3] [--p_correct 0.8] [--seed 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.io import InputError, atomic_write_json, atomic_write_jsonl
from data.manifest import manifest_files
from data.noise import stable_seed
from data.readers import read_records
from data.records import ReportRecord, VqaRecord
from toy.make_toy import ROLES


class Reference(NamedTuple):
    id: str
    text: str
    findings: frozenset[str]


@dataclass
class ToyRetrievalConfig:
    world: str = doc("outputs/toy/world", "toy world folder (scripts/make_toy.sh)")
    out: str = doc("outputs/toy/oracle_retrieval", "output folder: one JSONL per query file + index.json")
    roles: list[str] = doc(
        ["policy_train", "alignment_vqa", "alignment_report", "val_vqa", "test_vqa", "test_report"],
        f"manifest roles whose files get references; known: {sorted(ROLES)}",
    )
    k: int = doc(3, "reference reports per query")
    p_correct: float = doc(0.8, "chance that each reference is a report of a study with the query's findings")
    seed: int = doc(0, "seed of the draws (with the domain and record id)")


def load_corpus(world: str | Path, domain: str) -> list[Reference]:
    """The domain's ``retriever_train`` reports with their ground-truth findings."""
    refs = []
    for entry in manifest_files(world, role="retriever_train", domain=domain):
        for r in read_records(entry["path"], kind="report"):
            if "findings" not in r.meta:
                raise InputError(f"{r.source}: no `findings` ground truth (not a toy world file?)")
            refs.append(Reference(r.id, r.text, frozenset(r.meta["findings"])))
    if not refs:
        raise InputError(f"{world}: no retriever_train reports for domain {domain}")
    return refs


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def oracle_references(
    key: str, findings: Sequence[str], finding: str | None, corpus: Sequence[Reference],
    k: int, p_correct: float, seed: int,
) -> list[Reference]:
    """``k`` distinct references for one query (fewer only if the corpus is smaller).

    "Right" candidates: same finding set; else (a question about ``finding``) the reports that
    agree on whether ``finding`` is present; else those of the most similar finding set.
    """
    truth = frozenset(findings)
    right = [i for i, r in enumerate(corpus) if r.findings == truth]
    if not right and finding is not None:
        right = [i for i, r in enumerate(corpus) if (finding in r.findings) == (finding in truth)]
    if not right:
        best = max(_jaccard(r.findings, truth) for r in corpus)
        right = [i for i, r in enumerate(corpus) if _jaccard(r.findings, truth) == best]
    rng = np.random.default_rng(stable_seed("oracle", key, seed))
    picked: list[int] = []
    for _ in range(min(k, len(corpus))):
        pool = right if rng.random() < p_correct else range(len(corpus))
        free = [i for i in pool if i not in picked] or [i for i in range(len(corpus)) if i not in picked]
        picked.append(free[int(rng.integers(len(free)))])
    return [corpus[i] for i in picked]


def retrieval_rows(
    records: Sequence[ReportRecord | VqaRecord], domain: str, corpus: Sequence[Reference],
    k: int, p_correct: float, seed: int,
) -> list[dict]:
    """Retrieval JSONL rows: each record's raw fields + the oracle's references."""
    rows = []
    for r in records:
        if "findings" not in r.meta:
            raise InputError(f"{r.source}: no `findings` ground truth (not a toy world file?)")
        finding = r.meta.get("finding") if isinstance(r, VqaRecord) else None
        refs = oracle_references(f"{domain}/{r.id}", r.meta["findings"], finding, corpus, k, p_correct, seed)
        truth = frozenset(r.meta["findings"])
        rows.append({
            **r.raw,
            "reference_reports": [x.text for x in refs],
            "retrieve_k": len(refs),
            "domain": domain,
            "reference_ids": [x.id for x in refs],
            "reference_scores": [round(_jaccard(x.findings, truth), 4) for x in refs],
        })
    return rows


def write_oracle_retrieval(cfg: ToyRetrievalConfig) -> Path:
    """Write every query file of ``cfg.roles`` with references; returns the index.json path."""
    unknown = sorted(set(cfg.roles) - set(ROLES))
    if unknown:
        raise ConfigError(f"roles: unknown {unknown}; known: {sorted(ROLES)}")
    if cfg.k < 1 or not 0.0 <= cfg.p_correct <= 1.0:
        raise ConfigError(f"need k >= 1 and 0 <= p_correct <= 1, got k={cfg.k}, p_correct={cfg.p_correct}")
    out = Path(cfg.out)
    corpora: dict[str, list[Reference]] = {}
    files = []
    for role in cfg.roles:
        for entry in manifest_files(cfg.world, role=role):
            domain = entry["domain"]
            if domain not in corpora:
                corpora[domain] = load_corpus(cfg.world, domain)
            records = read_records(entry["path"], kind=entry["kind"])
            rows = retrieval_rows(records, domain, corpora[domain], cfg.k, cfg.p_correct, cfg.seed)
            path = out / f"{domain}_{Path(entry['path']).stem}.jsonl"
            atomic_write_jsonl(path, rows)
            files.append({"path": str(path.resolve()), "source": entry["path"], "domain": domain, "role": role,
                          "kind": entry["kind"], "records": len(rows), "image_root": entry["image_root"]})
    index = out / "index.json"
    atomic_write_json(index, {"oracle": {"k": cfg.k, "p_correct": cfg.p_correct, "seed": cfg.seed}, "files": files})
    save_config(cfg, out / "run_config.yaml")
    return index


def main() -> None:
    cfg = load_config(ToyRetrievalConfig, description=__doc__)
    index = write_oracle_retrieval(cfg)
    print(f"oracle retrieval (k={cfg.k}, p_correct={cfg.p_correct}): {index}")


if __name__ == "__main__":
    cli_main(main)
