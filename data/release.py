"""The layout of the MMed-RAG release's ``data/`` folder, and where its images are looked up.

Every path here is relative to ``data_root``, the release's ``data/`` folder. The configs in
``configs/mmed_rag/`` name these files; ``toy.toy_release`` writes the toy world in this layout
(with the release's quirks) so the whole real chain can be rehearsed without the real data.

Images are not part of the release. A user keeps each image set in its own folder and names it
in a config under ``image_roots`` (``{dataset: folder}``), or under one ``image_root`` that
holds a folder per set named as in ``DATASETS`` (``<image_root>/mimic/files/p10/...``), or
puts every image under ``image_root`` itself. Records of one file can come from two sets (the radiology files mix MIMIC-CXR
and IU-Xray), so an image is looked up in each configured folder in turn
(``image_search_path``; ``data.images.resolve_image`` takes the first folder that holds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.records import Kind

DATASETS = ("mimic", "iuxray", "harvard", "pmc", "quilt")


@dataclass(frozen=True)
class ReleaseFile:
    """One annotation file of the release."""

    path: str  # relative to data_root
    kind: Kind  # how data.readers reads it
    domain: str  # radiology | pathology | ophthalmology
    role: str  # retriever_train | retriever_val | alignment | test_vqa | test_report
    datasets: tuple[str, ...]  # the image sets its records point into


RELEASE_FILES: tuple[ReleaseFile, ...] = (
    ReleaseFile("training/retriever/radiology/radiology_train.json", "report", "radiology", "retriever_train", ("mimic", "iuxray")),
    ReleaseFile("training/retriever/radiology/radiology_val.json", "report", "radiology", "retriever_val", ("mimic", "iuxray")),
    ReleaseFile("training/retriever/pathology/pathology_train.json", "report", "pathology", "retriever_train", ("pmc", "quilt")),
    ReleaseFile("training/retriever/pathology/pathology_val.json", "report", "pathology", "retriever_val", ("pmc", "quilt")),
    ReleaseFile("training/retriever/ophthalmology/harvard_train_7000.json", "report", "ophthalmology", "retriever_train", ("harvard",)),
    ReleaseFile("training/retriever/ophthalmology/harvard_val_1000.json", "report", "ophthalmology", "retriever_val", ("harvard",)),
    ReleaseFile("training/alignment/radiology/radiology_vqa.json", "preference", "radiology", "alignment", ("mimic", "iuxray")),
    ReleaseFile("training/alignment/radiology/radiology_report.json", "preference", "radiology", "alignment", ("mimic", "iuxray")),
    ReleaseFile("training/alignment/pathology/pathology_vqa.json", "preference", "pathology", "alignment", ("pmc", "quilt")),
    ReleaseFile("training/alignment/ophthalmology/harvard_vqa.json", "preference", "ophthalmology", "alignment", ("harvard",)),
    ReleaseFile("training/alignment/ophthalmology/harvard_report.json", "preference", "ophthalmology", "alignment", ("harvard",)),
    ReleaseFile("test/vqa/iuxray_test.jsonl", "vqa", "radiology", "test_vqa", ("iuxray",)),
    ReleaseFile("test/vqa/mimic_test.jsonl", "vqa", "radiology", "test_vqa", ("mimic",)),
    ReleaseFile("test/vqa/harvard_test.jsonl", "vqa", "ophthalmology", "test_vqa", ("harvard",)),
    ReleaseFile("test/vqa/pmc_test.jsonl", "vqa", "pathology", "test_vqa", ("pmc",)),
    ReleaseFile("test/vqa/quilt_test.jsonl", "vqa", "pathology", "test_vqa", ("quilt",)),
    ReleaseFile("test/report/iuxray_test.json", "report", "radiology", "test_report", ("iuxray",)),
    ReleaseFile("test/report/mimic_test.json", "report", "radiology", "test_report", ("mimic",)),
    ReleaseFile("test/report/harvard_test.json", "report", "ophthalmology", "test_report", ("harvard",)),
)


def release_files(domain: str | None = None, role: str | None = None) -> list[ReleaseFile]:
    """The release's files of one domain and/or role, in table order."""
    return [
        f for f in RELEASE_FILES
        if (domain is None or f.domain == domain) and (role is None or f.role == role)
    ]


def image_search_path(
    image_root: str | Path | None = None, image_roots: dict[str, str] | None = None
) -> list[str]:
    """The folders an image is looked up in, in order: each ``image_roots`` entry, then the
    ``DATASETS`` folders that exist under ``image_root``, then ``image_root`` itself."""
    roots = [str(r) for r in (image_roots or {}).values() if r]
    if image_root:
        base = Path(image_root)
        roots += [str(base / d) for d in DATASETS if (base / d).is_dir() and str(base / d) not in roots]
        if str(base) not in roots:
            roots.append(str(base))
    return roots
