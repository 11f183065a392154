"""The DPO trainer on an untrained tiny LLaVA: one concatenated forward, the shared-prompt row,
per-side images, the released format, cached reference, exact resume, merged export, mDPO's
third answer, ZeRO-2 on 2 CPU processes.

The 2-process test runs this file as a module under torchrun (``-m tests.test_train_dpo ds OUT``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from common.config import cli_main
from common.engine import EngineConfig, LoraConfig, apply_lora, build_accelerator
from data.noise import pure_noise, stable_seed
from dpo.loss import dpo_loss, mdpo_loss, sft_loss
from dpo.pair_data import PairCollator, PairDataset, is_heldout, load_pairs, split_heldout
from dpo.train_dpo import (
    DpoConfig, DpoTrainer, collapse_metrics, encoded_images, frozen_image_encoder, pair_logps, run, shard, step_loss,
    summarize,
)
from policy.budget import BUDGET_KEY
from policy.policy import PolicySpec, answer_token_counts, load_policy, prompt_sharing_blocker, sequence_logps
from policy.prompts import load_prompt_templates
from tests.test_engine import LAUNCHER_VARS
from tests.test_pair_data import toy_policy, write_pairs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and many times faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate keeps process-wide singletons; each run builds its own Accelerator."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    write_pairs(root, n=16)
    write_pairs(root, n=16, released=True)
    toy_policy(root / "policy")
    return root


def config(world: Path, out: Path, pairs: str = "pairs.json", **over) -> DpoConfig:
    engine = dict(output_dir=str(out), batch_size=4, lr=5e-3, warmup_ratio=0.0, max_steps=4, log_every=1,
                  progress=False, seed=0)
    engine.update(over.pop("train", {}))
    base = dict(pairs=[str(world / pairs)], image_root=str(world / "images"),
                policy=PolicySpec(path=str(world / "policy")), heldout_fraction=0.25,
                lora=LoraConfig(r=8, alpha=16, dropout=0.0, train_projector=True), train=EngineConfig(**engine))
    return DpoConfig(**{**base, **over})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _batch(world: Path, policy, indices=(0, 1, 2), rejected_image=None, max_length=None, share_prompt=False):
    records = load_pairs([world / "pairs.json"])
    ds = PairDataset(records, world / "images")
    items = [ds[i] for i in indices]
    if rejected_image is not None:
        for it in items:
            it["rejected_image"] = rejected_image
    collate = PairCollator(records, policy.processor, ["cm", "oa1", "oa2"], load_prompt_templates(), max_length,
                           share_prompt)
    return records, items, collate(items)


def _user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _sharpen(model) -> None:
    """Larger random weights, so that log-probs depend clearly on the input (untrained init is flat)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)


