"""The toy medical world: three domains of procedural studies in every MMed-RAG annotation format.

Each study has 0-3 findings from its domain's vocabulary, drawn at a severity in (0, 1] (about
30% subtle: small and low-contrast). Its image (``toy.render``) shows them; its report and
yes/no questions are generated from them with paraphrases, shuffled sentences and filler. Every
record also carries the ground truth (``findings``; for VQA ``finding`` and ``study``), kept as
metadata by readers and used by later stages for oracle retrieval and recall.

Every random draw is seeded from (seed, domain, split, index, purpose), so a record does not
depend on generation order and the same seed gives byte-identical files. Later stages find the
files only through ``manifest.json`` (data.manifest: ``load_manifest``, ``manifest_files``).

    bash scripts/make_toy.sh [--out DIR] [--seed N] [--size tiny|small|medium|large]
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.config import ConfigError, cli_main, doc, load_config, to_dict
from common.io import atomic_dir
from data.manifest import load_manifest
from data.records import DOMAINS
from toy.render import render_study

VERSION = 1
# appended, never reordered: a split's place seeds its studies' draws
SPLITS = ("policy_train", "retriever_train", "retriever_val", "alignment", "test", "dev")
BASE_SIZES = {
    # the toy policy learns from scratch: on 500 studies per domain its SFT ran ~27 passes and
    # overfit (train loss 0.17 while test accuracy stayed flat), so its split is the largest
    "policy_train": 2000,
    "retriever_train": 400,
    "retriever_val": 100,
    "alignment": 200,
    "test": 150,
    "dev": 100,
}
SIZES = {
    "tiny": {
        "policy_train": 16,
        "retriever_train": 12,
        "retriever_val": 6,
        "alignment": 8,
        "test": 40,
        "dev": 6,
    },
    **{
        name: {k: v * f for k, v in BASE_SIZES.items()}
        for name, f in (("small", 1), ("medium", 4), ("large", 20))
    },
}
# role -> (split, kinds): which files each split yields
ROLES = {
    "policy_train": ("policy_train", ("vqa", "report")),
    "retriever_train": ("retriever_train", ("report",)),
    "retriever_val": ("retriever_val", ("report",)),
    "val_vqa": ("retriever_val", ("vqa",)),  # the stages select on these studies (retrievers' checkpoint, k)
    "alignment_vqa": ("alignment", ("vqa",)),
    "alignment_report": ("alignment", ("report",)),
    "test_vqa": ("test", ("vqa",)),
    "test_report": ("test", ("report",)),
    "dev_vqa": ("dev", ("vqa",)),  # held-out questions for choosing the study's settings: no stage selects on them
}
SPLIT_LABEL = {
    "policy_train": "train",
    "retriever_train": "train",
    "retriever_val": "val",
    "alignment": "train",
    "test": "test",
    "dev": "val",
}
FAKE_ROOTS = {
    "mimic": "/data/authors/mimic-cxr-jpg/2.0.0",  # authors' paths: absent here
    "quilt": "/data/authors/quilt_1m/images",
}
FINDING_COUNTS = (1, 2, 3)
FINDING_COUNT_WEIGHTS = (0.4, 0.22, 0.13)  # of abnormal studies
SECOND_YES = 0.7  # chance to ask about a second present finding: balances yes against no
EVALUATION_SPLITS = ("test", "dev")  # asked as the benchmark asks, open questions included
OPEN_QUESTION = 0.08  # chance of a "main finding" question per abnormal study of those (~3% of rows)
SUBTLE_BELOW = 0.45  # severities under this are subtle (drawn from U(0.15, 0.35))


@dataclass(frozen=True)
class Finding:
    """How the text speaks of one finding: ``phrase`` fits "Is there {article}{phrase}?"."""

    name: str
    phrase: str
    mild: tuple[str, ...]
    marked: tuple[str, ...]
    says: tuple[str, ...]  # report sentences; {sev}/{Sev} is a severity word
    article: str = ""


def _f(name: str, phrase: str, mild: str, marked: str, *says: str, article: str = "") -> Finding:
    return Finding(name, phrase, tuple(mild.split("|")), tuple(marked.split("|")), says, article)


# fmt: off
# Per finding: name, question phrase, mild | marked severity words, then report sentences.
VOCAB: dict[str, list[Finding]] = {
    "radiology": [
        _f("cardiomegaly", "cardiomegaly", "mild|borderline", "moderate|marked",
           "There is {sev} cardiomegaly.", "{Sev} enlargement of the cardiac silhouette.",
           "The heart is enlarged ({sev}).", "Cardiomegaly, {sev}."),
        _f("pleural effusion", "pleural effusion", "small|trace", "moderate|large",
           "There is a {sev} pleural effusion.",
           "{Sev} pleural effusion with blunting of the costophrenic angle.",
           "Blunting of the costophrenic angle consistent with a {sev} effusion."),
        _f("pneumothorax", "pneumothorax", "small|tiny", "moderate|large",
           "There is a {sev} pneumothorax.", "{Sev} pneumothorax is present.",
           "A {sev} pneumothorax is seen, with absent lung markings peripherally."),
        _f("nodule", "pulmonary nodule", "tiny|faint", "well-defined|dense",
           "A {sev} pulmonary nodule is noted.", "There is a {sev} nodular opacity in the lung.",
           "{Sev} nodule projecting over the lung field.", article="a "),
        _f("consolidation", "consolidation", "subtle|patchy", "dense|extensive",
           "There is {sev} consolidation.", "{Sev} airspace opacity consistent with consolidation.",
           "Focal {sev} consolidation is seen in the lung."),
    ],
    "pathology": [
        _f("necrosis", "necrosis", "focal|minimal", "extensive|geographic",
           "There is {sev} necrosis.", "{Sev} necrosis is present.",
           "Areas of {sev} necrosis with nuclear debris are seen."),
        _f("mitoses", "mitotic activity", "rare|occasional", "frequent|numerous",
           "{Sev} mitotic figures are identified.", "There are {sev} mitoses.",
           "Mitotic figures are {sev}."),
        _f("inflammation", "inflammation", "mild|scattered", "dense|marked",
           "There is a {sev} lymphocytic infiltrate.", "{Sev} chronic inflammation is present.",
           "The stroma shows {sev} inflammatory cell infiltration."),
        _f("fibrosis", "fibrosis", "mild|focal", "extensive|dense",
           "There is {sev} fibrosis.", "{Sev} stromal fibrosis with collagen bundles.",
           "The stroma shows {sev} fibrotic change."),
        _f("atypia", "nuclear atypia", "mild|focal", "marked|severe",
           "There is {sev} nuclear atypia.", "Cells show {sev} nuclear pleomorphism.",
           "{Sev} cytologic atypia with enlarged irregular nuclei."),
    ],
    "ophthalmology": [
        _f("drusen", "drusen", "few small|scattered", "numerous|confluent",
           "There are {sev} drusen in the macula.", "{Sev} drusen are present.",
           "The fundus shows {sev} drusen deposits."),
        _f("hemorrhage", "retinal hemorrhage", "small|isolated", "multiple|large",
           "There are {sev} retinal hemorrhages.", "{Sev} blot hemorrhages are seen.",
           "The fundus shows {sev} intraretinal hemorrhage."),
        _f("cupping", "optic disc cupping", "mild|borderline", "marked|advanced",
           "There is {sev} cupping of the optic disc.",
           "{Sev} optic disc cupping with an enlarged cup-to-disc ratio.",
           "The optic nerve head shows {sev} glaucomatous cupping."),
        _f("exudates", "hard exudate", "few|scattered", "numerous|circinate",
           "There are {sev} hard exudates.", "{Sev} hard exudates are noted.",
           "The fundus shows {sev} yellow exudates."),
        _f("neovascularization", "neovascularization", "early|subtle", "extensive|florid",
           "There is {sev} neovascularization at the disc.",
           "{Sev} neovascularization of the disc is seen.",
           "Fine new vessels consistent with {sev} neovascularization."),
    ],
}
FINDINGS: dict[str, list[str]] = {d: [f.name for f in fs] for d, fs in VOCAB.items()}
NORMAL = {
    "radiology": ("No acute cardiopulmonary abnormality.", "The lungs are clear.",
                  "Heart size and mediastinal contours are normal.",
                  "No acute cardiopulmonary process."),
    "pathology": ("Unremarkable tissue without significant pathology.",
                  "Normal tissue architecture is preserved.",
                  "No significant histopathologic abnormality.",
                  "Benign tissue with no atypical features."),
    "ophthalmology": ("Normal fundus.", "The optic disc, macula and vessels appear normal.",
                      "No diabetic retinopathy or glaucomatous change.",
                      "Unremarkable fundus examination."),
}
FILLER = {  # technique / comparison sentences that say nothing about findings
    "radiology": ("PA and lateral views of the chest.", "Comparison: none.",
                  "Comparison is made to the prior study.", "Osseous structures are intact.",
                  "The visualized upper abdomen is unremarkable."),
    "pathology": ("Hematoxylin and eosin stain.", "H&E stained section.",
                  "Original magnification x20.", "A representative field is shown.",
                  "Image from a teaching case."),
    "ophthalmology": ("Color fundus photograph.", "Fundus photograph centered on the macula.",
                      "Image quality is adequate.",
                      "Both eyes were examined; this image shows one eye."),
}
DENY = ("No {phrase}.", "No evidence of {phrase}.", "Negative for {phrase}.")
ASK = ("Is there {a}{phrase} in this image?", "Does this image show {a}{phrase}?",
       "Is there any evidence of {phrase}?", "Can {a}{phrase} be seen in this image?")
ASK_OPEN = ("What is the main finding in this image?", "What abnormality is seen in this image?")
YES, NO = ("Yes.", "yes", "Yes"), ("No", "No.", "no")
# fmt: on
LONG_ANSWER = 0.3
NEGATE_ABSENT = 0.35


@dataclass(frozen=True)
class Study:
    """One generated case: its findings and their severities in (0, 1]."""

    domain: str
    split: str
    index: int
    findings: tuple[str, ...]
    severities: tuple[float, ...]
    prior_of: Study | None = None  # the later study of the same patient this one is the prior of

    @property
    def sid(self) -> str:
        return f"{self.domain[:3]}-{self.split}-{self.index:05d}"

    @property
    def number(self) -> int:
        """A number unique within the domain, for file-style ids."""
        return 1 + SPLITS.index(self.split) * 100_000 + self.index

    def rng(self, seed: int, purpose: str) -> np.random.Generator:
        """A prior study draws its images from its patient's later study: the same anatomy."""
        if self.prior_of is not None and purpose in ("image", "lateral"):
            return self.prior_of.rng(seed, purpose)
        return _rng(seed, self.domain, self.split, self.index, purpose)


