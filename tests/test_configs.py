"""Every shipped config loads into its program's dataclass, and the real-data stages chain:
each stage of configs/mmed_rag/<domain>/ reads where the stage before it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config, to_dict
from dpo.train_dpo import DpoConfig
from dpo.train_grpo import GrpoConfig
from evaluation.evaluate import EvalConfig
from evaluation.infer import InferConfig
from evaluation.serve import ServeConfig
from pairs.build_pairs import PairsConfig
from policy.policy import PolicySpec
from policy.train_sft import SftConfig
from retriever.finetune_clip import ClipTrainConfig
from retriever.retrieve import RetrieveConfig
from toy.toy_policy import ToyPolicyConfig

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
CLASSES = {"clip": ClipTrainConfig, "retrieve": RetrieveConfig, "pairs": PairsConfig, "dpo": DpoConfig, "grpo": GrpoConfig,
           "evaluate": EvalConfig, "sft": SftConfig, "toy_policy": ToyPolicyConfig, "serve": ServeConfig}
DOMAINS = ("radiology", "pathology", "ophthalmology")


def _load(path: Path):
    return load_config(CLASSES[path.stem], [str(path)])


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("toy/*.yaml"), *CONFIGS.glob("mmed_rag/*/*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads(path):
    """The config loads, and every file of the repository it names (configs/..., prompts) exists."""
    cfg = _load(path)
    assert isinstance(cfg, CLASSES[path.stem])
    shipped = _shipped_paths(to_dict(cfg))
    missing = [p for p in shipped if not (REPO / p).exists()]
    assert not missing, f"{path} names files the repository does not ship: {missing}"
    prompts = _shipped_paths(_prompt_values(to_dict(cfg)))  # "" (the policy folder's own) names no file
    assert all(Path(p).parts[:2] == ("configs", "prompts") for p in prompts)  # each named prompt file is checked


def _shipped_paths(value) -> list[str]:
    """Strings of a config that name a file of the repository: relative under configs/, or absolute inside it."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _shipped_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _shipped_paths(v)]
    if isinstance(value, str) and value.startswith("configs/"):
        return [value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(REPO):
        return [str(Path(value).relative_to(REPO))]
    return []


def _prompt_values(value) -> list[str]:
    """The values of every ``prompts`` key of a config, nested ones too."""
    if not isinstance(value, dict):
        return []
    return [p for key, v in value.items() for p in ([v] if key == "prompts" else _prompt_values(v))]


def test_shipped_paths_finds_nested_and_absolute_paths():
    found = _shipped_paths({"a": "configs/x.yaml", "b": {"c": [str(REPO / "configs" / "y.json"), "outputs/z"]}, "d": 3})
    assert found == ["configs/x.yaml", "configs/y.json"]


@pytest.mark.parametrize("cls", [SftConfig, PairsConfig, DpoConfig, GrpoConfig, EvalConfig, InferConfig],
                         ids=lambda c: c.__name__)
def test_every_stage_names_its_policy_in_one_section(cls, tmp_path):
    """``policy:`` is a PolicySpec in every stage that loads the policy; ``--policy.KEY`` overrides
    one key and keeps the others the file sets."""
    config = tmp_path / "stage.yaml"
    config.write_text("policy:\n  path: from/file\n  dtype: bfloat16\n")
    assert cls().policy == PolicySpec()
    assert load_config(cls, [str(config), "--policy.path", "from/cli"]).policy == PolicySpec(path="from/cli",
                                                                                            dtype="bfloat16")
    with pytest.raises(ConfigError, match="policy: a section: .*path"):
        load_config(cls, ["--policy", "from/cli"])


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
    # one policy: the one that answers for the pairs is the one DPO tunes and evaluation's base, prompted in
    # one wording (the released pairs'), with the question's own options
    assert cfg["pairs"].policy == cfg["dpo"].policy == cfg["evaluate"].policy
    assert cfg["pairs"].policy.prompts == "configs/prompts/mmed_rag.yaml"
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
