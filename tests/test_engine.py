"""The training engine: what LoRA adapts, optimizer groups, loss falls, exact resume, DeepSpeed.

Runs on tiny models built from configs (no download). The DeepSpeed test starts two processes
with torchrun running this file as a module (``-m tests.test_engine ds OUT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from common.config import ConfigError, cli_main
from common.engine import (
    EngineConfig,
    LoraConfig,
    apply_lora,
    build_accelerator,
    collapsed,
    one_process_world,
    param_groups,
    save_model,
    train,
)
from common.io import RunStopped
from data.loader import StagedSampler

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate keeps process-wide singletons; each test builds its own Accelerator. One thread:
    on tiny matrices extra threads only spin (100x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, projection_dim=16)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
                      vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=4)
    return LlavaForConditionalGeneration(cfg)


class Sequences(Dataset):
    """Counting sequences (next token = previous + stride): learnable, so the loss must fall."""

    def __init__(self, n: int = 24, length: int = 8, bad: tuple[int, ...] = ()):
        self.n, self.length, self.bad = n, length, set(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            return None  # e.g. an unreadable image
        stride = 1 + i % 3
        return i, torch.tensor([(i + stride * j) % (VOCAB - 1) for j in range(self.length)])


def collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    ids = torch.stack([x for _, x in items])
    return {"idx": [i for i, _ in items], "input_ids": ids, "labels": ids}


def lm_loss(seen: list[int] | None = None, crash_after: int | None = None):
    """A loss_fn recording the sample order; it raises once ``crash_after`` samples were seen (a killed run)."""

    def loss_fn(model, batch):
        if crash_after is not None and len(seen) >= crash_after:
            raise KeyboardInterrupt("simulated crash")
        if seen is not None:
            seen.extend(batch["idx"])
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss, {"tokens": float(batch["input_ids"].numel())}

    return loss_fn


def engine_cfg(out: Path, **over) -> EngineConfig:
    base = dict(output_dir=str(out), batch_size=4, grad_accum=2, epochs=2, lr=1e-2, warmup_ratio=0.2,
                log_every=1, progress=False, seed=3)
    return EngineConfig(**{**base, **over})


def run(out: Path, lora: LoraConfig | None, loss_fn, data: Dataset | None = None, shuffle: bool = True,
        sampler=None, **over):
    cfg = engine_cfg(out, **over)
    acc = build_accelerator(cfg)
    model = apply_lora(tiny_llama(), lora or LoraConfig(enabled=False))
    loader = DataLoader(data or Sequences(), batch_size=cfg.batch_size, shuffle=shuffle and sampler is None,
                        sampler=sampler, collate_fn=collate)
    return acc, train(cfg, acc, model, loader, loss_fn)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_adapts_only_the_language_model():
    model = apply_lora(tiny_llava(), LoraConfig(r=4, alpha=8, train_projector=True))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert not any(n.endswith("lm_head.lora_A.default.weight") for n in lora_names)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trained)
    assert any("multi_modal_projector.modules_to_save" in n for n in trained)
    # only these q_proj / v_proj layers when named
    model = apply_lora(tiny_llava(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "projector" in n)


def test_full_finetuning_freezes_vision_and_groups_projector_lr():
    model = apply_lora(tiny_llava(), LoraConfig(enabled=False, train_projector=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trained)
    assert any("language_model" in n for n in trained)
    groups = param_groups(model, lr=1e-3, projector_lr=5e-4, weight_decay=0.1)
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    for g in groups:
        is_proj = {id(p) for p in g["params"]} <= projector
        assert g["lr"] == (5e-4 if is_proj else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(trained)
    model = apply_lora(tiny_llava(), LoraConfig(enabled=False, train_vision=True))
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())


def test_loss_falls_and_run_writes_metrics(tmp_path):
    _, result = run(tmp_path, None, lm_loss(), epochs=6, lr=5e-2)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(rows) == result.step == 18  # 24 samples / 4 per batch / 2 per step = 3 steps x 6 epochs
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert {"lr", "grad_norm", "tokens", "epoch"} <= set(rows[0])
    assert (tmp_path / "checkpoints" / "latest.json").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


def test_resume_continues_exactly(tmp_path):
    """Weights and sample order after a crash + resume equal those of an uninterrupted run."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.3)  # dropout: the restored RNG must match too
    order: list[int] = []
    _, full = run(tmp_path / "a", lora, lm_loss(order), epochs=3, save_every=4)
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}

    before: list[int] = []
    with pytest.raises(KeyboardInterrupt):  # crash in epoch 2, two batches after the step-4 checkpoint
        run(tmp_path / "b", lora, lm_loss(before, crash_after=40), epochs=3, save_every=4)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    after: list[int] = []
    _, resumed = run(tmp_path / "b", lora, lm_loss(after), epochs=3, save_every=4, resume="latest")

    assert resumed.step == full.step == 9
    steps = lambda out: [r["step"] for r in metrics(out) if "loss" in r]  # noqa: E731
    assert steps(tmp_path / "b") == steps(tmp_path / "a") == list(range(1, 10))  # step 5, logged then redone: once
    assert before[:4 * 2 * 4] + after == order  # 4 steps x 2 batches x 4 samples, then the rest
    got = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0, msg=n)
    # a LoRA checkpoint holds the adapter, not the frozen base
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000008"
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))
    assert (ckpt / "model" / "adapter_config.json").is_file()


