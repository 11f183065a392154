"""PEFT adapters on a policy: finding one, checking what it was trained on, loading a policy with
its adapters merged in (an ``init_adapter`` such as SFT's first, then the DPO one, as
dpo.train_dpo stacks them) and saving such a merged policy as an ordinary checkpoint.

The one place for this: dpo.train_dpo (init_adapter, ``merged/``), policy.train_sft
(``merged/``), evaluation.evaluate and evaluation.infer use it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

import yaml

from common.config import ConfigError
from common.io import InputError, atomic_dir
from policy.policy import Policy, load_policy

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
    """Refuse a DPO adapter trained on another init_adapter than the one given (its run_config.yaml)."""
    run_config = Path(adapter).parent / "run_config.yaml"
    if not run_config.is_file():
        return
    trained_on = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("init_adapter") or ""
    if trained_on != (init_adapter or ""):
        raise ConfigError(f"{adapter} was trained on the policy + init_adapter {trained_on!r} ({run_config}); "
                          f"pass --init_adapter {shlex.quote(trained_on)}")


def load_with_adapters(path: str | Path, init_adapter: str | Path | None, adapter: str | Path | None,
                       dtype: str = "float32", device: str = "cpu") -> Policy:
    """The policy with ``init_adapter`` and then ``adapter`` merged in (either may be empty)."""
    if not init_adapter:
        return load_policy(path, adapter=adapter or None, dtype=dtype, device=device, merge_adapter=True)
    policy = load_policy(path, adapter=init_adapter, dtype=dtype, device=device, merge_adapter=True)
    if adapter:
        from peft import PeftModel

        policy.model = PeftModel.from_pretrained(policy.model, str(adapter)).merge_and_unload().eval()
    return policy


def save_merged(policy: Policy, out: Path) -> Path:
    """``out``: the (merged) policy as a checkpoint from_pretrained loads (safetensors + processor)."""
    with atomic_dir(out) as tmp:
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.processor.save_pretrained(tmp)
    return out
