import json

import pytest
import torch
from accelerate import Accelerator

from common.checkpoint import CheckpointManager


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _step(model, opt):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_rotation_best_latest_and_exact_resume(tmp_path):
    acc, model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    metrics = [0.1, 0.9, 0.3, 0.2]
    for step, m in enumerate(metrics, 1):
        _step(model, opt)
        mgr.save(acc, step, {"epoch": 0}, metric=m)
    kept = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
    assert kept == ["step-00000002", "step-00000003", "step-00000004"]  # 2 newest + best
    assert mgr.resolve("best").name == "step-00000002"
    assert mgr.resolve("latest").name == "step-00000004"
    assert json.loads((mgr.resolve("latest") / "trainer_state.json").read_text())["step"] == 4

    # continuing from `latest` equals never having stopped (weights, optimizer and RNG restored)
    _step(model, opt)
    expected = model.weight.detach().clone()
    acc2, model2, opt2 = _setup(seed=123)
    state = mgr.load(acc2, "latest")
    assert state["step"] == 4
    _step(model2, opt2)
    torch.testing.assert_close(model2.weight, expected)


def test_half_written_checkpoint_is_never_latest(tmp_path):
    acc, model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(acc, 1, {})
    (tmp_path / "ck" / ".step-00000002.tmp").mkdir()  # as a run killed mid-save leaves it
    assert mgr.resolve("latest").name == "step-00000001"
    mgr.save(acc, 3, {})
    assert not (tmp_path / "ck" / ".step-00000002.tmp").exists()
    with pytest.raises(FileNotFoundError):
        mgr.resolve(tmp_path / "nowhere")


def test_roll_back_keeps_the_checkpoints_up_to_a_step(tmp_path):
    acc, model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck", keep=10)
    for step, m in enumerate([0.1, 0.2, 0.9, 0.3], 1):
        mgr.save(acc, step, {"epoch": 0}, metric=m)
    assert mgr.resolve("best").name == "step-00000003"
    assert mgr.roll_back(2).name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-00000001", "step-00000002"]
    assert mgr.resolve("latest").name == mgr.resolve("best").name == "step-00000002"
    assert mgr.roll_back(0) is None
    assert mgr.resolve("latest") is None and mgr.resolve("best") is None
