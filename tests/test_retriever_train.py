"""Contrastive fine-tuning on the tiny toy world: exact resume, checkpoints, validation rows."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from retriever import finetune_clip
from retriever.clip_data import CLIP_SUBDIR
from toy.make_toy import make_world

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
    return load_file(str(out / "checkpoints" / info["name"] / CLIP_SUBDIR / "open_clip_model.safetensors"))


def test_resume_continues_exactly(world, tmp_path):
    """Same weights after N steps with and without an interruption (mid-epoch, mid-accumulation schedule)."""
    opts = {"grad_accum": 2, "matryoshka": {"dims": [8], "sample": True}}
    whole = write_config(tmp_path / "whole", world, **opts)
    finetune_clip.main([whole])
    split = write_config(tmp_path / "split", world, **opts)
    finetune_clip.main([split, "--max_steps", "3"])
    out = tmp_path / "split" / "clip" / "pathology"
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    stopped = latest_weights(out)
    finetune_clip.main([split, "--resume", "latest"])
    a, b = latest_weights(tmp_path / "whole" / "clip" / "pathology"), latest_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], stopped[k]) for k in a)  # the resumed part did train


def test_outputs_metrics_and_checkpoints(world, tmp_path):
    cfg = write_config(tmp_path, world, epochs=2, val_every=1, keep=1)
    finetune_clip.main([cfg])
    out = tmp_path / "clip" / "pathology"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/i2t_R@5" in r]
    assert [r["epoch"] for r in val] == [0, 1, 2]  # the untrained row first
    for key in ("val/i2t_R@1", "val/i2t_R@10", "val/t2i_R@5", "val/i2t_mean_rank", "val/t2i_median_rank",
                "val/loss", "val/findings_i2t_R@5"):
        assert key in val[0]
    assert any("train/loss" in r for r in rows)
    assert (out / "run_config.yaml").is_file() and any((out / "tensorboard").iterdir())
    assert json.loads((out / "data.json").read_text())["bad_records"] == {"count": 0, "records": []}
    ckpts = out / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    latest = json.loads((ckpts / "latest.json").read_text())
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    assert set(kept) == {best["name"], latest["name"]}  # older ones rotated away
    weights = ckpts / latest["name"] / CLIP_SUBDIR
    open_clip.add_model_config(weights / "tiny-train-test.json")
    model, _, _ = open_clip.create_model_and_transforms("tiny-train-test", pretrained=str(weights / "open_clip_model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bad_config_is_refused(world, tmp_path):
    cfg = write_config(tmp_path, world)
    with pytest.raises(Exception, match="domain"):
        finetune_clip.main([cfg, "--domains", "[dermatology]"])


def test_run_stopped_by_max_steps_inside_an_epoch_leaves_a_best(world, tmp_path):
    from retriever.domain import clip_folder

    cfg = write_config(tmp_path, world, epochs=2)
    finetune_clip.main([cfg, "--max_steps", "2"])
    ckpts = tmp_path / "clip" / "pathology" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2  # well inside the first epoch
    best = json.loads((ckpts / "best.json").read_text())
    assert best["name"] == "step-00000002" and best["metric"] is not None  # validated at the stop
    assert clip_folder(tmp_path / "clip", "pathology", "best") == ckpts / "step-00000002" / CLIP_SUBDIR
    rows = [json.loads(line) for line in (tmp_path / "clip" / "pathology" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val/mean_recall" in r][-1] < 1
    (ckpts / "best.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"best\.json: the pathology retriever has no 'best' checkpoint; its latest is step-00000002"):
        clip_folder(tmp_path / "clip", "pathology", "best")


def release_from_world(world: Path, root: Path, files: dict[str, str]) -> tuple[Path, Path]:
    """A release data/ folder holding toy world files under release names ({release path: world path}),
    and one image folder holding every domain's image sets."""
    import shutil

    data = root / "data"
    for release_path, world_path in files.items():
        (data / release_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world / world_path, data / release_path)
    images = root / "images"
    images.mkdir()
    for domain in ("radiology", "pathology", "ophthalmology"):
        for image_set in (world / domain / "images").iterdir():
            (images / image_set.name).symlink_to(image_set)
    return data, images


def test_real_config_on_a_partial_release_trains_what_it_has(world, tmp_path, capsys):
    """configs/mmed_rag/pathology/clip.yaml on a release without radiology and without the ophthalmology
    validation file: both named, radiology skipped, ophthalmology trained unvalidated (its final checkpoint
    is `best`), the domain classifier fitted on the two domains there are."""
    data, images = release_from_world(world, tmp_path, {
        "training/retriever/pathology/pathology_train.json": "pathology/retriever_train_report.json",
        "training/retriever/pathology/pathology_val.json": "pathology/retriever_val_report.json",
        "training/retriever/ophthalmology/harvard_train_7000.json": "ophthalmology/retriever_train_report.json",
    })
    config = Path(__file__).resolve().parent.parent / "configs" / "mmed_rag" / "pathology" / "clip.yaml"
    tiny = ["--clip", json.dumps({"model": "tiny-release-test", "model_config": TINY_ARCH, "pretrained": ""}),
            "--epochs", "1", "--batch_size", "4", "--val_every", "1", "--val_batch_size", "64", "--num_workers", "0",
            "--mixed_precision", "no", "--optim.warmup_steps", "2", "--classifier.steps", "20"]
    out = tmp_path / "clip"
    finetune_clip.main([str(config), *tiny, "--data.data_root", str(data), "--data.image_roots", "{}", "--data.image_root", str(images),
                "--domains", "[radiology,pathology,ophthalmology]", "--output_dir", str(out)])
    absent = [str(data / p) for p in ("training/retriever/radiology/radiology_train.json",
                                      "training/retriever/radiology/radiology_val.json",
                                      "training/retriever/ophthalmology/harvard_val_1000.json")]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["domains"] == ["pathology", "ophthalmology"] and summary["skipped"] == ["radiology"]
    assert summary["missing"] == absent
    assert summary["classifier"] == {"domains": ["pathology", "ophthalmology"], "status": "trained"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {p}: not found; going on without it" for p in absent] + [
        "warning: radiology: none of its retriever_train files was found; domain skipped"]
    assert json.loads((out / "pathology" / "checkpoints" / "best.json").read_text())["metric"] is not None
    unvalidated = json.loads((out / "ophthalmology" / "checkpoints" / "best.json").read_text())
    assert unvalidated == {**json.loads((out / "ophthalmology" / "checkpoints" / "latest.json").read_text()), "metric": None}
    assert json.loads((out / "domain_classifier" / "config.json").read_text())["domains"] == ["pathology", "ophthalmology"]
    from common.io import InputError

    with pytest.raises(InputError, match=r"no retriever_train file found for any of \['radiology'\]"):
        finetune_clip.main([str(config), *tiny, "--data.data_root", str(data), "--domains", "[radiology]", "--output_dir", str(out)])
