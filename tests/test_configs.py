"""Every shipped config loads into its program's dataclass, and the real-data stages chain:
each stage of configs/mmed_rag/<domain>/ reads where the stage before it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from dpo.train_dpo import DpoConfig
from evaluation.evaluate import EvalConfig
from pairs.build_pairs import PairsConfig
from policy.train_sft import SftConfig
from retriever.finetune_clip import ClipTrainConfig
from retriever.retrieve import RetrieveConfig
from toy.toy_policy import ToyPolicyConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLASSES = {"clip": ClipTrainConfig, "retrieve": RetrieveConfig, "pairs": PairsConfig, "dpo": DpoConfig,
           "evaluate": EvalConfig, "sft": SftConfig, "toy_policy": ToyPolicyConfig}
DOMAINS = ("radiology", "pathology", "ophthalmology")


def _load(path: Path):
    return load_config(CLASSES[path.stem], [str(path)])


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("toy/*.yaml"), *CONFIGS.glob("mmed_rag/*/*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads(path):
    assert isinstance(_load(path), CLASSES[path.stem])


@pytest.mark.parametrize("domain", DOMAINS)
def test_real_data_stages_chain(domain):
    cfg = {stem: _load(CONFIGS / "mmed_rag" / domain / f"{stem}.yaml") for stem in ("clip", "retrieve", "pairs", "dpo", "evaluate")}
    retrieval = Path(cfg["retrieve"].output_dir)
    assert Path(cfg["retrieve"].clip_dir) == Path(cfg["clip"].output_dir) == Path(cfg["evaluate"].clip_dir)
    assert Path(cfg["pairs"].retrieval_index) == retrieval / "index.json"
    assert Path(cfg["evaluate"].retrieval_dir) == retrieval
    assert [Path(p) for p in cfg["dpo"].pairs] == [Path(cfg["pairs"].out) / "pairs.json"]
    dpo_out = Path(cfg["dpo"].train.output_dir)
    assert Path(cfg["evaluate"].adapter) == dpo_out / "adapter" and Path(cfg["evaluate"].dpo_dir) == dpo_out
    assert domain in str(retrieval)  # one folder per domain: a second domain's run must not overwrite it
    # pairs (and the released pairs) and evaluation prompt in one wording, with the question's own options
    assert cfg["pairs"].prompts == cfg["evaluate"].prompts == "configs/prompts/mmed_rag.yaml"
    assert cfg["pairs"].option_text and cfg["evaluate"].option_text


@pytest.mark.parametrize("domain", DOMAINS)
def test_real_configs_follow_the_release_layout(domain):
    """Every annotation path is a release file relative to data.data_root, in the role it has there;
    the alignment (preference) files are queried through pairs.release_sources' output, not directly."""
    from data.release import DATASETS, release_files

    clip, retrieve = (_load(CONFIGS / "mmed_rag" / domain / f"{stem}.yaml") for stem in ("clip", "retrieve"))
    for cfg in (clip, retrieve):
        assert cfg.data.data_root and set(cfg.data.image_roots) == set(DATASETS)
    for d in DOMAINS:
        assert clip.data.train_files[d] == retrieve.data.train_files[d] == [f.path for f in release_files(d, "retriever_train")]
        assert clip.data.val_files[d] == [f.path for f in release_files(d, "retriever_val")]
    test = [(q.path, q.role) for q in retrieve.queries if q.base == "data_root"]
    assert test == [(f.path, f.role) for f in release_files(domain, "test_vqa") + release_files(domain, "test_report")]
    alignment = [(q.path, q.role) for q in retrieve.queries if q.base == "sources_dir"]
    tasks = ["vqa" if "vqa" in Path(f.path).stem else "report" for f in release_files(domain, "alignment")]
    assert alignment == [(f"{domain}_alignment_{t}.{'jsonl' if t == 'vqa' else 'json'}", f"alignment_{t}") for t in tasks]
    assert all(q.domain == domain and not q.image_root for q in retrieve.queries)
    assert {role for _, role in alignment} <= set(_load(CONFIGS / "mmed_rag" / domain / "pairs.yaml").roles)
