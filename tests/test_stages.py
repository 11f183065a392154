import sys
from pathlib import Path

import pytest

from common.io import LOCK_FILE, InputError
from common.stages import Stage, plan, run
from tests.test_run_lock import holder


def _stages(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("x: 1\n")
    mk = lambda n: [sys.executable, "-c", "pass"]  # noqa: E731
    return cfg, [
        Stage("a", mk("a"), tmp_path / "a", [cfg]),
        Stage("b", mk("b"), tmp_path / "b"),
        Stage("c", mk("c"), tmp_path / "c"),
    ]


def todo(stages, **kw):
    return [s.name for s, _, r in plan(stages, **kw) if r]


def test_skip_force_from_and_config_change(tmp_path):
    cfg, stages = _stages(tmp_path)
    assert todo(stages) == ["a", "b", "c"]
    run(stages)
    assert todo(stages) == []
    assert todo(stages, force=True) == ["a", "b", "c"]
    assert todo(stages, start="b") == ["b", "c"]
    cfg.write_text("x: 2\n")  # a changed input redoes its stage and everything after it
    assert todo(stages) == ["a", "b", "c"]
    run(stages)
    (tmp_path / "b" / ".stage-b.json").unlink()  # output gone -> redo from there
    assert todo(stages) == ["b", "c"]
    with pytest.raises(ValueError, match="no such stage"):
        plan(stages, start="zzz")


def test_a_fresh_chain_is_up_to_date_after_its_first_run(tmp_path):
    """A stage reading what the stage before it writes is stamped with what it read, not with the
    folder as it was before the chain started: the second run skips everything."""
    made = tmp_path / "made"
    write = f"import pathlib; p = pathlib.Path({str(made)!r}); p.mkdir(exist_ok=True); (p / 'x.txt').write_text('x')"
    stages = [Stage("make", [sys.executable, "-c", write], made),
              Stage("use", [sys.executable, "-c", "pass"], tmp_path / "use", inputs=[made])]
    assert todo(stages) == ["make", "use"]
    run(stages)
    assert todo(stages) == []


def test_the_python_counts_by_its_version_not_its_path(tmp_path, monkeypatch):
    """Another clone's .venv (or this one moved) runs the same Python: its chains stay up to date."""
    _, stages = _stages(tmp_path)
    run(stages)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / ".venv" / "bin" / "python"))
    moved = [Stage(s.name, [sys.executable, *s.cmd[1:]], s.output, s.configs) for s in stages]
    assert todo(moved) == []
    monkeypatch.setattr(sys, "version", "2.7.18 (default)")
    assert todo(moved) == ["a", "b", "c"]


def test_failed_stage_stops_and_leaves_no_stamp(tmp_path):
    bad = [Stage("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad")]
    with pytest.raises(SystemExit):
        run(bad)
    assert not (tmp_path / "bad" / ".stage-bad.json").exists()


def test_code_and_inputs_are_part_of_the_fingerprint(tmp_path):
    pkg, data = tmp_path / "pkg", tmp_path / "data"
    (pkg / "sub").mkdir(parents=True)
    data.mkdir()
    (pkg / "mod.py").write_text("x = 1\n")
    (pkg / "sub" / "deep.py").write_text("y = 1\n")
    (data / "img.png").write_bytes(b"\x00" * 4)
    listing = tmp_path / "list.json"
    listing.write_text("[1]\n")
    stages = [Stage("a", [sys.executable, "-c", "pass"], data, code=[pkg], inputs=[data, listing])]
    run(stages)  # the stamp lands in the input folder itself: it is not an input
    assert todo(stages) == []
    (pkg / "notes.txt").write_text("not code\n")
    (pkg / "sub" / "deep.pyc").write_bytes(b"\x01")
    assert todo(stages) == []  # only .py files are code
    for change in (lambda: (pkg / "sub" / "deep.py").write_text("y = 2\n"),  # code file edited
                   lambda: (pkg / "new.py").write_text(""),  # code file added
                   lambda: listing.write_text("[2]\n"),  # input file edited
                   lambda: (data / "img.png").write_bytes(b"\x00" * 5),  # file in an input folder changed
                   lambda: (data / "more.png").write_bytes(b"")):  # file added to an input folder
        change()
        assert todo(stages) == ["a"]
        run(stages)
        assert todo(stages) == []


def test_demo_stages_name_their_code_and_inputs():
    from pipeline.demo import OUT, stages

    for s in stages():
        assert Path("common") in s.code and Path("data") in s.code, s.name
        assert all(Path(c).exists() for c in s.code), s.name
        assert all(Path(i).parent == OUT for i in s.inputs), s.name
    by_name = {s.name: s for s in stages()}
    assert Path("evaluation") in by_name["evaluate"].code and OUT / "dpo" in by_name["evaluate"].inputs


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_stage_follows_the_stages_it_names(tmp_path):
    """A branch that does not follow the policy is not redone when the policy is; the join is."""
    cfg = tmp_path / "policy.yaml"
    cfg.write_text("x: 1\n")
    stages = [Stage("world", _py("pass"), tmp_path / "world"),
              Stage("policy", _py("pass"), tmp_path / "policy", [cfg]),
              Stage("retriever", _py("pass"), tmp_path / "retriever", after=("world",)),
              Stage("pairs", _py("pass"), tmp_path / "pairs", after=("policy", "retriever"))]
    run(stages)
    cfg.write_text("x: 2\n")
    assert todo(stages) == ["policy", "pairs"]
    run(stages)
    assert todo(stages, start="retriever") == ["retriever", "pairs"]
    with pytest.raises(ValueError, match="not among the stages before it"):
        plan([Stage("a", _py("pass"), tmp_path / "a", after=("b",)), Stage("b", _py("pass"), tmp_path / "b")])


def test_a_chain_is_locked_while_it_is_rebuilt_and_free_to_read_when_done(tmp_path):
    """Two studies on one chain: the second that would rebuild it stops with one line; one with
    nothing to do runs beside the holder."""
    cfg, stages = _stages(tmp_path)
    run(stages, lock=tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # released and removed at the end
    proc = holder(tmp_path)
    try:
        run(stages, lock=tmp_path)  # up to date: only read
        cfg.write_text("x: 3\n")
        with pytest.raises(InputError, match="another run is writing here"):
            run(stages, lock=tmp_path)
        assert todo(stages) == ["a", "b", "c"]  # nothing ran, no stamp was removed by the refused run
    finally:
        proc.kill()
        proc.wait()
    run(stages, lock=tmp_path)
    assert todo(stages) == []
