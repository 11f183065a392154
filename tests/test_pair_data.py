"""Preference data for DPO: held-out split, stages, per-side images (noise, stored x_v*), the 2B batch.

``write_pairs`` (tiny preference JSON files in our format and in the released one, with PNGs) and
``toy_policy`` are shared with tests/test_train_dpo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.io import InputError
from data.images import SKIPPED_KEY, SkippedSample
from data.noise import pure_noise, stable_seed
from dpo.pair_data import (
    PairCollator, PairDataset, is_heldout, load_pairs, pair_type_of, select_types, split_heldout, stage_indices,
)
from policy.budget import BUDGET_KEY
from policy.policy import IGNORE
from policy.prompts import load_prompt_templates
from toy.toy_policy import ToyPolicyConfig, build_toy_policy

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
QUESTION = "Is the square red?"
ANSWERS = {"red": "Yes, the square is red.", "blue": "No, the square is blue."}


def _square(color: str, seed: int, side: int = 40) -> Image.Image:
    """A coloured square on a noisy background: the colour is what the answer depends on."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (side, side, 3)).astype(np.uint8)
    img[8:32, 8:32] = COLORS[color]
    return Image.fromarray(img)


def write_pairs(root: Path, n: int = 24, released: bool = False) -> Path:
    """``n`` pairs over ``n // 2`` images, types cycling cm / oa1 / oa2.

    Ours: cm pairs name a stored noised image (``rejected_image``). Released format: no
    ``pair_type``, cm pairs have ``rejected_noised`` = 1 and every record carries an absolute
    ``image_root`` of the authors' machine (absent here), as the released files do.
    """
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        color = "red" if i % 4 < 2 else "blue"
        k = i // 2
        name = f"img{k}.png"
        if not (img_dir / name).exists():
            _square(color, k).save(img_dir / name)
        kind = ("cm", "oa1", "oa2")[i % 3]
        right, wrong = ANSWERS[color], ANSWERS["blue" if color == "red" else "red"]
        rejected = right if kind == "cm" else wrong
        rec = {
            "id": f"q{i}",
            "image": name,
            "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": right}],
            "rejected_conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": rejected}],
            "rejected_noised": int(kind == "cm"),
        }
        if released:
            rec["image_root"] = "/data/authors/mmed_rag/images"
        else:
            rec.update(pair_type=kind, domain="radiology", task="vqa")
            if kind == "cm":
                noised = f"noised_{i}.png"
                pure_noise((40, 40), i).save(img_dir / noised)
                rec["rejected_image"] = noised
        records.append(rec)
    path = root / ("released.json" if released else "pairs.json")
    path.write_text(json.dumps(records, indent=1))
    return path


def policy_texts() -> list[str]:
    return [QUESTION, *ANSWERS.values()] * 20


def toy_policy(out: Path) -> Path:
    """An untrained tiny LLaVA with a tokenizer trained on the pairs' text."""
    cfg = ToyPolicyConfig(vocab_size=300, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                          text_width=48, text_layers=2, text_heads=2, vision_heads=2)
    return build_toy_policy(policy_texts(), out, cfg)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("released"), released=True)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(toy_policy(tmp_path_factory.mktemp("policy") / "p"))


def test_heldout_split_is_by_id_and_order_free(ours):
    records = load_pairs([ours])
    train, held = split_heldout(records, 0.25, seed=0)
    assert len(train) + len(held) == len(records) and held
    train2, held2 = split_heldout(records[::-1], 0.25, seed=0)
    assert {r.id for r in held2} == {r.id for r in held}
    assert {r.id for r in split_heldout(records, 0.25, seed=1)[1]} != {r.id for r in held}
    # the fraction holds on many ids
    share = np.mean([is_heldout(f"id{i}", 0.1, 0) for i in range(5000)])
    assert 0.08 < share < 0.12
    assert split_heldout(records, 0.0, 0)[1] == []