def _rng(seed: int, domain: str, split: str, index: int, purpose: str) -> np.random.Generator:
    """One stream per (seed, domain, split, index, purpose): records don't depend on order."""
    purposes = ("study", "image", "lateral", "text", "vqa", "ids", "prior", "change", "miss")
    return np.random.default_rng(
        [seed, DOMAINS.index(domain), SPLITS.index(split), index, purposes.index(purpose)]
    )


def sample_study(
    seed: int,
    domain: str,
    split: str,
    index: int,
    subtle_share: float = 0.3,
    normal_share: float = 0.25,
) -> Study:
    """Draw a study's findings (0-3, about ``normal_share`` normal) and their severities."""
    rng = _rng(seed, domain, split, index, "study")
    n = 0
    if rng.random() >= normal_share:
        w = np.asarray(FINDING_COUNT_WEIGHTS)
        n = int(rng.choice(FINDING_COUNTS, p=w / w.sum()))
    names = FINDINGS[domain]
    picked = sorted(rng.choice(len(names), n, replace=False))
    sev = [
        rng.uniform(0.15, 0.35) if rng.random() < subtle_share else rng.uniform(0.55, 1.0)
        for _ in picked
    ]
    return Study(
        domain,
        split,
        index,
        tuple(names[i] for i in picked),
        tuple(round(float(s), 3) for s in sev),
    )