def one_forward_equals_two(world: Path, policy) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs of one 2B-row forward, checked against two separate ones."""
    records, items, batch = _batch(world, policy)
    with torch.no_grad():
        chosen, rejected = pair_logps(policy.model, batch["inputs"])
        prompts = [_user_prompt(records[i].prompt) for i in (0, 1, 2)]
        alone_c = sequence_logps(policy.model, policy.encode_for_training(
            prompts, [records[i].chosen for i in (0, 1, 2)], [it["image"] for it in items]))
        alone_r = sequence_logps(policy.model, policy.encode_for_training(
            prompts, [records[i].rejected for i in (0, 1, 2)], [it["rejected_image"] for it in items]))
    torch.testing.assert_close(chosen, alone_c, rtol=0, atol=1e-4)
    torch.testing.assert_close(rejected, alone_r, rtol=0, atol=1e-4)
    return chosen, rejected


def test_concatenated_forward_equals_two_forwards(world):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    chosen, rejected = one_forward_equals_two(world, policy)
    assert not torch.allclose(chosen, rejected, atol=1e-2)  # the rows were really different


MIXED = (0, 1, 2, 4, 5)  # cm (own noised image: two rows), oa1, oa2, oa1, oa2 (one shared row each)


def _dpo_step(model, inputs, chunk_mb):
    """Per-pair policy (chosen, rejected) log-probs, the DPO loss and the LoRA gradients of one step."""
    model.zero_grad()
    chosen, rejected = sequence_logps(model, inputs, chunk_mb=chunk_mb).chunk(2)
    with torch.no_grad(), model.disable_adapter():
        ref_c, ref_r = sequence_logps(model, inputs, chunk_mb=chunk_mb).chunk(2)
    loss = dpo_loss(chosen, rejected, ref_c, ref_r, 0.1, "sigmoid").losses.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([chosen, rejected, ref_c, ref_r]).detach(), loss.detach(), grads


def shared_prompt_rows_score_as_two_rows(world: Path, policy, checkpointing: bool, chunk_mb: int) -> None:
    """A batch whose oa pairs take one [prompt, chosen, rejected] row (the cm pair two rows, its
    rejected side seeing its own image) gives the two-row batch's log-probs, DPO loss and LoRA
    gradients, on the adapted model and the reference (adapter off)."""
    model = apply_lora(policy.model, LoraConfig(r=4, alpha=8, dropout=0.0), checkpointing).train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    two = _batch(world, policy, MIXED)[2]["inputs"]
    shared = _batch(world, policy, MIXED, share_prompt=True)[2]["inputs"]
    assert two["input_ids"].shape[0] == 10 and shared["input_ids"].shape[0] == 6  # 4 pairs share their prompt
    want, want_loss, want_grads = _dpo_step(model, two, chunk_mb)
    got, loss, grads = _dpo_step(model, shared, chunk_mb)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # sums of up to ~60 nats: float32 order
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads and all("lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (want[1] - want[0]).abs().min() > 1e-2  # chosen and rejected answers really differ


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk_mb", [0, 64])  # one answer position per chunk; all in one chunk
def test_shared_prompt_rows_score_as_two_rows(world, checkpointing, chunk_mb):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    shared_prompt_rows_score_as_two_rows(world, policy, checkpointing, chunk_mb)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_needs_its_mask_and_positions(world, monkeypatch, attention):
    """The shared row scores right in either attention, and wrong if the rejected answer could
    see the chosen one or its positions did not restart at the prompt's end (the test above can fail)."""
    import policy.policy as policy_module

    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    policy.model.set_attn_implementation(attention)
    assert prompt_sharing_blocker(policy.model) is None
    two = _batch(world, policy, MIXED)[2]["inputs"]
    shared = _batch(world, policy, MIXED, share_prompt=True)[2]["inputs"]
    with torch.no_grad():
        want = pair_logps(policy.model, two)
        torch.testing.assert_close(pair_logps(policy.model, shared), want, rtol=1e-6, atol=1e-5)
        width = shared["input_ids"].shape[1]
        plain_positions = {**shared, "position_ids": torch.arange(width).expand(len(shared["input_ids"]), -1)}
        with monkeypatch.context() as m:  # causal and padding only: the rejected answer sees the chosen one
            m.setattr(policy_module, "answers_apart_mask", lambda lm, batch: batch["attention_mask"])
            seen = pair_logps(policy.model, shared)
        for got in (pair_logps(policy.model, plain_positions), seen):
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)  # chosen answers come first: untouched
            assert (got[1] - want[1])[1:].abs().min() > 1e-3  # every shared rejected answer changed


def test_shared_prompt_keeps_the_token_budget(world):
    """At a budget the longest two-row row just fits, the shared rows fit the same pairs, hold no
    position beyond the budget, and score the same."""
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    budget = int(_batch(world, policy, MIXED)[2]["inputs"]["attention_mask"].sum(1).max())
    for max_length, fitted in ((budget, 5), (budget - 1, None)):
        two = _batch(world, policy, MIXED, max_length=max_length)[2]
        shared = _batch(world, policy, MIXED, max_length=max_length, share_prompt=True)[2]
        assert shared[BUDGET_KEY] == two[BUDGET_KEY]
        if fitted is None:  # every pair refused (its prompt cannot lose references), the same both ways
            assert "inputs" not in shared and "inputs" not in two
            continue
        assert len(shared["index"]) == fitted and shared["inputs"]["input_ids"].shape[1] > max_length
        assert int(shared["inputs"]["position_ids"].max()) == max_length - 1
        with torch.no_grad():
            torch.testing.assert_close(pair_logps(policy.model, shared["inputs"]), pair_logps(policy.model, two["inputs"]),
                                       rtol=1e-6, atol=1e-5)


