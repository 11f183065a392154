"""Vision pretraining of the toy policy's tower: it learns a local sign, deterministically."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

from common.config import ConfigError
from common.io import InputError
from data.manifest import manifest_files
from data.readers import read_records
from toy.make_toy import make_world
from retriever.model import ClipSpec, _load_visual_from, resolve_model_config
from toy.pretrain_vision import PretrainVisionConfig, finding_images, finding_labels, pretrain_clip_tower, pretrain_vision
from toy.toy_policy import ToyPolicyConfig, build_toy_policy


def _spots(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16-px noise images; label 1 where a bright 4x4 square sits somewhere in the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
    y = (torch.rand(n, generator=g) < 0.5).float()
    for i in torch.nonzero(y).flatten().tolist():
        r, c = torch.randint(0, 13, (2,), generator=g).tolist()
        x[i, :, r : r + 4, c : c + 4] += 2.0
    return x, y[:, None]


def _tower(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4)
    return CLIPVisionModel(cfg)


def _probe_loss(tower: CLIPVisionModel, x: torch.Tensor, y: torch.Tensor) -> float:
    """Loss of a logistic probe fitted on the frozen tower's max-pooled tokens (what pretraining built)."""
    with torch.no_grad():
        feats = tower(pixel_values=x).last_hidden_state[:, 1:].max(1).values
    head = torch.nn.Linear(feats.shape[1], 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(feats), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(head(feats), y))


def test_pretraining_teaches_the_tower_a_local_sign():
    x, y = _spots(256, seed=0)
    held_x, held_y = _spots(128, seed=1)
    before = _probe_loss(_tower(), held_x, held_y)
    tower = _tower()
    pretrain_vision(tower, lambda p: tower(pixel_values=p).last_hidden_state[:, 1:], x, y, epochs=15, lr=3e-3, batch_size=32)
    after = _probe_loss(tower, held_x, held_y)
    assert after < 0.5 * before, (before, after)


def test_pretraining_is_deterministic():
    x, y = _spots(64, seed=0)
    towers = []
    for _ in range(2):
        tower = _tower()
        pretrain_vision(tower, lambda p, t=tower: t(pixel_values=p).last_hidden_state[:, 1:], x, y, epochs=2, batch_size=16, seed=3)
        towers.append(tower.state_dict())
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("toy") / "world", seed=0, size="tiny", progress=False)


@pytest.fixture(scope="module")
def clip_init(world, tmp_path_factory) -> Path:
    """The toy-clip checkpoint pretrain_clip_tower writes (one epoch), for the retrievers and the policy."""
    out = tmp_path_factory.mktemp("clip_init") / "clip_init.safetensors"
    pretrain_clip_tower(PretrainVisionConfig(world=str(world), out=str(out), epochs=1, batch_size=16))
    return out


def test_finding_images_are_the_distinct_training_images_with_their_findings(world):
    items = finding_images(str(world))
    paths = [p for p, _, _ in items]
    assert len(paths) == len(set(paths)) and all(Path(p).is_file() for p in paths)
    expected = {str(Path(e["image_root"]) / r.images[0])
                for e in manifest_files(world, role="policy_train", kind="vqa") for r in read_records(e["path"], kind="vqa")}
    assert {str(Path(p)) for p in paths} == {str(Path(p).resolve()) for p in expected}
    names, labels = finding_labels(items)
    assert labels.shape == (len(items), len(names))
    assert labels.sum(1).tolist() == [float(len(fs)) for _, _, fs in items]
    assert {d for d, _ in names} == {"radiology", "pathology", "ophthalmology"}


def test_vision_pretraining_needs_a_world(tmp_path):
    cfg = ToyPolicyConfig(vision_pretrain_epochs=1)
    with pytest.raises(ConfigError, match="--world"):
        build_toy_policy(["a b c"], tmp_path / "p", cfg)


def test_clip_tower_checkpoint_starts_the_retrievers_image_tower(clip_init):
    resolve_model_config(ClipSpec())
    torch.manual_seed(0)
    fresh = open_clip.create_model("toy-clip")
    random_visual = {k: v.clone() for k, v in fresh.visual.state_dict().items()}
    _load_visual_from(fresh, str(clip_init))  # what finetune_clip's clip.image_tower_from does
    trained = fresh.visual.state_dict()
    assert set(trained) == set(random_visual)
    assert not torch.equal(trained["conv1.weight"], random_visual["conv1.weight"])
    assert not list(clip_init.parent.glob(".*.tmp")), "no temporary file is left beside the checkpoint"


def test_the_policy_starts_from_the_retrievers_tower_and_reads_its_tokens_as_open_clip_does(world, clip_init, tmp_path):
    """One pretrained tower for both: the policy's CLIPVisionModel, loaded from a toy-clip
    checkpoint, gives the tokens open_clip's transformer gives on the same pixels."""
    cfg = ToyPolicyConfig(world=str(world), vision_width=128, vision_layers=2, vision_heads=4, text_width=32,
                          text_layers=1, text_heads=2, vocab_size=400, vision_tower_from=str(clip_init))
    policy = build_toy_policy(["a b c"] * 5, tmp_path / "policy", cfg)
    tower = LlavaForConditionalGeneration.from_pretrained(policy).model.vision_tower.eval()
    resolve_model_config(ClipSpec())
    clip = open_clip.create_model("toy-clip")
    _load_visual_from(clip, str(clip_init))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = clip.visual.transformer(clip.visual._embeds(x))
        assert torch.allclose(tower(pixel_values=x).last_hidden_state, want, atol=1e-5)


def test_a_tower_of_another_shape_is_refused_by_name(clip_init, tmp_path):
    wide = ToyPolicyConfig(vision_width=64, vision_layers=2, vision_heads=2, vision_tower_from=str(clip_init))
    with pytest.raises(ConfigError, match="clip_init.safetensors: its image tower is not this policy's"):
        build_toy_policy(["a b c"] * 5, tmp_path / "p", wide)
    with pytest.raises(InputError, match="no open_clip checkpoint"):
        build_toy_policy(["a b c"] * 5, tmp_path / "q", ToyPolicyConfig(vision_tower_from=str(tmp_path / "none")))