PRIOR_SPLITS = ("retriever_val", "alignment", "test", "dev")  # the studies queried against the corpus


def prior_studies(seed: int, domain: str, sizes: dict[str, int], share: float, change: float = 0.0,
                  **sample: float) -> list[Study]:
    """Prior studies for the retriever corpus: each queried study has one with probability ``share``.

    A prior shares its patient's anatomy and findings, each at a severity within 15% of the
    later one, and has its own report, as a patient's earlier study in a hospital's archive.
    With probability ``change`` one finding changed between them (interval change, the rule in
    follow-up imaging): the prior still looks like its patient, so retrieval by image finds it,
    but its report is wrong on that finding.
    """
    priors = []
    for split in PRIOR_SPLITS:
        for i in range(sizes[split]):
            later = sample_study(seed, domain, split, i, **sample)
            rng = later.rng(seed, "prior")
            if rng.random() >= share:
                continue
            sev = tuple(round(float(np.clip(v * rng.uniform(0.85, 1.15), 0.15, 1.0)), 3) for v in later.severities)
            findings = later.findings
            rng = later.rng(seed, "change")  # its own stream: change 0 leaves every prior as it was
            if rng.random() < change:
                findings, sev = interval_change(domain, findings, sev, rng)
            priors.append(Study(domain, "retriever_train", sizes["retriever_train"] + len(priors), findings, sev, later))
    return priors