def images_encoded_once_give_the_same_logps(world: Path, policy) -> None:
    """The batch with its images encoded once (``mm_encoder_outputs``) scores as with pixels,
    with and without the adapter; a trained projector stops the sharing."""
    inputs = _batch(world, policy, rejected_image=pure_noise((40, 40), 1))[2]["inputs"]
    model = apply_lora(policy.model, LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    encoded = encoded_images(model, inputs)
    assert "pixel_values" not in encoded and "mm_encoder_outputs" in encoded
    with torch.no_grad():
        torch.testing.assert_close(pair_logps(model, encoded), pair_logps(model, inputs), rtol=0, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(pair_logps(model, encoded), pair_logps(model, inputs), rtol=0, atol=1e-5)
    assert frozen_image_encoder(model)
    assert not frozen_image_encoder(apply_lora(load_policy(world / "policy").model,
                                               LoraConfig(r=4, alpha=8, train_projector=True)))


def test_images_encoded_once_give_the_same_logps(world):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    images_encoded_once_give_the_same_logps(world, policy)


def test_rejected_image_reaches_the_model(world):
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    with torch.no_grad():
        c1, r1 = pair_logps(policy.model, _batch(world, policy, rejected_image=pure_noise((40, 40), 1))[2]["inputs"])
        c2, r2 = pair_logps(policy.model, _batch(world, policy, rejected_image=pure_noise((40, 40), 2))[2]["inputs"])
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-5)  # the chosen side is untouched
    assert (r1 - r2).abs().min() > 1e-3  # every rejected row saw its new image


def test_released_format_trains_and_merged_model_loads(world, tmp_path):
    """The released file as it is (+ one record whose image is missing: skipped, not fatal; + one
    held-out pair whose chosen answer is longer than the model's 1024 positions: refused, counted)."""
    records = json.loads((world / "released.json").read_text())
    records.append({**records[0], "id": "lost", "image": "missing.png"})
    records.append({**records[0], "id": "unusable", "conversations": []})  # a bad record: skipped, named
    long_id = next(f"long{i}" for i in itertools.count() if is_heldout(f"long{i}", 0.25, 0))  # evaluated every time
    chosen = " ".join(["Yes, the square is red."] * 400)
    records.append({**records[0], "id": long_id, "conversations": [records[0]["conversations"][0],
                                                                   {"from": "gpt", "value": chosen}]})
    (world / "released_plus.json").write_text(json.dumps(records))
    cfg = config(world, tmp_path / "run", pairs="released_plus.json", merge=True, train={"max_steps": 3})
    summary = run(cfg)
    tmp_path = tmp_path / "run"
    budget = json.loads((tmp_path / "run_summary.json").read_text())["budget"]
    assert budget == json.loads(json.dumps(summary["budget"]))
    assert budget["max_length"] == budget["model_limit"] == 1024  # the default: the model's own limit
    assert budget["refused"] == 1 and budget["refused_records"][0]["record"].endswith(f":[{len(records) - 1}]")
    assert "plain-text" in budget["refused_records"][0]["reason"]
    assert budget["references_dropped"] == budget["references_shortened"] == 0  # plain text: nothing to trim
    assert budget["prompts"] > 1 and budget["prompt_tokens"]["max"] < 1024
    got = rows(tmp_path)
    train_rows = [r for r in got if "loss" in r]
    assert len(train_rows) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in train_rows[-1]
    evals = [r for r in got if "eval/loss" in r]
    assert evals and {"eval/cm/rewards/accuracies", "eval/oa/rewards/margins"} <= set(evals[-1])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run_config.yaml").is_file()
    bad = json.loads((tmp_path / "bad_records.json").read_text())["bad_records"]
    assert bad["count"] == 1
    assert bad["records"][0].endswith(f"[{len(records) - 2}]: `conversations` needs a human turn followed by a gpt turn")

    merged = AutoModelForImageTextToText.from_pretrained(summary["merged"]).eval()
    base = load_policy(world / "policy")
    with_adapter = PeftModel.from_pretrained(base.model, str(summary["adapter"])).eval()
    _, _, batch = _batch(world, base)
    inputs = {k: v for k, v in batch["inputs"].items() if k != "labels"}
    with torch.no_grad():
        want = with_adapter(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=0, atol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(with_adapter(**inputs).logits, want, atol=1e-4)  # training changed it


def test_cached_reference_trains_like_on_the_fly(world, tmp_path):
    """Same pairs, same seed: caching the reference log-probs changes speed, not the result."""
    results = {}
    for cached in (False, True):
        out = tmp_path / str(cached)
        run(config(world, out, cache_reference=cached, train={"max_steps": 3}))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        results[cached] = (load_file(out / "adapter" / "adapter_model.safetensors"), rows(out))
    (w0, m0), (w1, m1) = results[False], results[True]
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-5, msg=k)
    e0, e1 = [r for r in m0 if "eval/loss" in r][-1], [r for r in m1 if "eval/loss" in r][-1]
    assert e1["eval/rewards/margins"] == pytest.approx(e0["eval/rewards/margins"], abs=1e-4)


def test_resume_gives_the_same_weights(world, tmp_path, monkeypatch):
    """4 steps straight, and 4 steps with a crash after step 2 + resume: identical adapters.

    The staged schedule and the cached reference are on: both must come back the same.
    """
    over = dict(cache_reference=True, stages=[["cm"], ["oa1", "oa2"]],
                train={"max_steps": 4, "save_every": 2, "batch_size": 2, "resume": "latest"})
    run(config(world, tmp_path / "straight", **over))
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    calls = {"n": 0}
    loss = DpoTrainer.loss

    def crashing(self, model, batch):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated crash")
        return loss(self, model, batch)

    monkeypatch.setattr(DpoTrainer, "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(config(world, tmp_path / "resumed", **over))
    monkeypatch.setattr(DpoTrainer, "loss", loss)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 2
    run(config(world, tmp_path / "resumed", **over))
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("setting, n_rows", [
    ({}, 2 + 1 + 1 + 3),  # cm two rows, oa one shared row each, a corrupted row each
    ({"share_prompt": False}, 2 * 3 + 3),
    ({"lora": LoraConfig(r=8, alpha=16, dropout=0.0)}, 7),  # frozen projector: images encoded once (share_images)
    ({"cache_reference": True}, 7),
])
def test_mdpo_loss_is_mdpo_loss_of_the_three_answers_scored_alone(world, tmp_path, setting, n_rows):
    """One batch (a cm pair, two oa pairs, each with its corrupted row): the trainer's loss and
    metrics are ``mdpo_loss`` + the SFT term on the log-probs of each answer scored alone, the
    policy with its adapter and the reference with it disabled, the chosen answer's third score
    under the seeded pure noise."""
    cfg = config(world, tmp_path, loss_type="mdpo", mdpo_delta=0.3, sft_weight=0.5, noise_seed=3, **setting)
    policy = load_policy(world / "policy")
    _sharpen(policy.model)
    trainer = DpoTrainer(cfg, build_accelerator(cfg.train), policy)
    model = apply_lora(policy.model, cfg.lora).train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    types = [r.pair_type for r in trainer.train_records]
    idx = [types.index("cm"), types.index("oa1"), types.index("oa2")]
    batch = trainer.take(trainer.collate_train([trainer.train_set[i] for i in idx]))
    assert batch["inputs"]["input_ids"].shape[0] == n_rows
    loss, metrics = trainer.loss(model, batch)
    assert trainer.share_images == ("lora" in setting)

    records, items = [trainer.train_records[i] for i in idx], [trainer.train_set[i] for i in idx]
    noise = [pure_noise(it["image"].size, stable_seed(r.id, 3, "corrupted")) for r, it in zip(records, items)]
    for it, want in zip(items, noise):
        assert np.array_equal(np.asarray(it["corrupted_image"]), np.asarray(want))
    prompts = [_user_prompt(r.prompt) for r in records]
    chosen, rejected = [r.chosen for r in records], [r.rejected for r in records]
    sides = [policy.encode_for_training(prompts, chosen, [it["image"] for it in items]),
             policy.encode_for_training(prompts, rejected, [it["rejected_image"] for it in items]),
             policy.encode_for_training(prompts, chosen, noise)]
    with torch.no_grad():
        pol = [sequence_logps(model, b) for b in sides]
        with model.disable_adapter():
            ref = [sequence_logps(model, b) for b in sides]
    assert (pol[2] - pol[0]).abs().min() > 1e-2  # the noise, not the real image, decides the third score
    want = mdpo_loss(*pol, *ref, beta=cfg.beta, delta=0.3)
    sft = sft_loss(pol[0], answer_token_counts(sides[0]))
    torch.testing.assert_close(loss.detach(), want.losses.mean() + 0.5 * sft, rtol=0, atol=1e-5)
    assert metrics["sft_loss"] == pytest.approx(sft.item(), abs=1e-5)
    for key, value in want.metrics().items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
    assert abs(metrics["rewards/corrupted_margins"]) > 1e-3  # the corrupted side moved apart from the chosen one


def test_mdpo_trains_and_logs_the_corrupted_rewards(world, tmp_path):
    """A few mdpo steps, the reference on the fly and cached: the same adapter and metrics. Step 1
    runs the policy at its zero adapter, so every reward is 0 and the loss is log 2 (DPO) + log 2
    (conditional) + log(1 + e^delta) (anchored)."""
    results = {}
    for cached in (False, True):
        out = tmp_path / str(cached)
        run(config(world, out, loss_type="mdpo", mdpo_delta=0.5, cache_reference=cached, train={"max_steps": 3}))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        assert (out / "adapter" / "adapter_config.json").is_file()
        results[cached] = (load_file(out / "adapter" / "adapter_model.safetensors"), rows(out))
    corrupted = ("rewards/corrupted", "rewards/corrupted_accuracies", "rewards/corrupted_margins")
    for _, got in results.values():
        train_rows = [r for r in got if "loss" in r]
        assert len(train_rows) == 3 and all(k in r for k in corrupted for r in train_rows)
        assert train_rows[0]["loss"] == pytest.approx(2 * math.log(2) + math.log1p(math.exp(0.5)), abs=1e-4)
        assert train_rows[0]["rewards/corrupted"] == pytest.approx(0.0, abs=1e-5)
        assert abs(train_rows[-1]["rewards/corrupted_margins"]) > 1e-4  # training moved the two images apart
        last_eval = [r for r in got if "eval/loss" in r][-1]
        assert {f"eval/{k}" for k in corrupted} | {f"eval/cm/{k}" for k in corrupted} <= set(last_eval)
    (w0, m0), (w1, m1) = results[False], results[True]
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-5, msg=k)
    e0, e1 = [r for r in m0 if "eval/loss" in r][-1], [r for r in m1 if "eval/loss" in r][-1]
    for key in ("eval/loss", "eval/rewards/corrupted", "eval/rewards/corrupted_margins"):
        assert e1[key] == pytest.approx(e0[key], abs=1e-4), key


def test_eval_summary_per_pair_type_and_sft_term():
    # rows: type code, policy chosen / rejected, reference chosen / rejected, lengths
    scores = {0: [0, -1.0, -5.0, -2.0, -2.0, 3, 3], 1: [0, -4.0, -1.0, -2.0, -2.0, 3, 3],
              2: [1, -1.0, -3.0, -2.0, -2.0, 2, 4], 3: [1, float("nan"), 0, 0, 0, 1, 1]}
    got = summarize(scores, ["cm", "oa1"], DpoConfig(beta=0.5))
    assert got["eval/count"] == 3 and got["eval/cm/count"] == 2 and got["eval/oa1/count"] == 1
    assert got["eval/cm/rewards/accuracies"] == 0.5 and got["eval/oa1/rewards/accuracies"] == 1.0
    assert got["eval/oa1/rewards/margins"] == pytest.approx(0.5 * 2.0)
    want = dpo_loss(torch.tensor([-1.0, -4, -1]), torch.tensor([-5.0, -1, -3]), torch.full((3,), -2.0),
                    torch.full((3,), -2.0), beta=0.5).losses.mean()
    assert got["eval/loss"] == pytest.approx(want.item())
    # mdpo: policy chosen / rejected / corrupted, then the reference's, then lengths
    three = {0: [0, -1.0, -5.0, -3.0, -2.0, -2.0, -2.5, 3, 3], 1: [1, -4.0, -1.0, -2.0, -2.0, -2.0, -1.0, 3, 3]}
    got = summarize(three, ["cm", "oa1"], DpoConfig(beta=0.5, loss_type="mdpo", mdpo_delta=0.2))
    want = mdpo_loss(*torch.tensor([r[1:7] for r in three.values()]).T, beta=0.5, delta=0.2)
    assert got["eval/loss"] == pytest.approx(want.losses.mean().item())
    assert got["eval/cm/rewards/corrupted_margins"] == pytest.approx(0.5 * ((-1.0 + 2.0) - (-3.0 + 2.5)))

    out = dpo_loss(torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -1.0]), torch.zeros(2), torch.zeros(2))
    lengths, valid = torch.tensor([2.0, 4.0]), torch.tensor([True, True])
    plain, _ = step_loss(out, torch.tensor([-2.0, -6.0]), lengths, 0.0, valid)
    with_sft, metrics = step_loss(out, torch.tensor([-2.0, -6.0]), lengths, 0.5, valid)
    assert metrics["sft_loss"] == pytest.approx(8.0 / 6.0)  # token-mean NLL of the chosen answers
    assert with_sft.item() == pytest.approx(plain.item() + 0.5 * 8.0 / 6.0)
    only_first, _ = step_loss(out, torch.tensor([-2.0, -6.0]), lengths, 0.0, torch.tensor([True, False]))
    assert only_first.item() == pytest.approx(out.losses[0].item())


