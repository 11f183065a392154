"""The toy world written in the MMed-RAG release's layout, with the release's quirks.

So that the whole real chain (``configs/mmed_rag``, ``scripts/rehearse.sh``) can run where the
release cannot be: on a build machine, in CI. The output mirrors what a user has after cloning
the release and collecting the image sets:

    <out>/data/...            the annotation files at the paths of data.release.RELEASE_FILES
    <out>/images/<dataset>/   one folder per image set (mimic, iuxray, harvard, pmc, quilt)

and the release's quirks, each seen in the real files:
- two IU-Xray test records whose ``question`` is only the image token, the question text
  sitting in ``answer``;
- alignment files in preference format (one reference report in the prompt, the gold answer
  as the chosen side), with an empty ``id`` on every over-reliance (D_oa) pair;
- per-record ``image_root`` folders of the authors' machines (MIMIC-CXR, Quilt), absent here.

Nothing of the real release is used: every text and image comes from the toy world.

    python -m toy.toy_release --world outputs/toy/world --out outputs/toy/release
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import cli_main, doc, load_config
from common.io import atomic_dir
from data.manifest import load_manifest
from data.release import RELEASE_FILES, ReleaseFile
from policy.prompts import PromptTemplates, load_prompt_templates

# toy image folder (under <domain>/images/) -> release image set; ophthalmology has no prefix
IMAGE_SETS = {"iu_xray": "iuxray", "mimic": "mimic", "pmc_oa": "pmc", "quilt": "quilt"}
BAD_IUXRAY_LINES = (3, 8)  # where the two image-token-only questions go in iuxray_test.jsonl


@dataclass
class ToyReleaseConfig:
    world: str = doc("outputs/toy/world", "toy world folder (scripts/make_toy.sh)")
    out: str = doc("outputs/toy/release", "output folder: data/ (the release layout) and images/<dataset>/")
    prompts: str = doc("configs/prompts/mmed_rag.yaml", "templates whose wording the alignment pairs' prompts take")


def split_image_path(domain: str, path: str) -> tuple[str, str]:
    """(image set, path inside it) of a toy image path such as ``iu_xray/CXR1_IM-0001/0.png``."""
    head, _, rest = path.partition("/")
    if domain != "ophthalmology" and head in IMAGE_SETS and rest:
        return IMAGE_SETS[head], rest
    return "harvard", path


def _relocate(domain: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row with its image paths made relative to their image set's folder."""
    row = dict(row)
    for key in ("image", "image_path"):
        value = row.get(key)
        if isinstance(value, str):
            row[key] = split_image_path(domain, value)[1]
        elif isinstance(value, list):
            row[key] = [split_image_path(domain, v)[1] for v in value]
    return row


def _toy_rows(world: Path, manifest: dict, domain: str, role: str, kind: str, name: str = "") -> list[dict]:
    """Rows of the world's files of one domain/role/kind (``name`` filters radiology's two formats)."""
    rows: list[dict] = []
    for e in manifest["files"]:
        if (e["domain"], e["role"], e["kind"]) == (domain, role, kind) and name in e["path"]:
            text = (world / e["path"]).read_text(encoding="utf-8")
            rows += [json.loads(ln) for ln in text.splitlines() if ln.strip()] if kind == "vqa" else json.loads(text)
    return [_relocate(domain, r) for r in rows]


def _report_text(row: dict) -> str:
    return row.get("report") or row.get("caption") or row.get("gpt4_summary") or ""


def _flip(answer: str) -> str:
    return "No." if answer.lower().startswith("yes") else "Yes."


def preference_pairs(rows: list[dict], domain: str, task: str, templates: PromptTemplates) -> list[dict]:
    """Released-style pairs of query rows: a D_cm pair each (same text, noised rejected image)
    and, for every other row, a D_oa pair with an empty ``id`` (the release's quirk)."""
    pairs = []
    for i, row in enumerate(rows):
        others = rows[i + 1:] + rows[:i]
        key = "image" if task == "vqa" else "image_path"
        other = next((r for r in others if r[key] != row[key]), row)  # another study's report
        reference = _report_text(other)
        if task == "vqa":
            rid, question, gold = str(row["question_id"]), row["question"].replace("<image>", "").strip(), row["answer"]
            wrong, image = _flip(gold), row["image"]
        else:
            rid, question, gold = str(row["id"]), None, _report_text(row)
            wrong = reference
            views = row["image_path"]
            image = views[0] if isinstance(views, list) else views
        prompt = "<image>\n" + templates.text(domain, task, question, [reference])

        def pair(pid: str, rejected: str, noised: int) -> dict:
            return {
                "id": pid,
                "image": image,
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": gold}],
                "rejected_conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": rejected}],
                "rejected_noised": noised,
            }

        pairs.append(pair(rid, gold, 1))
        if i % 2 == 0 and wrong:
            pairs.append(pair("", wrong, 0))
    return pairs


