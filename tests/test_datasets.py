"""Datasets and DataLoader: one item per view, bad-image policies, skipped counts across workers."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from common.io import InputError
from data import images
from data.datasets import CollateSkip, ImageTextDataset, PreferenceDataset, QueryDataset, ResizeToTensor, StringColumn
from data.images import BadImageLog
from data.loader import make_loader
from data.readers import read_records
from tests.fixtures_data import (
    PREFERENCE_RECORDS, REPORT_RECORDS, VQA_RECORDS, bad_images, good_images, write_json, write_jsonl,
)

TF = ResizeToTensor(16)
BAD_REASONS = {"missing": "missing", "empty": "empty", "truncated_png": "unreadable",
               "truncated_jpg": "unreadable", "text_png": "unreadable", "tiny": "too_small"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good_images(root)
    for tag, path in bad_images(root / "bad").items():
        if tag != "missing":
            shutil.move(path, root / path.name)
    return root


@pytest.fixture(autouse=True)
def fresh_root_cache(monkeypatch):
    monkeypatch.setattr(images, "_root_exists", {})


def vqa_records(tmp_path, names):
    rows = [dict(VQA_RECORDS[0], question_id=i, image=name) for i, name in enumerate(names)]
    return read_records(write_jsonl(tmp_path / "v.jsonl", rows))


def bad_name(tag):
    return {"missing": "missing.png", "empty": "empty.png", "truncated_png": "truncated.png",
            "truncated_jpg": "truncated.jpg", "text_png": "text.png", "tiny": "tiny.png"}[tag]


def test_string_column_round_trip():
    values = ["a", "", "naïve ✓", "a", "b" * 300]
    col = StringColumn(values)
    assert [col[i] for i in range(len(col))] == values and col.n_distinct == 4
    plain = StringColumn(values, dedupe=False)
    assert [plain[i] for i in range(len(plain))] == values and plain.n_distinct == 5
    assert len(StringColumn([])) == 0 and len(StringColumn([], dedupe=False)) == 0


def test_image_text_dataset_gives_one_pair_per_view(tmp_path, root):
    recs = read_records(write_json(tmp_path / "r.json", REPORT_RECORDS))
    ds = ImageTextDataset(recs, root, TF)
    assert len(ds) == 4  # two views + one + the npz
    items = [ds[i] for i in range(len(ds))]
    assert [it["id"] for it in items] == ["iu-1", "iu-1", "mimic-1", "harvard-1"]
    assert items[0]["text"] == items[1]["text"] == "The heart is normal. No effusion."
    assert not torch.equal(items[0]["image"], items[1]["image"])  # two different views
    assert [it["record"] for it in items] == [0, 0, 1, 2] and items[3]["image"].shape == (3, 16, 16)


def test_query_dataset_reads_the_first_image(tmp_path, root):
    recs = read_records(write_jsonl(tmp_path / "v.jsonl", VQA_RECORDS))
    ds = QueryDataset(recs, root, TF)
    item = ds[1]
    assert (item["id"], item["index"]) == ("2", 1) and item["image"].shape == (3, 16, 16)


def test_dataset_takes_each_image_from_the_root_holding_it(tmp_path, root):
    other = tmp_path / "second_set"
    other.mkdir()
    (other / "only_here.png").write_bytes((root / "rgb.png").read_bytes())
    recs = vqa_records(tmp_path, ["gray.png", "only_here.png", "nowhere.png"])
    ds = QueryDataset(recs, [root, other], TF, bad_image="error")
    assert ds[0]["image"].shape == ds[1]["image"].shape == (3, 16, 16)
    with pytest.raises(InputError, match=str(root / "nowhere.png")):
        ds[2]


def test_preference_dataset_loads_the_stored_rejected_image(tmp_path, root, caplog):
    caplog.set_level(logging.WARNING, logger="data.images")
    recs = read_records(write_json(tmp_path / "p.json", PREFERENCE_RECORDS))
    ds = PreferenceDataset(recs, root, TF)  # p3 names a root that does not exist here
    assert len(caplog.records) == 1 and "/nonexistent/authors/root" in caplog.records[0].getMessage()
    noised, plain, stored = ds[0], ds[1], ds[2]
    assert noised["rejected_noised"] and torch.equal(noised["rejected_image"], noised["image"])
    assert not plain["rejected_noised"] and torch.equal(plain["rejected_image"], plain["image"])
    assert not torch.equal(stored["rejected_image"], stored["image"])
    batch = BadImageLog().take(make_loader(ds, batch_size=3)._get_iterator().__next__())
    assert batch["rejected_noised"].tolist() == [True, False, False]


@pytest.mark.parametrize("tag", list(BAD_REASONS))
def test_bad_image_policies(tmp_path, root, tag):
    recs = vqa_records(tmp_path, ["rgb.png", bad_name(tag)])
    log = BadImageLog()
    skip = QueryDataset(recs, root, TF, bad_image="skip", bad_log=log)
    assert skip[0] is not None and skip[1] is None
    assert log.skipped == 1 and log.by_reason == {BAD_REASONS[tag]: 1}
    with pytest.raises(InputError, match=bad_name(tag).replace(".", r"\.")):
        QueryDataset(recs, root, TF, bad_image="error")[1]


def test_path_outside_root_is_skipped_or_refused(tmp_path, root):
    recs = vqa_records(tmp_path, ["../../../etc/passwd"])
    assert QueryDataset(recs, root, TF)[0] is None
    with pytest.raises(InputError, match="outside the image root"):
        QueryDataset(recs, root, TF, bad_image="error")[0]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_drops_bad_samples_and_counts_them_in_the_main_process(tmp_path, root, num_workers):
    names = ["rgb.png", "missing.png", "gray.png", "empty.png", "rgb.jpg", "truncated.png",
             "palette.png", "text.png", "tiny.png", "cmyk.jpg"]
    ds = QueryDataset(vqa_records(tmp_path, names), root, TF)
    loader = make_loader(ds, batch_size=3, num_workers=num_workers)
    log = BadImageLog()
    sizes, ids = [], []
    for batch in loader:
        batch = log.take(batch)
        if batch is None:
            continue
        sizes.append(len(batch["id"]))
        ids += batch["id"]
        assert batch["image"].shape[0] == len(batch["id"])
    assert sizes == [2, 1, 1, 1] and ids == ["0", "2", "4", "6", "9"]  # batch 3 (7, 8 bad + 6) shrinks
    assert log.skipped == 5 and log.summary()["distinct_images"] == 5
    assert log.by_reason == {"missing": 1, "empty": 1, "unreadable": 2, "too_small": 1}


def test_all_bad_batch_becomes_none(tmp_path, root):
    ds = QueryDataset(vqa_records(tmp_path, ["missing.png", "empty.png"]), root, TF)
    log = BadImageLog()
    batches = [log.take(b) for b in make_loader(ds, batch_size=2)]
    assert batches == [None] and log.skipped == 2


def test_collate_skip_needs_a_mapping():
    with pytest.raises(TypeError, match="returning a dict"):
        CollateSkip(lambda samples: samples)([{"a": 1}])


def test_loader_options_and_seeded_shuffle(tmp_path, root):
    ds = QueryDataset(vqa_records(tmp_path, ["rgb.png"] * 12), root, TF)

    def order(seed):
        return [i for b in make_loader(ds, batch_size=4, shuffle=True, seed=seed) for i in b["index"].tolist()]

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(12))
    loader = make_loader(ds, batch_size=4, num_workers=1)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    assert loader.pin_memory == torch.cuda.is_available()
    assert not make_loader(ds, batch_size=4).persistent_workers
