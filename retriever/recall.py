"""Retrieval quality: rank of the first relevant item, R@k, mean and median rank.

Relevance is label equality: each query and gallery item carries a label and an item is
relevant to a query when the labels match. Two labellings are used throughout:

- ``own``: the label is the report text itself (a hit is the query's own report, or an
  identical text);
- ``findings``: the label is the set of ground-truth findings (toy records carry ``findings``),
  so any report of the same findings counts: toy reports of equal findings differ only in wording.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch

KS = (1, 5, 10)


def label_ids(*groups: Sequence[Hashable | None]) -> list[torch.Tensor]:
    """Shared integer ids for hashable labels across several lists; None becomes -1 (never relevant)."""
    table: dict[Hashable, int] = {}
    return [
        torch.tensor([-1 if x is None else table.setdefault(x, len(table)) for x in g], dtype=torch.long)
        for g in groups
    ]


def findings_label(meta: dict[str, Any]) -> tuple[str, ...] | None:
    """The ground-truth findings of a record as a sorted tuple, or None if it carries none."""
    found = meta.get("findings")
    if found is None:
        return None
    if isinstance(found, str):
        found = [found]
    return tuple(sorted(str(f) for f in found))


@torch.no_grad()
def first_relevant_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, q_labels: torch.Tensor, g_labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """1-based rank of each query's best-scored relevant gallery item (float; inf if none).

    Rank = 1 + number of irrelevant items scored above the best relevant one, computed in
    query chunks so the full similarity matrix is never held.
    """
    ranks = torch.full((queries.shape[0],), float("inf"))
    for q0 in range(0, queries.shape[0], chunk):
        s = queries[q0 : q0 + chunk].float() @ gallery.float().T
        ql = q_labels[q0 : q0 + chunk]
        rel = (ql[:, None] == g_labels[None, :]) & (ql[:, None] >= 0)
        best = torch.where(rel, s, torch.tensor(float("-inf"))).max(dim=1).values
        above = ((s > best[:, None]) & ~rel).sum(dim=1).float() + 1
        ranks[q0 : q0 + chunk] = torch.where(rel.any(dim=1), above, torch.tensor(float("inf")))
    return ranks


def rank_summary(ranks: torch.Tensor, prefix: str = "", ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k, mean and median rank over the queries that have a relevant item."""
    r = ranks[torch.isfinite(ranks)]
    if r.numel() == 0:
        return {}
    out = {f"{prefix}R@{k}": float((r <= k).float().mean()) for k in ks}
    out[f"{prefix}mean_rank"] = float(r.mean())
    out[f"{prefix}median_rank"] = float(r.median())
    return out


def bidirectional_recall(
    images: torch.Tensor, texts: torch.Tensor, image_labels: torch.Tensor, text_labels: torch.Tensor, prefix: str = ""
) -> dict[str, float]:
    """Image-to-text and text-to-image R@1/5/10, mean/median rank, and their mean recall."""
    out = rank_summary(first_relevant_ranks(images, texts, image_labels, text_labels), f"{prefix}i2t_")
    out.update(rank_summary(first_relevant_ranks(texts, images, text_labels, image_labels), f"{prefix}t2i_"))
    recalls = [v for k, v in out.items() if "R@" in k]
    if recalls:
        out[f"{prefix}mean_recall"] = sum(recalls) / len(recalls)
    return out


def recall_at_k(retrieved: torch.Tensor, q_labels: torch.Tensor, ks: Sequence[int] = KS, prefix: str = "") -> dict[str, float]:
    """R@k from retrieved gallery labels [n_queries, >=max(ks)] (queries with label -1 left out)."""
    keep = q_labels >= 0
    if not keep.any():
        return {}
    hits = retrieved[keep] == q_labels[keep][:, None]
    out = {f"{prefix}R@{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}
    out[f"{prefix}n"] = int(keep.sum())
    return out


def reference_vote_accuracy(
    asked: Sequence[str | None], truth_yes: Sequence[bool | None], references: Sequence[Sequence[tuple[str, ...] | None]]
) -> dict[str, float]:
    """How well the retrieved reports alone answer yes/no finding questions.

    A reader that says yes iff most of the k references carry the asked finding (ground-truth
    ``findings`` labels, so toy-like data only): an upper bound on what reading the references
    can add, independent of any policy. Queries without a finding, a yes/no truth or labelled
    references are left out (``n`` counts the rest).
    """
    right = n = 0
    for finding, yes, refs in zip(asked, truth_yes, references):
        if finding is None or yes is None or not refs or any(r is None for r in refs):
            continue
        votes = sum(finding in r for r in refs)
        right += (2 * votes > len(refs)) == yes
        n += 1
    return {"reference_vote_accuracy": right / n, "reference_vote_n": n} if n else {}