def _with_bad_questions(rows: list[dict]) -> list[dict]:
    """IU-Xray's quirk: copies of two records whose question is only the image token."""
    rows = list(rows)
    for line in BAD_IUXRAY_LINES:
        src = rows[min(line, len(rows) - 1)]
        bad = {**src, "question_id": f"{src['question_id']}-bad", "question": "<image>", "answer": src["question"].replace("<image>", "").strip()}
        rows.insert(min(line - 1, len(rows)), bad)
    return rows


def release_rows(world: Path, manifest: dict, f: ReleaseFile, templates: PromptTemplates) -> list[dict]:
    """The rows of one release file, made from the toy world (``manifest``: its manifest.json)."""
    name = {"iuxray": "iu_xray", "mimic": "mimic"}.get(f.datasets[0], "") if f.domain == "radiology" else ""
    if f.role in ("retriever_train", "retriever_val"):
        return _toy_rows(world, manifest, f.domain, f.role, "report")
    if f.role == "alignment":
        task = "vqa" if f.path.endswith("_vqa.json") else "report"
        rows = _toy_rows(world, manifest, f.domain, f"alignment_{task}", task)
        return preference_pairs(rows, f.domain, task, templates)
    kind = "vqa" if f.role == "test_vqa" else "report"
    if f.domain == "radiology":
        rows = _toy_rows(world, manifest, f.domain, f.role, kind, name)
        return _with_bad_questions(rows) if f.datasets == ("iuxray",) and kind == "vqa" else rows
    rows = _toy_rows(world, manifest, f.domain, f.role, kind)
    if f.domain == "pathology":  # PMC-OA and Quilt questions go to their own test files
        key = "image" if kind == "vqa" else "image_path"
        is_pmc = [str(r.get(key, "")).startswith("PMC") for r in rows]
        return [r for r, p in zip(rows, is_pmc) if p == (f.datasets == ("pmc",))]
    return rows


def _copy_images(world: Path, images: Path) -> None:
    """Each image set into its own folder (hard links where the file system allows)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for domain_dir in sorted(p for p in world.iterdir() if (p / "images").is_dir()):
        for sub in sorted((domain_dir / "images").iterdir()):
            if domain_dir.name == "ophthalmology":
                shutil.copytree(sub, images / "harvard" / sub.name, copy_function=link, dirs_exist_ok=True)
            elif sub.name in IMAGE_SETS:
                shutil.copytree(sub, images / IMAGE_SETS[sub.name], copy_function=link, dirs_exist_ok=True)


def write_release(world: str | Path, out: str | Path, prompts: str | Path) -> dict[str, int]:
    """Write ``out/data`` and ``out/images`` (atomically replacing ``out``); records per file."""
    world = Path(world)
    templates = load_prompt_templates(prompts)
    manifest = load_manifest(world)
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for f in RELEASE_FILES:
            rows = release_rows(world, manifest, f, templates)
            path = tmp / "data" / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if f.path.endswith(".jsonl"):
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
            path.write_text(text, encoding="utf-8")
            counts[f.path] = len(rows)
        _copy_images(world, tmp / "images")
    return counts


def main() -> None:
    cfg = load_config(ToyReleaseConfig, description="Write the toy world in the MMed-RAG release's layout, with its quirks.")
    counts = write_release(cfg.world, cfg.out, cfg.prompts)
    for path, n in counts.items():
        print(f"{n:6d}  data/{path}")
    print(f"toy release written to {cfg.out} (images under {cfg.out}/images/<dataset>/)")


if __name__ == "__main__":
    cli_main(main)