def interval_change(domain: str, findings: tuple[str, ...], severities: tuple[float, ...],
                    rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The prior's findings with one of the domain's findings toggled: a present one absent (it
    appeared since), an absent one present and marked (it resolved since), in the domain's order."""
    present = dict(zip(findings, severities, strict=True))
    name = FINDINGS[domain][int(rng.integers(len(FINDINGS[domain])))]
    if present.pop(name, None) is None:
        present[name] = round(float(rng.uniform(0.55, 1.0)), 3)
    names = tuple(n for n in FINDINGS[domain] if n in present)
    return names, tuple(present[n] for n in names)


def _finding(domain: str, name: str) -> Finding:
    return next(f for f in VOCAB[domain] if f.name == name)


def write_report(study: Study, rng: np.random.Generator) -> str:
    """A report naming every present finding, negating some absent ones, shuffled, with filler."""
    clinical = []
    for name, s in zip(study.findings, study.severities, strict=True):
        f = _finding(study.domain, name)
        word = str(rng.choice(f.mild if s < SUBTLE_BELOW else f.marked))
        clinical.append(str(rng.choice(f.says)).format(sev=word, Sev=word.capitalize()))
    for f in VOCAB[study.domain]:
        if f.name not in study.findings and rng.random() < NEGATE_ABSENT:
            clinical.append(str(rng.choice(DENY)).format(phrase=f.phrase))
    if not study.findings:
        clinical += list(rng.choice(NORMAL[study.domain], int(rng.integers(1, 3)), replace=False))
    rng.shuffle(clinical)
    head, tail = [], []
    for sentence in rng.choice(FILLER[study.domain], int(rng.integers(0, 3)), replace=False):
        (head if rng.random() < 0.6 else tail).append(str(sentence))
    return " ".join(head + [str(s) for s in clinical] + tail)


def write_questions(study: Study, rng: np.random.Generator) -> list[tuple[str, str, str | None]]:
    """(question, answer, finding asked about) for one study: one present and one absent finding
    where possible (a second present one sometimes, so yes and no balance overall); in the test
    split, sometimes an open "main finding" question (finding None)."""
    present = list(study.findings)
    absent = [n for n in FINDINGS[study.domain] if n not in present]
    n_yes = 1 + (len(present) > 1 and rng.random() < SECOND_YES)
    asked = [(str(n), True) for n in rng.permutation(present)[:n_yes]]
    asked.append((str(rng.choice(absent)), False))
    rows = []
    for name, yes in asked:
        f = _finding(study.domain, name)
        question = str(rng.choice(ASK)).format(a=f.article, phrase=f.phrase)
        if rng.random() < LONG_ANSWER:
            answer = (
                f"Yes, there is {f.article}{f.phrase}." if yes else f"No, there is no {f.phrase}."
            )
        else:
            answer = str(rng.choice(YES if yes else NO))
        rows.append((question, answer, f.name))
    if study.split in EVALUATION_SPLITS and present and rng.random() < OPEN_QUESTION:
        main = present[int(np.argmax(study.severities))]
        rows.append((str(rng.choice(ASK_OPEN)), f"{main.capitalize()}.", None))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


# ---------------------------------------------------------------- files


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed, but byte-deterministic: numpy stamps each member with the current
    time, so members are written here with a fixed zip date."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _save_image(root: Path, rel: str, image: np.ndarray) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".jpg"):
        Image.fromarray(image).save(path, format="JPEG", quality=92)
    else:
        Image.fromarray(image).save(path, format="PNG", compress_level=3)


def _hex(rng: np.random.Generator, n: int) -> str:
    return "".join(f"{b:02x}" for b in rng.integers(0, 256, (n + 1) // 2))[:n]


def _iu_xray(
    study: Study, seed: int, image: np.ndarray, images: Path, report: str
) -> tuple[dict, str]:
    num = study.number
    rid = f"CXR{num}_IM-{num * 7919 % 10000:04d}"
    views = [f"iu_xray/{rid}/0.png", f"iu_xray/{rid}/1.png"]
    _save_image(images, views[0], image)
    lateral = render_study(
        study.domain, study.findings, study.severities, study.rng(seed, "lateral"), view="lateral"
    )
    _save_image(images, views[1], lateral)
    return {
        "id": rid,
        "report": report,
        "image_path": views,
        "split": SPLIT_LABEL[study.split],
    }, views[0]


def _mimic(
    study: Study, seed: int, image: np.ndarray, images: Path, report: str
) -> tuple[dict, str]:
    subject, study_id = 10_000_000 + study.number, 50_000_000 + study.number
    ids = study.rng(seed, "ids")
    dicom = "-".join(_hex(ids, 8) for _ in range(5))
    rel = f"mimic/files/p{str(subject)[:2]}/p{subject}/s{study_id}/{dicom}.png"
    _save_image(images, rel, image)
    split = {"val": "validate"}.get(SPLIT_LABEL[study.split], SPLIT_LABEL[study.split])
    return {
        "id": dicom,
        "study_id": study_id,
        "subject_id": subject,
        "report": report,
        "image_path": [rel],
        "split": split,
        "image_root": FAKE_ROOTS["mimic"],
    }, rel


def _pmc_oa_or_quilt(
    study: Study, seed: int, image: np.ndarray, images: Path, report: str
) -> tuple[dict, str]:
    """Half PMC-OA records (text in ``report``), half Quilt records (text in ``caption``)."""
    ids = study.rng(seed, "ids")
    if ids.random() < 0.5:
        rel = f"pmc_oa/PMC{study.number + 3_000_000}_F{int(ids.integers(1, 9))}.png"
        _save_image(images, rel, image)
        return {"id": Path(rel).stem, "image": rel, "report": report}, rel
    key = f"{_hex(ids, 11)}_{study.number}"
    rel = f"quilt/{key}.png"
    _save_image(images, rel, image)
    meta = {
        "magnification": int(ids.choice([10, 20, 40])),
        "source": "video",
        "video_id": _hex(ids, 11),
    }
    organ = str(
        ids.choice(["Dermatopathology", "Gastrointestinal", "Breast", "Pulmonary", "Renal"])
    )
    return {
        "id": key,
        "caption": report,
        "image_path": rel,
        "gpt4_summary": "",
        "metadata": meta,
        "pathology": [organ],
        "image_root": FAKE_ROOTS["quilt"],
    }, rel


def _fairvlmed(
    study: Study, seed: int, image: np.ndarray, images: Path, report: str
) -> tuple[dict, str]:
    """A JPEG plus an .npz holding the image array and the labels; text in ``report`` or
    ``gpt4_summary`` (half each)."""
    stem = f"{study.split}/data_{study.number:06d}"
    _save_image(images, f"{stem}.jpg", image)
    names = FINDINGS[study.domain]
    sev = dict(zip(study.findings, study.severities, strict=True))
    save_npz(
        images / f"{stem}.npz",
        fundus=image,
        labels=np.array([n in sev for n in names], np.int8),
        label_names=np.array(names),
        severities=np.array([sev.get(n, 0.0) for n in names], np.float32),
    )
    text_key = "report" if study.rng(seed, "ids").random() < 0.5 else "gpt4_summary"
    rec = {
        "id": Path(stem).name,
        "image_path": f"{stem}.jpg",
        "filename": f"{stem}.npz",
        text_key: report,
    }
    return rec, f"{stem}.jpg"


_WRITERS = {
    "iu_xray": _iu_xray,
    "mimic": _mimic,
    "pmc_oa+quilt": _pmc_oa_or_quilt,
    "fairvlmed": _fairvlmed,
}


def missed_findings(study: Study, seed: int, miss: float) -> tuple[str, ...]:
    """The present findings a reader leaves out of the study's report, each with probability ``miss``."""
    rng = study.rng(seed, "miss")  # its own stream: miss 0 leaves every report as it was
    return tuple(n for n in study.findings if rng.random() < miss)


def study_files(study: Study, seed: int, images: Path, missed: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], str, str]:
    """Render and save a study's images under ``images``.

    Returns (format, report record, VQA image path, report text). Radiology alternates IU-Xray
    (even index) and MIMIC (odd) studies, so each role gets one file of each. The image shows every
    finding; the report, and the record's labels (report-derived, as MIMIC-CXR's CheXpert labels
    are), leave out those ``missed``.
    """
    if study.domain == "radiology":
        fmt = ("iu_xray", "mimic")[study.index % 2]
    else:
        fmt = {"pathology": "pmc_oa+quilt", "ophthalmology": "fairvlmed"}[study.domain]
    kept = [(n, s) for n, s in zip(study.findings, study.severities, strict=True) if n not in missed]
    said = replace(study, findings=tuple(n for n, _ in kept), severities=tuple(s for _, s in kept))
    report = write_report(said, study.rng(seed, "text"))
    image = render_study(study.domain, study.findings, study.severities, study.rng(seed, "image"))
    rec, vqa_image = _WRITERS[fmt](study, seed, image, images, report)
    rec.update(findings=list(said.findings), severities=list(said.severities), study=study.sid)
    if missed:
        rec["missed"] = list(missed)
    return fmt, rec, vqa_image, report


def vqa_rows(study: Study, seed: int, image: str, report: str) -> list[dict[str, Any]]:
    """The study's VQA JSONL rows (real-file keys, then the ground truth)."""
    rows = []
    for j, (q, answer, finding) in enumerate(write_questions(study, study.rng(seed, "vqa"))):
        row = {
            "question_id": study.number * 10 + j,
            "question": q if study.domain == "pathology" else f"{q}\n<image>",
            "answer": answer,
            "image": image,
            "report": report,
        }
        if study.domain == "radiology":
            row["text"] = q
        rows.append(
            {
                **row,
                "findings": list(study.findings),
                "severities": list(study.severities),
                "finding": finding,
                "study": study.sid,
            }
        )
    return rows


def make_world(
    out: str | Path,
    seed: int = 0,
    size: str = "small",
    subtle_share: float = 0.3,
    normal_share: float = 0.25,
    prior_share: float = 0.0,
    prior_change: float = 0.0,
    report_miss: float = 0.0,
    alignment_studies: int = 0,
    progress: bool = True,
) -> Path:
    """Write a complete toy world to ``out`` (atomically replacing it) and return its path.

    ``alignment_studies`` (0: the size's own) sets the alignment split alone; studies are drawn
    by position, so a larger split holds the smaller one's studies and every other split is
    unchanged (the retriever corpus too, but for the priors of the added studies)."""
    if size not in SIZES:
        raise ConfigError(f"size {size!r} is not one of {list(SIZES)}")
    if alignment_studies < 0:
        raise ConfigError(f"alignment_studies must be >= 0, got {alignment_studies}")
    sizes = {**SIZES[size], **({"alignment": alignment_studies} if alignment_studies else {})}
    out = Path(out)
    total = len(DOMAINS) * sum(sizes.values())
    files = []
    with (
        atomic_dir(out) as tmp,
        tqdm(
            total=total, desc="toy world", unit="study", disable=not progress, mininterval=1.0
        ) as bar,
    ):
        for d in DOMAINS:
            images = tmp / d / "images"
            for split, count in sizes.items():
                reports: dict[str, list] = {}
                vqa: dict[str, list] = {}
                studies = [sample_study(seed, d, split, i, subtle_share, normal_share) for i in range(count)]
                if split == "retriever_train":
                    studies += prior_studies(seed, d, sizes, prior_share, prior_change,
                                             subtle_share=subtle_share, normal_share=normal_share)
                    bar.total += len(studies) - count
                for study in studies:
                    missed = missed_findings(study, seed, report_miss) if split == "retriever_train" else ()
                    fmt, rec, image, report = study_files(study, seed, images, missed)
                    if study.prior_of is not None:
                        rec["prior_of"] = study.prior_of.sid
                    reports.setdefault(fmt, []).append(rec)
                    vqa.setdefault(fmt, []).extend(vqa_rows(study, seed, image, report))
                    bar.update()
                files += _write_split(tmp, d, split, reports, vqa)
        manifest = {
            "seed": seed,
            "size": size,
            "version": VERSION,
            "config": {"subtle_share": subtle_share, "normal_share": normal_share, "prior_share": prior_share,
                       "prior_change": prior_change, "report_miss": report_miss,
                       "alignment_studies": sizes["alignment"]},
            "domains": {d: {"findings": FINDINGS[d], "image_root": f"{d}/images"} for d in DOMAINS},
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _write_split(
    root: Path, domain: str, split: str, reports: dict[str, list], vqa: dict[str, list]
) -> list[dict]:
    """Write one split's files (one per format for radiology) and return their manifest entries."""
    entries = []
    for role, (role_split, kinds) in ROLES.items():
        if role_split != split:
            continue
        for kind in kinds:
            for fmt in sorted(reports):
                suffix = f"_{fmt}" if domain == "radiology" else ""
                rel = f"{domain}/{split}_{kind}{suffix}.{'jsonl' if kind == 'vqa' else 'json'}"
                rows = vqa[fmt] if kind == "vqa" else reports[fmt]
                text = (
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    if kind == "vqa"
                    else json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
                )
                (root / rel).write_text(text, encoding="utf-8")
                entries.append(
                    {
                        "path": rel,
                        "domain": domain,
                        "role": role,
                        "kind": kind,
                        "format": "vqa_jsonl" if kind == "vqa" else fmt,
                        "records": len(rows),
                        "image_root": f"{domain}/images",
                    }
                )
    return entries


# knobs that change the retriever corpus (retriever_train) alone: every other split, policy_train's
# images with them, is the same file for file whatever they are set to (tests/test_toy.py checks it)
CORPUS_KNOBS = ("prior_share", "prior_change", "report_miss")


@dataclass
class ToyConfig:
    out: Path = doc(Path("outputs/toy/world"), "folder to write the world to (replaced atomically)")
    seed: int = doc(0, "random seed; the same seed gives byte-identical files")
    size: Literal["tiny", "small", "medium", "large"] = doc(
        "small", "studies per domain: small 2950 (2000 of them policy_train), medium 4x, large 20x; tiny is for tests"
    )
    subtle_share: float = doc(0.3, "share of finding instances drawn subtle (small, low contrast)")
    normal_share: float = doc(0.25, "share of studies without any finding")
    prior_share: float = doc(0.0, "share of queried studies (val, alignment, test, dev) with a prior study of the same patient in the retriever corpus: how much the references can know")
    prior_change: float = doc(0.0, "share of those priors with one finding changed since (appeared or resolved): "
                                   "references that look right by image and are wrong on that finding")
    report_miss: float = doc(0.0, "share of present findings a retriever-corpus report leaves unsaid (a reader's miss): "
                                  "references wrong where the query image shows the finding")
    alignment_studies: int = doc(0, "studies per domain in the alignment split, the one preference pairs are built from "
                                    "(0: the size's own, 200 for small): how many examples the tuning learns from")


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(
        ToyConfig,
        argv,
        description="Generate the toy medical world (images, reports, "
        "VQA in the MMed-RAG annotation formats, manifest.json).",
    )
    for name in ("subtle_share", "normal_share", "prior_share", "prior_change", "report_miss"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    start = time.perf_counter()
    kw = {k: v for k, v in to_dict(cfg).items() if k != "out"}
    root = make_world(cfg.out, **kw)
    for e in load_manifest(root)["files"]:
        print(f"{e['records']:7d}  {e['path']}")
    took = time.perf_counter() - start
    print(f"toy world ({cfg.size}, seed {cfg.seed}) written to {root} in {took:.1f} s")


if __name__ == "__main__":
    cli_main(main)
