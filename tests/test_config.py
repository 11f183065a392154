from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import ConfigError, doc, load_config, save_config


@dataclass
class Optim:
    lr: float = doc(1e-4, "peak learning rate")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas")


@dataclass
class Cfg:
    output_dir: Path = doc(Path("outputs/x"), "where to write")
    epochs: int = doc(3, "passes over the data")
    rule: str | None = doc(None, "optional rule")
    bf16: bool = doc(False, "bfloat16 autocast")
    optim: Optim = field(default_factory=Optim, metadata={"help": "optimizer"})


def test_defaults_yaml_and_cli_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 5\noptim:\n  lr: 0.001\n")
    cfg = load_config(Cfg, [str(y), "--epochs", "7", "--optim.lr=2e-3", "--bf16"])
    assert cfg.epochs == 7 and cfg.optim.lr == pytest.approx(2e-3) and cfg.bf16 is True
    assert cfg.optim.betas == [0.9, 0.999] and isinstance(cfg.output_dir, Path)
    assert load_config(Cfg, ["--optim.lr", "1"]).optim.lr == 1.0  # int widened to float


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--nope", "1"], "unknown key"),
        (["--epochs", "many"], "expected int"),
        (["--bf16", "3"], "expected true or false"),
        (["--optim.betas", "0.9"], "expected a list"),
        (["missing.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_refused(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(Cfg, argv)


def test_bad_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("epochs: 1\noptim: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(Cfg, [str(y)])


def test_roundtrip(tmp_path):
    cfg = load_config(Cfg, ["--epochs", "9", "--rule", "gap"])
    save_config(cfg, tmp_path / "run_config.yaml")
    assert load_config(Cfg, [str(tmp_path / "run_config.yaml")]) == cfg


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        load_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "--optim.lr" in out and "peak learning rate" in out


@dataclass
class Outer:
    train: Optim = doc(Optim(lr=0.5), "a section whose default differs from Optim()")


def test_partial_override_keeps_the_sections_own_defaults():
    cfg = load_config(Outer, ["--train.betas", "[0.1, 0.2]"])
    assert cfg.train.lr == 0.5 and cfg.train.betas == [0.1, 0.2]


def test_yes_no_words_are_strings_for_str_fields_and_bools_for_bool_fields(tmp_path):
    # accelerate spells "no mixed precision" as "no"; YAML 1.1 would read it as false
    y = tmp_path / "c.yaml"
    y.write_text("rule: no\nbf16: yes\n")
    cfg = load_config(Cfg, [str(y)])
    assert cfg.rule == "no" and cfg.bf16 is True
    cfg = load_config(Cfg, ["--rule", "off", "--bf16", "off"])
    assert cfg.rule == "off" and cfg.bf16 is False