def test_length_grouped_order_resumes_exactly(tmp_path):
    """A run on length-grouped batches (data.loader.StagedSampler) killed mid-epoch and resumed sees
    the samples in the order of an uninterrupted run."""
    grouped = lambda: StagedSampler([range(24)], seed=3, lengths=[(7 * i) % 11 for i in range(24)], batch_size=4)  # noqa: E731
    order: list[int] = []
    run(tmp_path / "a", None, lm_loss(order), sampler=grouped(), epochs=3, save_every=4)
    before: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", None, lm_loss(before, crash_after=40), sampler=grouped(), epochs=3, save_every=4)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    after: list[int] = []
    run(tmp_path / "b", None, lm_loss(after), sampler=grouped(), epochs=3, save_every=4, resume="latest")
    assert before[:4 * 2 * 4] + after == order
    assert order[:24] != order[24:48]  # reshuffled per epoch


def test_fresh_start_clears_an_earlier_runs_checkpoints(tmp_path):
    run(tmp_path, None, lm_loss(), epochs=6, save_every=1, keep=50)  # 18 checkpoints
    (tmp_path / "checkpoints" / "best.json").write_text(json.dumps({"name": "step-00000018", "step": 18, "metric": -1.0}))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _, again = run(tmp_path, None, lm_loss(), epochs=1)  # resume "" : a fresh run into the same folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert again.best_checkpoint is None  # the earlier run's `best` is gone with it


