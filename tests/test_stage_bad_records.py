"""Every stage that reads annotation files takes ``bad_record: skip | error`` (default skip)."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import ConfigError, load_config
from dpo.train_dpo import DpoConfig
from evaluation.evaluate import EvalConfig
from pairs.build_pairs import PairsConfig
from policy.train_sft import SftConfig
from retriever.finetune_clip import ClipTrainConfig
from retriever.retrieve import RetrieveConfig

# (config class, the dotted key of its bad_record field)
STAGES = [(ClipTrainConfig, "data.bad_record"), (RetrieveConfig, "data.bad_record"), (PairsConfig, "bad_record"),
          (DpoConfig, "bad_record"), (SftConfig, "data.bad_record"), (EvalConfig, "bad_record")]


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("cls, key", STAGES, ids=[c.__name__ for c, _ in STAGES])
def test_stage_config_has_bad_record(cls, key):
    assert _get(cls(), key) == "skip"
    assert _get(load_config(cls, [f"--{key}", "error"]), key) == "error"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(cls, [f"--{key}", "ignore"])
    owner = _get(cls(), key.rpartition(".")[0]) if "." in key else cls()
    field = next(f for f in dataclasses.fields(owner) if f.name == "bad_record")
    assert field.metadata["help"]
