"""Lazy torch Datasets over records: compact metadata in memory, images decoded per item.

A dataset keeps only what its items need (image paths, roots, ids, texts), packed in numpy
arrays (``StringColumn``), not the record objects: forked DataLoader workers would otherwise
copy every record they touch (reference counting writes to the page), growing each worker to
the size of the whole annotation set over an epoch. Item ``index`` is the record's position
in the list given, so the caller's records (prompts, answers) are ``records[batch["index"]]``.

Images go through a caller-given ``transform`` (an open_clip preprocess, a HF image processor
wrapped in a function, or ``ResizeToTensor``); tokenisation is the caller's. A bad image follows
the dataset's policy (data.images): ``"error"`` raises BadImageError naming the path, ``"skip"``
(default) drops the sample. Skipping is counted in the main process:

- ``dataset[i]`` returns None for a bad sample (recorded in ``bad_log`` if one is given);
- a DataLoader fetches through ``__getitems__``, which returns a ``SkippedSample`` (path and
  reason) in its place; ``CollateSkip`` drops those and carries them in ``batch["skipped"]``;
- the training loop calls ``bad_log.take(batch)`` on each batch: it records the skipped samples
  and returns the batch (None when every sample of it was bad: skip that step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from data.images import (
    SKIPPED_KEY, BadImageError, BadImageLog, BadImagePolicy, Roots, SkippedSample, inside_root, load_image,
    root_for, search_path,
)
from data.records import PreferenceRecord, ReportRecord, VqaRecord

Transform = Callable[[Image.Image], Any]


class ResizeToTensor:
    """Resize to ``size`` x ``size`` and return a float CHW tensor in 0..1 (a minimal transform)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)


class StringColumn:
    """A column of strings packed in one byte array, read back one at a time.

    With ``dedupe`` (default) rows are int32 codes into the distinct strings, so repeated values
    (the image of several questions, a shared root) are stored once; without it (ids, all
    different) row i is string i. No Python string exists per row until one is read.
    """

    def __init__(self, strings: Iterable[str], dedupe: bool = True):
        if dedupe:
            distinct: dict[str, int] = {}
            codes = (distinct.setdefault(s, len(distinct)) for s in strings)
            self.codes = np.fromiter(codes, np.int32)
            values = list(distinct)
        else:
            values = list(strings)
            self.codes = None
        sizes = (len(s) if s.isascii() else len(s.encode("utf-8")) for s in values)
        self._ends = np.cumsum(np.fromiter(sizes, np.int64, len(values)))
        self._bytes = np.frombuffer("".join(values).encode("utf-8"), np.uint8)

    @property
    def n_distinct(self) -> int:
        return len(self._ends)

    def distinct(self, k: int) -> str:
        start = self._ends[k - 1] if k else 0
        return self._bytes[start : self._ends[k]].tobytes().decode("utf-8")

    def __getitem__(self, i: int) -> str:
        return self.distinct(i if self.codes is None else self.codes[i])

    def __len__(self) -> int:
        return len(self._ends) if self.codes is None else len(self.codes)


class _ImageDataset(Dataset):
    """Shared by the datasets below: ids, image roots, decoding under the bad-image policy.

    Arguments (all three datasets): ``records`` from data.readers; ``image_root`` the configured
    image folder, or several (an image is taken from the first that holds it), for records
    without a root of their own that exists here;
    ``transform`` PIL image -> model input; ``bad_image`` "skip" or "error"; ``npz_key`` the
    array inside .npz images (default: the first image-shaped one); ``bad_log`` where
    ``dataset[i]`` records skipped samples.
    """

    def __init__(
        self,
        records: Sequence[Any],
        image_root: Roots,
        transform: Transform,
        bad_image: BadImagePolicy = "skip",
        npz_key: str | None = None,
        bad_log: BadImageLog | None = None,
    ):
        if bad_image not in ("skip", "error"):
            raise ValueError(f"bad_image must be 'skip' or 'error', got {bad_image!r}")
        self.transform = transform
        self.bad_image = bad_image
        self.npz_key = npz_key
        self.bad_log = bad_log
        self.ids = StringColumn((r.id for r in records), dedupe=False)
        roots = StringColumn(r.image_root or "" for r in records)
        # each distinct root is checked here, in the main process: one warning per missing root
        self._roots = [
            search_path(roots.distinct(k) or None, image_root) for k in range(roots.n_distinct)
        ]
        self._root_of = roots.codes

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, rel: str, record: int) -> Any:
        roots = self._roots[self._root_of[record]]
        path = inside_root(rel, root_for(rel, roots))
        return self.transform(load_image(path, self.npz_key))

    def _item(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def _get(self, i: int) -> dict[str, Any] | SkippedSample:
        try:
            return self._item(i)
        except BadImageError as e:
            if self.bad_image == "error":
                raise
            return SkippedSample(e.path, e.reason, e.detail)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = self._get(i)
        if isinstance(item, SkippedSample):
            if self.bad_log is not None:
                self.bad_log.record(*item)
            return None
        return item

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any] | SkippedSample]:
        """Batched fetch used by DataLoader: bad samples stay visible to CollateSkip."""
        return [self._get(i) for i in indices]