def test_a_run_ends_at_the_first_evaluation_that_reaches_stop_at(tmp_path):
    calls: list[int] = []

    def rising(model):  # 0.2, 0.4, 0.6, ...: the target 0.55 is first met at the third evaluation
        calls.append(len(calls))
        return {"eval_reading": 0.2 * len(calls)}

    cfg = engine_cfg(tmp_path, epochs=6, eval_every=2, best_metric="eval_reading", higher_is_better=True, stop_at=0.55)
    acc = build_accelerator(cfg)
    loader = DataLoader(Sequences(), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    result = train(cfg, acc, tiny_llama(), loader, lm_loss(), rising)
    assert result.step == 6 and len(calls) == 3  # not the 18 steps of 6 epochs
    assert result.metrics == {"eval_reading": pytest.approx(0.6)}
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 6  # the final model is saved


def test_stop_at_without_a_metric_to_watch_is_refused(tmp_path):
    cfg = engine_cfg(tmp_path, stop_at=0.5)
    loader = DataLoader(Sequences(), batch_size=cfg.batch_size, collate_fn=collate)
    with pytest.raises(ConfigError, match="stop_at needs best_metric"):
        train(cfg, build_accelerator(cfg), tiny_llama(), loader, lm_loss())


def test_bad_batches_are_skipped(tmp_path):
    seen: list[int] = []
    data = Sequences(bad=tuple(range(9)))  # batches [0,1]..[6,7] entirely bad, [8,9] half
    _, result = run(tmp_path, None, lm_loss(seen), data=data, shuffle=False, epochs=1, grad_accum=1, batch_size=2)
    assert seen == list(range(9, 24))
    assert result.step == 8


def test_lora_adapter_reloads_with_peft(tmp_path):
    cfg = engine_cfg(tmp_path, epochs=1)
    acc = build_accelerator(cfg)
    model = apply_lora(tiny_llava(), LoraConfig(r=4, alpha=8, dropout=0.0, train_projector=True))
    ids = torch.cat([torch.full((6, 4), VOCAB - 1), torch.randint(0, VOCAB - 1, (6, 5))], 1)
    pixels = torch.randn(6, 3, 8, 8)
    labels = ids.clone()
    labels[:, :4] = -100
    batches = [{"input_ids": ids[i:i + 2], "pixel_values": pixels[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2, 4)]
    result = train(cfg, acc, model, DataLoader(batches, batch_size=None), lambda m, b: (m(**b).loss, {}))
    save_model(acc, result.model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llava(), tmp_path / "adapter").eval()
    trained = acc.unwrap_model(result.model).eval()
    with torch.no_grad():
        want = trained(input_ids=ids, pixel_values=pixels).logits
        got = reloaded(input_ids=ids, pixel_values=pixels).logits
        base = tiny_llava()(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(base, want)  # the adapter (and projector) changed something


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(tmp_path):
    """2 CPU processes (gloo) under ZeRO-2 train, checkpoint and export a loadable model.

    The first DeepSpeed run on a machine builds its CPU communication op with gcc (~2 minutes).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "tests.test_engine", "ds", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows and rows[-1]["loss"] < rows[0]["loss"]
    ckpt = tmp_path / "checkpoints" / "step-00000008"  # 12 samples per process / 4 / 2 = 2 steps x 4 epochs
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "pytorch_model").is_dir()
    LlamaForCausalLM.from_pretrained(tmp_path / "final")
    assert "resumed" in proc.stdout


def _deepspeed_worker(out: Path) -> None:
    """Under torchrun: 2 epochs with ZeRO-2, then 2 more resumed from the checkpoint, then export."""
    for epochs, resume in ((2, ""), (4, "latest")):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = engine_cfg(out, deepspeed=str(ROOT / "configs/deepspeed/zero2.json"), epochs=epochs, resume=resume)
        acc = build_accelerator(cfg)
        model = apply_lora(tiny_llama(), LoraConfig(enabled=False))
        loader = DataLoader(Sequences(), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
        result = train(cfg, acc, model, loader, lm_loss())
    save_model(acc, result.model, out / "final")


if __name__ == "__main__" and sys.argv[1:2] == ["ds"]:
    cli_main(lambda: _deepspeed_worker(Path(sys.argv[2])))


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_one_process_world_only_without_a_launcher(monkeypatch):
    for var in LAUNCHER_VARS:  # set first, so that monkeypatch also removes what the test sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MASTER_PORT", "29999")  # the user's choice is kept
    one_process_world()
    assert [os.environ[v] for v in LAUNCHER_VARS] == ["0", "0", "1", "1", "127.0.0.1", "29999"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's world is left as it is
    monkeypatch.setenv("RANK", "1")
    one_process_world()
    assert (os.environ["WORLD_SIZE"], os.environ["RANK"]) == ("2", "1")


def nan_after(step_count: int, metrics_of=None):
    """A loss_fn whose loss turns NaN once ``step_count`` micro-batches were seen (a diverged run)."""
    seen = [0]

    def loss_fn(model, batch):
        seen[0] += 1
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        loss = out.loss * float("nan") if seen[0] > step_count else out.loss
        return loss, (metrics_of(seen[0]) if metrics_of else {})

    return loss_fn


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # batch 4, accumulation 2: micro-batch 11 is the first of step 6; the weights of step 5 made it
    with pytest.raises(RunStopped, match=r"diverged at step 6: a loss is not finite .*step-00000004"):
        run(tmp_path, None, nan_after(10), epochs=6, save_every=1, keep=50)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-{s:08d}" for s in range(1, 5)]
    assert json.loads((ckpts / "latest.json").read_text())["name"] == "step-00000004"
    assert not (tmp_path / "model.safetensors").exists()


def test_collapsing_logps_stop_at_the_window_that_shows_them(tmp_path):
    def figures(micro):  # both sides fall 3 nats per token below the reference from micro-batch 13 on
        drop = 3.0 if micro > 12 else 0.1
        return {"collapse/chosen": drop, "collapse/rejected": drop, "logps/chosen": -5.7 - 20 * drop}

    with pytest.raises(RunStopped, match=r"diverged at step 8: .*over steps 7-8 .*collapse/chosen 3"):
        run(tmp_path, None, nan_after(10**6, figures), epochs=6, save_every=1, keep=50, log_every=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept[-1] == "step-00000005"  # the weights of step 6 on made the collapsed window
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # the same figures pass with the stop off, and stay under a higher limit
    _, result = run(tmp_path / "off", None, nan_after(10**6, figures), epochs=1, collapse_nats=0.0)
    assert result.step == 3
    assert not collapsed({"collapse/chosen": 3.0, "collapse/rejected": 1.0}, 2.0)
    assert not collapsed({"loss": 1.0}, 2.0)


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process(tmp_path):
    """2 CPU processes (gloo): the loss turns NaN on rank 1 only; both stop at the same step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           "-m", "tests.test_engine", "nan", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = [(tmp_path / f"stopped-{rank}.txt").read_text() for rank in (0, 1)]
    assert all("diverged at step 3: a loss is not finite" in s for s in stopped)
    assert "this process: loss nan" in stopped[1] and "this process: loss nan" not in stopped[0]


def _nan_worker(out: Path) -> None:
    """Under torchrun: rank 1's loss turns NaN in step 3; each process records how it stopped."""
    cfg = engine_cfg(out, epochs=4, grad_accum=1)
    acc = build_accelerator(cfg)
    model = apply_lora(tiny_llama(), LoraConfig(enabled=False))
    loader = DataLoader(Sequences(), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    try:
        train(cfg, acc, model, loader, nan_after(2 if acc.process_index == 1 else 10**6))
    except RunStopped as e:
        (out / f"stopped-{acc.process_index}.txt").write_text(str(e))


if __name__ == "__main__" and sys.argv[1:2] == ["nan"]:
    cli_main(lambda: _nan_worker(Path(sys.argv[2])))
