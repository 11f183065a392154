"""Two processes (torchrun, gloo on CPU) train and retrieve exactly like one process.

Two processes with batch 4 each see the same global batch as one process with batch 8, and the
gathered ClipLoss (local loss, gather with gradient) averaged by DDP is the single-process loss,
so the weights agree to float precision; sharded encoding gives the same retrieval.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_retriever_train import TINY_ARCH
from toy.make_toy import make_world

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, module: str, *args: str) -> None:
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    subprocess.run([*prefix, "-m", module, *args], cwd=ROOT, check=True, timeout=900)


def weights(clip_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = clip_dir / "pathology" / "checkpoints"
    name = json.loads((ckpt / "latest.json").read_text())["name"]
    return load_file(str(ckpt / name / "open_clip" / "open_clip_model.safetensors"))


def test_two_processes_match_one(tmp_path):
    world = make_world(tmp_path / "world", size="tiny", progress=False)
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(yaml.safe_dump({
        "clip": {"model": "tiny-dist-test", "model_config": TINY_ARCH}, "data": {"world": str(world)},
        "domains": ["pathology"], "epochs": 3, "val_every": 3, "domain_classifier": False,
        "optim": {"lr": 1e-3, "warmup_steps": 1},
    }))
    launch(1, "retriever.finetune_clip", str(cfg), "--batch_size", "8", "--output_dir", str(tmp_path / "one"))
    launch(2, "retriever.finetune_clip", str(cfg), "--batch_size", "4", "--output_dir", str(tmp_path / "two"))
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "two" / "pathology" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("epoch") == 0)
    assert first["val/pairs"] == len(json.loads((world / "pathology" / "retriever_val_report.json").read_text()))

    common = ["--data.world", str(world), "--domains", "[pathology]", "--routing", "fixed", "--domain", "pathology",
              "--query_roles", "[test_vqa]", "--batch_size", "7"]
    launch(1, "retriever.retrieve", "--clip_dir", str(tmp_path / "one"), "--output_dir", str(tmp_path / "r1"), *common)
    launch(2, "retriever.retrieve", "--clip_dir", str(tmp_path / "one"), "--output_dir", str(tmp_path / "r2"), *common)
    one = [json.loads(x) for x in (tmp_path / "r1" / "pathology_test_vqa.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "r2" / "pathology_test_vqa.jsonl").read_text().splitlines()]
    assert len(one) == len(two) > 0
    for x, y in zip(one, two):
        assert x["reference_ids"] == y["reference_ids"]
        assert x["reference_scores"] == pytest.approx(y["reference_scores"], abs=1e-5)