def first_image(record: ReportRecord | VqaRecord) -> str:
    """The image a query is asked about: its first view (or its .npz)."""
    return record.images[0] if record.images else record.npz


class ImageTextDataset(_ImageDataset):
    """(image, text) pairs for CLIP: one item per view, so a 2-view study gives two pairs.

    Text is a ReportRecord's ``text`` (a VqaRecord's ``report``). A record with only an .npz
    (FairVLMed) gives one item from its array. Item ``index`` counts pairs; ``record`` is the
    record's position.
    """

    def __init__(self, records: Sequence[ReportRecord | VqaRecord], *args, **kw):
        super().__init__(records, *args, **kw)
        views = np.fromiter((max(len(r.images), 1) for r in records), np.int64, len(records))
        self._record = np.repeat(np.arange(len(records), dtype=np.int32), views)
        self._paths = StringColumn(p for r in records for p in (r.images or [r.npz]))
        self._texts = StringColumn(
            r.text if isinstance(r, ReportRecord) else r.report for r in records
        )

    def __len__(self) -> int:
        return len(self._record)

    def _item(self, i: int) -> dict[str, Any]:
        rec = int(self._record[i])
        image = self._image(self._paths[i], rec)
        text = self._texts[rec]
        return {"image": image, "text": text, "id": self.ids[rec], "index": i, "record": rec}


class QueryDataset(_ImageDataset):
    """VQA or report queries: the first image of each record; texts stay in the caller's records."""

    def __init__(self, records: Sequence[ReportRecord | VqaRecord], *args, **kw):
        super().__init__(records, *args, **kw)
        self._paths = StringColumn(first_image(r) for r in records)

    def _item(self, i: int) -> dict[str, Any]:
        return {"image": self._image(self._paths[i], i), "id": self.ids[i], "index": i}


class PreferenceDataset(_ImageDataset):
    """Preference pairs: the chosen image and the image the rejected answer is scored on.

    ``rejected_image`` is the stored noised image when the record names one, else the real
    image (D_oa pairs; and D_cm pairs with ``rejected_noised``, which the trainer noises itself:
    the flags ride along). Prompt and answers stay in the caller's records for the tokenizer.
    """

    def __init__(self, records: Sequence[PreferenceRecord], *args, **kw):
        super().__init__(records, *args, **kw)
        self._paths = StringColumn(r.image for r in records)
        self._rejected = StringColumn(r.rejected_image or "" for r in records)
        n = len(records)
        self._rejected_noised = np.fromiter((r.rejected_noised for r in records), bool, n)
        self._chosen_noised = np.fromiter((r.chosen_noised for r in records), bool, n)

    def _item(self, i: int) -> dict[str, Any]:
        image = self._image(self._paths[i], i)
        rejected_path = self._rejected[i]
        return {
            "image": image,
            "rejected_image": self._image(rejected_path, i) if rejected_path else image,
            "rejected_noised": bool(self._rejected_noised[i]),
            "chosen_noised": bool(self._chosen_noised[i]),
            "id": self.ids[i],
            "index": i,
        }


class CollateSkip:
    """Wrap a collate function: drop bad samples and carry them in ``batch["skipped"]``.

    ``fn`` must return a mapping (a dict, a HF BatchFeature). A batch with no good sample is
    ``{"skipped": [...]}``; ``BadImageLog.take`` turns it into None. A class, not a closure,
    so that it pickles into spawned workers.
    """

    def __init__(self, fn: Callable[[list], Any] = default_collate):
        self.fn = fn

    def __call__(self, samples: list) -> MutableMapping:
        good, skipped = [], []
        for s in samples:
            if s is None:
                skipped.append(SkippedSample("?", "skipped", "the dataset returned None"))
            elif isinstance(s, SkippedSample):
                skipped.append(s)
            else:
                good.append(s)
        batch = self.fn(good) if good else {}
        if not isinstance(batch, MutableMapping):
            got = type(batch).__name__
            raise TypeError(f"CollateSkip needs a collate function returning a dict, got {got}")
        batch[SKIPPED_KEY] = [*batch.get(SKIPPED_KEY, ()), *skipped]  # fn may skip samples of its own
        return batch
