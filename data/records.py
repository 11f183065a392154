"""Typed records: what every annotation format becomes once read (docs/DESIGN.md, file contract 1).

Readers in ``data/readers.py`` turn any MMed-RAG annotation file into lists of these. Each keeps
the untouched source object in ``raw`` (so retrieval JSONL can carry every query field) and
where it came from in ``source`` (``FILE:LINE`` for JSONL, ``FILE:[index]`` for JSON lists).
No format-specific code lives outside ``data/``: later stages use only these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["report", "vqa", "preference"]
DOMAINS = ("radiology", "pathology", "ophthalmology")


@dataclass(slots=True)
class ReportRecord:
    """An image-report pair (retriever train/val files, test report files)."""

    id: str
    text: str  # from `report`, else `caption`, else `gpt4_summary` (first non-empty)
    images: list[str]  # one entry per view, as written in the file (relative or absolute)
    image_root: str | None = None  # per-record `image_root`, if any
    npz: str | None = None  # `filename` pointing at an .npz with the image array (FairVLMed)
    meta: dict[str, Any] = field(default_factory=dict)  # every other key (split, study_id, findings...)
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(slots=True)
class VqaRecord:
    """A yes/no (or free-text) question on one image (test / alignment VQA JSONL)."""

    id: str  # `question_id` as a string
    question: str  # without the trailing "\n<image>" marker
    answer: str
    images: list[str]
    report: str = ""
    image_root: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(slots=True)
class PreferenceRecord:
    """A preference pair in LLaVA conversation format (+ our additions, docs/DESIGN.md contract 3)."""

    id: str
    image: str
    prompt: str  # the human turn, "<image>\n" marker removed
    chosen: str  # the gpt turn of `conversations`
    rejected: str  # the gpt turn of `rejected_conversations`
    rejected_noised: bool = False  # rejected side sees pure noise made at load time
    chosen_noised: bool = False
    rejected_image: str | None = None  # a stored noised image for the rejected side
    image_root: str | None = None
    pair_type: str | None = None  # "cm" | "oa1" | "oa2"
    domain: str | None = None
    task: str | None = None  # "vqa" | "report"
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""


Record = ReportRecord | VqaRecord | PreferenceRecord
