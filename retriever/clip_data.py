"""What CLIP fine-tuning, the domain classifier and retrieval share: each domain's retriever
files and images (``DataSpec``), the (image, text) datasets built from them, the accelerator.

``DataSpec`` lists the release's files per domain; without a ``data_root`` the toy world's
``manifest.json`` fills in (data.manifest). The training program is retriever.finetune_clip,
the domain classifier retriever.domain; both, and retriever.retrieve, import from here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from common.config import doc
from common.io import InputError
from data.images import Roots
from data.records import ReportRecord

CLIP_SUBDIR = "open_clip"  # inside each checkpoint folder


# ---------------------------------------------------------------- data


ROLES = ("retriever_train", "retriever_val")


@dataclass
class DataSpec:
    """Where each domain's retriever files and their images are.

    With ``data_root`` (the release's ``data/`` folder) the files are the ones listed, relative to
    it; a listed file that is absent is left out (``missing`` names it). Without it, any domain and
    role not listed comes from the toy world.
    """

    world: str = doc("outputs/toy/world", "toy world (manifest.json) supplying every file not listed below (when data_root is empty)")
    data_root: str = doc("", "the MMed-RAG release's data/ folder; relative train_files, val_files and retrieval query paths are read from it; empty = the working directory, and the toy world fills in")
    train_files: dict[str, list[str]] = doc({}, "domain -> retriever train annotation files (release: training/retriever/<domain>/...)")
    val_files: dict[str, list[str]] = doc({}, "domain -> retriever validation files (none found: the domain trains without validation)")
    image_root: str = doc("", "one folder under which the records' image paths are found, looked in after image_roots")
    image_roots: dict[str, str] = doc({}, "image set (mimic, iuxray, harvard, pmc, quilt) -> its folder; each is looked in, in turn, for every record")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image: skip the sample (counted) or stop with an error")
    bad_record: Literal["skip", "error"] = doc("skip", "an annotation record that cannot be used: skip it (named in the run summary) or stop")

    def path(self, path: str) -> str:
        """A configured annotation path: a relative one lies under ``data_root``."""
        return str(Path(self.data_root) / path) if self.data_root else path

    def roots(self) -> Roots:
        """The configured image folders, in search order (one folder as itself)."""
        from data.release import image_search_path

        found = image_search_path(self.image_root, self.image_roots)
        return found[0] if len(found) == 1 else found or None

    def _listed(self, domain: str, role: str) -> list[str] | None:
        given = (self.train_files if role == "retriever_train" else self.val_files).get(domain)
        return [self.path(f) for f in given or []] if given or self.data_root else None

    def files(self, domain: str, role: Literal["retriever_train", "retriever_val"]) -> list[tuple[str, Roots]]:
        """(annotation file, image folders) pairs of one domain and role, of the files that exist."""
        listed = self._listed(domain, role)
        if listed is not None:
            return [(f, self.roots()) for f in listed if Path(f).is_file()]
        from data.manifest import manifest_files

        found = manifest_files(self.world, role=role, domain=domain)
        if not found:
            raise InputError(f"{self.world}/manifest.json: no {role} file for domain {domain!r}")
        return [(e["path"], self.roots() or e["image_root"]) for e in found]

    def missing(self, domain: str, role: str) -> list[str]:
        """The files listed for a domain and role that do not exist."""
        return [f for f in self._listed(domain, role) or [] if not Path(f).is_file()]

    def records(
        self, domain: str, role: Literal["retriever_train", "retriever_val"], skipped: list[str] | None = None
    ) -> list[tuple[ReportRecord, Roots]]:
        """Every usable report record of a domain and role, with the image folders to resolve it
        against; bad records go to ``skipped`` (data.readers)."""
        from data.readers import read_records

        out = []
        files = self.files(domain, role)
        for path, root in files:
            recs = read_records(path, "report", root, self.bad_record, skipped)
            out += [(r, root) for r in recs]
        if files and not out:
            raise InputError(f"{domain} {role}: the files {[p for p, _ in files]} hold no records")
        return out


def warn(message: str) -> None:
    """One line on stderr, from the first process only (torchrun and accelerate set RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def present_domains(data: DataSpec, domains: list[str], roles: tuple[str, ...] = ROLES) -> tuple[list[str], list[str]]:
    """(the domains with a retriever_train file, the listed files that are absent), each absence warned about in one line."""
    missing = list(dict.fromkeys(f for d in domains for role in roles for f in data.missing(d, role)))
    for f in missing:
        warn(f"{f}: not found; going on without it")
    present = [d for d in domains if data.files(d, "retriever_train")]
    for d in domains:
        if d not in present:
            warn(f"{d}: none of its retriever_train files was found; domain skipped")
    return present, missing


def image_text_dataset(pairs: list[tuple[ReportRecord, Roots]], transform: Any, bad_image: str) -> Dataset:
    """One (image, text) item per view. Records carry their own root, so one dataset serves all files."""
    from data.datasets import ImageTextDataset

    records = [with_root(r, root) for r, root in pairs]
    return ImageTextDataset(records, None, transform, bad_image=bad_image)


def with_root(record: ReportRecord, root: Roots) -> ReportRecord:
    """The record with the file's default image root filled in where it has none of its own.

    A record's own root that does not exist here still falls back to the file's default folders
    (the first holding its image, as in data.images.pick_root), decided now because one dataset
    holds records of several files.
    """
    from data.images import pick_root

    first = record.images[0] if record.images else getattr(record, "npz", None)
    chosen = pick_root(record.image_root, root, first)
    if chosen == record.image_root:
        return record
    import dataclasses

    return dataclasses.replace(record, image_root=chosen)


def item_records(records: list[ReportRecord]) -> list[int]:
    """For each ImageTextDataset item (one per view), the index of its record."""
    return [ri for ri, r in enumerate(records) for _ in range(max(len(r.images), 1))]


class SeededItems(Dataset):
    """Each sample's random augmentation seeded by (seed, epoch, index).

    So a run resumed mid-epoch, or split over other processes or workers, draws exactly the
    same crops. The epoch lives in shared memory so persistent workers see it change.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _seeded(self, i: int) -> Any:
        outer = torch.get_rng_state()  # the caller's stream is left untouched
        torch.default_generator.manual_seed((self.seed * 1_000_003 + int(self._epoch[0]) * 10_000_019 + int(i)) % (2**63))
        try:
            return self.dataset.__getitems__([i])[0]
        finally:
            torch.set_rng_state(outer)

    def __getitem__(self, i: int) -> Any:
        return self._seeded(i)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return [self._seeded(i) for i in indices]


# ---------------------------------------------------------------- domain classifier


@dataclass
class ClassifierConfig:
    """The domain classifier F(x_v): a linear head on the frozen image embeddings of every domain's CLIP."""

    steps: int = doc(300, "full-batch AdamW steps on the cached features")
    lr: float = doc(0.05, "learning rate")
    weight_decay: float = doc(1e-3, "AdamW weight decay")
    checkpoint: str = doc("best", "which checkpoint of each retriever supplies features: best | latest")
    batch_size: int = doc(256, "images per encoding batch")
