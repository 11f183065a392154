"""Fault cases that run in seconds; the end-to-end scenarios (tests/faults.py) are
wrapped at the bottom as slow tests.

Covered elsewhere and not repeated here: each bad image kind through load_image (test_images.py),
bad-image skipping in the pair builder and pairs SIGKILL + resume (test_build_pairs.py), DPO
resume after a crash (test_train_dpo.py, in-process), CLIP exact resume
(test_retriever_train.py), half-written checkpoint folders (test_checkpoint.py), config parsing
errors (test_config.py).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from common.checkpoint import CheckpointManager
from common.config import cli_main
from common.io import InputError, atomic_write_text
from data.images import BadImageError, load_image
from tests import faults as fs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data", "retriever", "policy", "pairs", "dpo", "evaluation", "pipeline", "toy")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------- the suite's own fault makers


@pytest.mark.parametrize("kind, reason", [("missing", "missing"), ("empty", "empty"), ("truncated_jpeg", "unreadable"),
                                          ("text_png", "unreadable"), ("one_pixel", "too_small"),
                                          ("bomb_header", "too_large"), ("gray16", None), ("cmyk", None)])
def test_fault_images_are_what_they_claim(tmp_path, kind, reason):
    """The suite's injected files fail for the intended reason (the bomb with PIL's real limit)."""
    path = tmp_path / "x.png"
    path.write_bytes(b"placeholder")
    fs.write_kind(path, kind)
    if reason is None:
        assert load_image(path).mode == "RGB"
    else:
        with pytest.raises(BadImageError) as info:
            load_image(path)
        assert info.value.reason == reason and str(path) in str(info.value)


# ---------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this creates ``marker``: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _saved_checkpoint(root: Path) -> tuple[CheckpointManager, Path]:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    acc = Accelerator(cpu=True)
    acc.prepare(model, opt)
    mgr = CheckpointManager(root)
    return mgr, mgr.save(acc, 1, {"epoch": 0})


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_pickled_payload_in_checkpoint_is_refused(tmp_path, victim):
    mgr, folder = _saved_checkpoint(tmp_path / "ck")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("pytorch_model*.bin"))
    assert (folder / victim).is_file()
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, folder / victim)
    AcceleratorState._reset_state(True)
    model = torch.nn.Linear(4, 2)
    acc = Accelerator(cpu=True)
    acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    if victim == "optimizer.bin":
        with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
            mgr.load(acc, "latest")
    else:  # accelerate would log a failed RNG load and go on; the manager stops with the file named
        with pytest.raises(InputError, match="random_states_0.pkl: unreadable RNG state"):
            mgr.load(acc, "latest")
    assert not marker.exists()


def test_clip_tower_checkpoint_with_payload_is_refused(tmp_path):
    from retriever.model import _load_visual_from

    marker = tmp_path / "pwned"
    bad = tmp_path / "clip.pt"
    torch.save({"state_dict": {"visual.x": torch.zeros(1)}, "extra": _Payload(marker)}, bad)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        _load_visual_from(torch.nn.Module(), str(bad))
    assert not marker.exists()


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if dotted == name:
                yield node


def test_every_torch_load_is_weights_only_and_remote_code_is_off_by_default():
    """Source scan: torch.load only with weights_only=True; trust_remote_code never defaults to True."""
    offenders = []
    for py in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        tree = ast.parse(py.read_text())
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{py.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is True:
                offenders.append(f"{py.relative_to(ROOT)}:{node.value.lineno} trust_remote_code=True")
            if isinstance(node, (ast.AnnAssign,)) and getattr(node.target, "id", "") == "trust_remote_code" and \
                    "True" in ast.unparse(node.value or ast.Constant(None)):
                offenders.append(f"{py.relative_to(ROOT)}:{node.lineno} trust_remote_code field defaults to True")
    assert offenders == []
    from policy.policy import load_policy

    assert inspect.signature(load_policy).parameters["trust_remote_code"].default is False


# ---------------------------------------------------------------- malformed config, every entry point


def _main_of(module: str):
    mod = __import__(module, fromlist=["main"])
    return mod.main


@pytest.mark.parametrize("module", list(fs.CLIS))
def test_bad_config_exits_2_before_any_output(module, tmp_path, monkeypatch, capsys):
    out_key, int_key = fs.CLIS[module]
    main = _main_of(module)
    for fault, args in fs.config_cases(tmp_path) + [("wrong type", [int_key, "abc"])]:
        out = tmp_path / "out"
        monkeypatch.setattr(sys, "argv", [module, *args, out_key, str(out)])
        with pytest.raises(SystemExit) as e:
            cli_main(main)
        err = capsys.readouterr().err
        assert e.value.code == 2, (fault, err)
        assert err.strip() and "Traceback" not in err, (fault, err)
        assert not out.exists(), fault


# ---------------------------------------------------------------- full disk


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    err = fs._mount(mnt, "size=16k")
    if err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    yield mnt
    fs._umount(mnt)


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tiny_tmpfs):
    target = tiny_tmpfs / "pairs.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "x" * 64 * 1024)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["pairs.json"]


# ---------------------------------------------------------------- the end-to-end scenarios (slow)

@pytest.mark.slow
@pytest.mark.parametrize("name", list(fs.SCENARIOS))
def test_scenario(name, tmp_path):
    got = fs.SCENARIOS[name](fs.Worlds(tmp_path))
    rows = got if isinstance(got, list) else [got]
    failed = [r for r in rows if r.ok is False]
    assert not failed, fs.table(failed)


@pytest.mark.slow
def test_faults_sh_help():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "faults.sh"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "--out" in res.stdout