def test_pairs_without_id_get_one_from_their_question(released, tmp_path):
    """Released D_oa pairs often have an empty id: the id, so the split and the noise seed, must
    not depend on how the file's path is spelled, and the pairs of one question stay together."""
    rows = json.loads(released.read_text())
    for r in rows:
        r["id"] = ""
    blank = released.parent / "blank_ids.json"
    blank.write_text(json.dumps(rows))
    spelled = tmp_path / "link_to_released"
    spelled.symlink_to(released.parent)
    a = load_pairs([blank])
    b = load_pairs([f"{spelled}/./blank_ids.json"])
    assert [r.id for r in a] == [r.id for r in b] and all(r.id.startswith("pair-") for r in a)
    assert [r.id for r in split_heldout(a, 0.3, 0)[1]] == [r.id for r in split_heldout(b, 0.3, 0)[1]]
    # records 2k and 2k+1 ask the same question on the same image (a cm and an oa pair)
    assert all(a[2 * k].id == a[2 * k + 1].id for k in range(len(a) // 2))
    assert len({r.id for r in a}) == len(a) // 2
    held = {r.id for r in split_heldout(a, 0.3, 0)[1]}
    assert held and all((a[2 * k].id in held) == (a[2 * k + 1].id in held) for k in range(len(a) // 2))


def test_bad_pair_is_skipped_and_collected(released, tmp_path):
    rows = json.loads(released.read_text())
    rows[3]["conversations"] = []
    path = tmp_path / "one_bad.json"
    path.write_text(json.dumps(rows))
    skipped: list[str] = []
    assert len(load_pairs([path], skipped=skipped)) == len(rows) - 1
    assert skipped == [f"{path}:[3]: `conversations` needs a human turn followed by a gpt turn"]
    with pytest.raises(InputError, match=r"one_bad\.json:\[3\]"):
        load_pairs([path], bad_record="error")


def test_released_records_get_types_and_stages(released, ours):
    records = load_pairs([released])
    assert {pair_type_of(r) for r in records} == {"cm", "oa"}
    assert all(r.pair_type is None for r in records)
    ours_records = load_pairs([ours])
    mixed = stage_indices(ours_records, [])
    assert mixed == [list(range(len(ours_records)))]
    cm, oa = stage_indices(ours_records, [["cm"], ["oa1", "oa2"]])
    assert {pair_type_of(ours_records[i]) for i in cm} == {"cm"}
    assert sorted(cm + oa) == list(range(len(ours_records)))
    with pytest.raises(ValueError, match="oa"):
        stage_indices(records, [["cm"], ["oa1", "oa2"]])  # released oa pairs would be dropped
    with pytest.raises(ValueError, match="two stages"):
        stage_indices(records, [["cm"], ["cm"]])


def test_select_types_keeps_the_listed_types_and_refuses_an_absent_one(released, ours):
    ours_records = load_pairs([ours])
    assert select_types(ours_records, []) == ours_records
    cm = select_types(ours_records, ["cm"])
    assert cm and {pair_type_of(r) for r in cm} == {"cm"}
    assert stage_indices(cm, [["cm"]]) == [list(range(len(cm)))]  # a control trained on D_cm alone
    with pytest.raises(InputError, match=r"\['oa'\].*have \['cm', 'oa1', 'oa2'\]"):
        select_types(ours_records, ["oa"])  # the released files' type, misused on ours


def test_rejected_side_sees_noise_or_stored_image(ours, released):
    records = load_pairs([released])
    root = released.parent / "images"
    ds = PairDataset(records, root, noise_seed=3)
    cm = next(i for i, r in enumerate(records) if r.rejected_noised)
    oa = next(i for i, r in enumerate(records) if not r.rejected_noised)
    item = ds[cm]
    want = pure_noise(item["image"].size, stable_seed(records[cm].id, 3))
    assert np.array_equal(np.asarray(item["rejected_image"]), np.asarray(want))
    assert not np.array_equal(np.asarray(item["rejected_image"]), np.asarray(item["image"]))
    # deterministic across datasets (workers, processes, reruns), different per record and seed
    assert np.array_equal(np.asarray(PairDataset(records, root, noise_seed=3)[cm]["rejected_image"]), np.asarray(want))
    assert not np.array_equal(np.asarray(PairDataset(records, root, noise_seed=4)[cm]["rejected_image"]), np.asarray(want))
    item = ds[oa]
    assert item["rejected_image"] is item["image"]
    # ours: the stored x_v* is used as it is
    mine = load_pairs([ours])
    ds = PairDataset(mine, ours.parent / "images")
    i = next(i for i, r in enumerate(mine) if r.rejected_image)
    stored = Image.open(ours.parent / "images" / mine[i].rejected_image).convert("RGB")
    assert np.array_equal(np.asarray(ds[i]["rejected_image"]), np.asarray(stored))
    # chosen_noised puts noise on the chosen side
    mine[0].chosen_noised = True
    item = PairDataset(mine, ours.parent / "images", noise_seed=3)[0]
    assert np.array_equal(np.asarray(item["image"]), np.asarray(pure_noise((40, 40), stable_seed("q0", 3, "chosen"))))


def test_collator_builds_one_2b_batch_with_per_side_pixels(ours, processor):
    records = load_pairs([ours])
    ds = PairDataset(records, ours.parent / "images")
    collate = PairCollator(records, processor, ["cm", "oa1", "oa2"], load_prompt_templates(), None)
    idx = [0, 1, 2]  # cm, oa1, oa2
    batch = collate([ds[i] for i in idx] + [SkippedSample("x.png", "missing")])
    inputs = batch["inputs"]
    assert inputs["input_ids"].shape[0] == inputs["pixel_values"].shape[0] == 6
    assert batch["index"].tolist() == idx and batch["pair_type"].tolist() == [0, 1, 2]
    assert [s.path for s in batch[SKIPPED_KEY]] == ["x.png"]
    pix = inputs["pixel_values"]
    assert not torch.equal(pix[0], pix[3])  # cm: the rejected row sees x_v*
    assert torch.equal(pix[1], pix[4])  # oa: both rows see x_v
    tok = processor.tokenizer
    for row, answer in [(0, records[0].chosen), (3, records[0].rejected), (4, records[1].rejected)]:
        labels = inputs["labels"][row]
        got = tok.decode(labels[labels != IGNORE], skip_special_tokens=True)
        assert got == answer
    assert (inputs["labels"][:, :5] == IGNORE).all()  # the prompt is never scored
    assert collate([SkippedSample("x.png", "missing")]) == {SKIPPED_KEY: [SkippedSample("x.png", "missing")]}
    assert [name for name, _ in batch[BUDGET_KEY]] == [records[i].source for i in idx]


def test_missing_file_names_itself(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_pairs([tmp_path / "nope.json"])
    with pytest.raises(InputError, match="no preference file"):
        load_pairs([])
