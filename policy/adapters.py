"""PEFT adapters on a policy: finding one, checking what it was trained on, loading a policy with
its adapters merged in (the ``policy.init_adapter`` of a PolicySpec, such as SFT's, first, then
the DPO one, as dpo.train_dpo stacks them) and saving such a merged policy as an ordinary checkpoint.

The one place for this: every stage loads its policy with ``load_with_adapters`` (policy.train_sft,
pairs.build_pairs, dpo.train_dpo, evaluation.evaluate, evaluation.infer), and SFT and DPO write
``merged/`` with ``save_merged``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

import yaml

from common.config import ConfigError
from common.io import InputError, atomic_dir
from policy.policy import Policy, PolicySpec, load_policy
from policy.prompts import keep_prompts

DEFAULT_ADAPTER_DIRS = ("outputs/toy/dpo/adapter", "outputs/toy/dpo")  # first holding a PEFT adapter
ADAPTER_FILE = "adapter_config.json"


def has_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def find_adapter(explicit: str, defaults: Iterable[str] = DEFAULT_ADAPTER_DIRS) -> str | None:
    """The DPO adapter folder: ``explicit`` (must hold an adapter), else the first default that does."""
    if explicit:
        if not has_adapter(explicit):
            raise InputError(f"{explicit}: no PEFT adapter here ({ADAPTER_FILE} missing); train one with `bash scripts/train_dpo.sh`")
        return explicit
    return next((d for d in defaults if has_adapter(d)), None)


def check_adapter_base(adapter: str, init_adapter: str) -> None:
    """Refuse a DPO adapter trained on another init_adapter than the one given (its run_config.yaml
    names it under ``policy:``; a run config with a flat ``policy`` path names it at the top)."""
    run_config = Path(adapter).parent / "run_config.yaml"
    if not run_config.is_file():
        return
    run = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
    spec = run.get("policy")
    trained_on = (spec.get("init_adapter") if isinstance(spec, dict) else run.get("init_adapter")) or ""
    if trained_on != (init_adapter or ""):
        raise ConfigError(f"{adapter} was trained on the policy + init_adapter {trained_on!r} ({run_config}); "
                          f"pass --policy.init_adapter {shlex.quote(trained_on)}")


def load_with_adapters(spec: PolicySpec, adapter: str | Path | None = None, device: str = "cpu") -> Policy:
    """The policy of ``spec`` (its checkpoint with ``init_adapter`` merged in) with ``adapter`` then
    merged in too (either adapter may be empty)."""
    load = dict(dtype=spec.dtype, device=device, trust_remote_code=spec.trust_remote_code, merge_adapter=True)
    if not spec.init_adapter:
        return load_policy(spec.path, adapter=adapter or None, **load)
    policy = load_policy(spec.path, adapter=spec.init_adapter, **load)
    if adapter:
        from peft import PeftModel

        policy.model = PeftModel.from_pretrained(policy.model, str(adapter)).merge_and_unload().eval()
    return policy


def save_merged(policy: Policy, out: Path, prompts: Path) -> Path:
    """``out``: the (merged) policy as a checkpoint from_pretrained loads (safetensors + processor),
    with the ``prompts`` it was tuned with."""
    with atomic_dir(out) as tmp:
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.processor.save_pretrained(tmp)
        keep_prompts(prompts, tmp)
    return out