def test_sft_loss_trains_on_chosen_answers_without_a_reference(world, tmp_path, monkeypatch):
    """loss_type sft (the effect study's sft_chosen control): no reference forward in training; the
    held-out evaluation still scores both sides against the reference."""
    import dpo.train_dpo as train_dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("sft training ran a reference forward")

    monkeypatch.setattr(train_dpo, "reference_mode", no_reference)
    run(config(world, tmp_path, loss_type="sft", heldout_fraction=0.0, pair_types=["cm"], stages=[["cm"]],
               train={"max_steps": 2}))
    got = [r for r in rows(tmp_path) if "loss" in r]
    assert len(got) == 2 and "rewards/chosen" not in got[-1]
    assert all(r["loss"] > 0 and "logps/rejected" in r for r in got)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--lora.enabled", "false"], "lora.enabled"),
    (["--pairs", "[nope.json]"], "nope.json: annotation file does not exist"),
    (["--loss_type", "kto"], "loss_type"),
    (["--loss_type", "sft", "--sft_weight", "1"], "sft_weight"),  # would add the same NLL again
    (["--mdpo_delta", "0.5"], "mdpo_delta: only loss_type mdpo"),  # sigmoid has no anchor to move
    (["--pair_types", "[oa]"], "pair_types"),
])
def test_bad_input_exits_2_naming_it(world, tmp_path, monkeypatch, capsys, args, message):
    from common.config import cli_main
    from dpo.train_dpo import main

    base = ["--policy.path", str(world / "policy"), "--pairs", f"[{world / 'pairs.json'}]",
            "--train.output_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["train_dpo", *base, *args])
    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_shards_cover_everything_in_equal_counts():
    class Acc:
        num_processes = 3

        def __init__(self, rank):
            self.process_index = rank

    parts = [shard(10, Acc(r)) for r in range(3)]
    assert {len(p) for p in parts} == {4}
    assert set().union(*parts) == set(range(10))


def test_shipped_deepspeed_config_runs_in_one_process(world, tmp_path):
    """configs/mmed_rag/radiology/dpo.yaml (ZeRO-3, bf16, LoRA r 128 + projector) started as
    `bash scripts/train_dpo.sh CONFIG` starts it: one process, no launcher. It trains.

    The first DeepSpeed run on a machine builds its CPU communication op with gcc.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dpo.train_dpo", "configs/mmed_rag/radiology/dpo.yaml", "--pairs",
           f"[{world / 'pairs.json'}]", "--image_root", str(world / "images"), "--policy.path", str(world / "policy"),
           "--train.output_dir", str(tmp_path), "--train.max_steps", "2", "--train.num_workers", "0",
           "--train.progress", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "1 process(es)" in proc.stdout
    assert len([r for r in rows(tmp_path) if "loss" in r]) == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_train_dpo_sh_launches_several_processes_with_accelerate(tmp_path):
    """NPROC=N bash scripts/train_dpo.sh CONFIG runs accelerate launch with N processes (the script
    runs in a copy whose .venv/bin programs print their arguments)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "train_dpo.sh", tmp_path / "scripts")
    (tmp_path / "scripts" / "setup.sh").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    for program in ("accelerate", "python"):
        (tmp_path / ".venv" / "bin" / program).write_text(f'#!/bin/sh\necho {program} "$@"\n')
        (tmp_path / ".venv" / "bin" / program).chmod(0o755)

    def launch(nproc: str) -> str:
        env = {**os.environ, "NPROC": nproc}
        return subprocess.run(["bash", str(tmp_path / "scripts" / "train_dpo.sh"), "my.yaml", "--beta", "0.2"],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert launch("3") == "accelerate launch --multi_gpu --num_processes 3 -m dpo.train_dpo my.yaml --beta 0.2"
    assert launch("1") == "python -m dpo.train_dpo my.yaml --beta 0.2"


@pytest.mark.slow
def test_zero2_two_processes(world, tmp_path):
    """torchrun, 2 CPU processes (gloo), DeepSpeed ZeRO-2: trains, evaluates, saves the adapter.

    The first DeepSpeed run on a machine builds its CPU communication op with gcc (~2 minutes).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "tests.test_train_dpo", "ds", str(world), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = rows(tmp_path)
    assert len([r for r in got if "loss" in r]) == 4
    last_eval = [r for r in got if "eval/loss" in r][-1]
    heldout = split_heldout(load_pairs([world / "pairs.json"]), 0.25, 0)[1]
    assert last_eval["eval/count"] == len(heldout)  # every held-out pair once, from both processes
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()


def _zero2_worker(world: Path, out: Path) -> None:
    cfg = config(world, out, cache_reference=True,
                 train={"deepspeed": str(ROOT / "configs/deepspeed/zero2.json"), "max_steps": 4, "batch_size": 2})
    run(cfg)


if __name__ == "__main__" and sys.argv[1:2] == ["ds"]:
    cli_main(lambda: _zero2_worker(Path(sys.argv[2]), Path(sys.argv[3])))


def test_collapse_metrics_are_per_token_drops_over_pairs_with_a_reference():
    chosen, rejected = torch.tensor([-10.0, -40.0]), torch.tensor([-12.0, -60.0])
    ref_c, ref_r = torch.tensor([-8.0, float("nan")]), torch.tensor([-6.0, float("nan")])
    lengths_c, lengths_r = torch.tensor([2.0, 10.0]), torch.tensor([3.0, 10.0])
    got = collapse_metrics(chosen, rejected, ref_c, ref_r, lengths_c, lengths_r, torch.tensor([True, False]))
    assert got == {"collapse/chosen": 1.0, "collapse/rejected": 2.0}  # (−8 − −10) / 2, (−6 − −12) / 3
    none = collapse_metrics(chosen, rejected, ref_c, ref_r, lengths_c, lengths_r, torch.tensor([False, False]))
    assert none == {"collapse/chosen": 0.0, "collapse/rejected": 0.0}
