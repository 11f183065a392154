"""Contrastive fine-tuning on the tiny toy world: exact resume, checkpoints, validation rows."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from data.toy import make_world
from retriever import train

TINY_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("toy") / "world", size="tiny", progress=False)


def write_config(folder: Path, world: Path, **over) -> str:
    cfg = {
        "clip": {"model": "tiny-train-test", "model_config": TINY_ARCH},
        "data": {"world": str(world)},
        "domains": ["pathology"],
        "output_dir": str(folder / "clip"),
        "epochs": 3,
        "batch_size": 4,
        "val_every": 3,
        "log_every": 1,
        "domain_classifier": False,
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        **over,
    }
    path = folder / "clip.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def latest_weights(out: Path) -> dict[str, torch.Tensor]:
    info = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / info["name"] / train.CLIP_SUBDIR / "open_clip_model.safetensors"))


def test_resume_continues_exactly(world, tmp_path):
    """Same weights after N steps with and without an interruption (mid-epoch, mid-accumulation schedule)."""
    opts = {"grad_accum": 2, "matryoshka": {"dims": [8], "sample": True}}
    whole = write_config(tmp_path / "whole", world, **opts)
    train.main([whole])
    split = write_config(tmp_path / "split", world, **opts)
    train.main([split, "--max_steps", "3"])
    out = tmp_path / "split" / "clip" / "pathology"
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    stopped = latest_weights(out)
    train.main([split, "--resume", "latest"])
    a, b = latest_weights(tmp_path / "whole" / "clip" / "pathology"), latest_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], stopped[k]) for k in a)  # the resumed part did train


def test_outputs_metrics_and_checkpoints(world, tmp_path):
    cfg = write_config(tmp_path, world, epochs=2, val_every=1, keep=1)
    train.main([cfg])
    out = tmp_path / "clip" / "pathology"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/i2t_R@5" in r]
    assert [r["epoch"] for r in val] == [0, 1, 2]  # the untrained row first
    for key in ("val/i2t_R@1", "val/i2t_R@10", "val/t2i_R@5", "val/i2t_mean_rank", "val/t2i_median_rank",
                "val/loss", "val/findings_i2t_R@5"):
        assert key in val[0]
    assert any("train/loss" in r for r in rows)
    assert (out / "run_config.yaml").is_file() and any((out / "tensorboard").iterdir())
    ckpts = out / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    latest = json.loads((ckpts / "latest.json").read_text())
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    assert set(kept) == {best["name"], latest["name"]}  # older ones rotated away
    weights = ckpts / latest["name"] / train.CLIP_SUBDIR
    open_clip.add_model_config(weights / "tiny-train-test.json")
    model, _, _ = open_clip.create_model_and_transforms("tiny-train-test", pretrained=str(weights / "open_clip_model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bad_config_is_refused(world, tmp_path):
    cfg = write_config(tmp_path, world)
    with pytest.raises(Exception, match="domain"):
        train.main([cfg, "--domains", "[dermatology]"])


def test_run_stopped_by_max_steps_inside_an_epoch_leaves_a_best(world, tmp_path):
    from retriever.domain import clip_folder

    cfg = write_config(tmp_path, world, epochs=2)
    train.main([cfg, "--max_steps", "2"])
    ckpts = tmp_path / "clip" / "pathology" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2  # well inside the first epoch
    best = json.loads((ckpts / "best.json").read_text())
    assert best["name"] == "step-00000002" and best["metric"] is not None  # validated at the stop
    assert clip_folder(tmp_path / "clip", "pathology", "best") == ckpts / "step-00000002" / train.CLIP_SUBDIR
    rows = [json.loads(line) for line in (tmp_path / "clip" / "pathology" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val/mean_recall" in r][-1] < 1
    (ckpts / "best.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"best\.json: the pathology retriever has no 'best' checkpoint; its latest is step-00000002"):
        clip_folder(tmp_path / "clip", "pathology", "best")
